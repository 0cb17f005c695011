// Live updates for the console's pages: poll the page's JSON API (main[data-api]) every few
// seconds while the tab is visible, and write values with textContent only (never innerHTML),
// so nothing from the data can become markup or script. A page with main[data-events] (one
// import) follows its server-sent events instead, and falls back to polling without them.
// Charts (figure[data-chart]) are SVG elements built here, coloured by CSS classes: the CSP
// allows no inline style or script.
"use strict";
(function () {
  const main = document.getElementById("page");
  if (!main || !main.dataset.api) return;
  const every = Math.max(2000, Math.min(5000, Number(main.dataset.pollMs) || 3000));

  function get(data, path) {
    return path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), data);
  }
  function show(value) {
    return value == null ? "–" : String(value);
  }
  function pattern(text, item) {
    return text.replace(/\{(\w+)\}/g, (_, key) => encodeURIComponent(show(item[key])));
  }
  function fill(root, data, inList) {
    const all = [root, ...root.querySelectorAll("*")];
    for (const el of all) {
      if (!inList && el.closest("[data-list]")) continue;
      const d = el.dataset || {};
      if (d.bind !== undefined) el.textContent = show(get(data, d.bind));
      if (d.bindJson !== undefined) el.textContent = JSON.stringify(get(data, d.bindJson) ?? null, null, 2);
      if (d.bindValue !== undefined) el.value = Number(get(data, d.bindValue)) || 0;
      if (d.bindShow !== undefined) el.hidden = !get(data, d.bindShow);
      if (inList) {
        if (d.bindHref !== undefined) el.setAttribute("href", pattern(d.bindHref, data));
        if (d.bindId !== undefined) el.id = pattern(d.bindId, data);
        for (const attr of ["action", "id"]) {
          const value = el.getAttribute(attr);
          if (value && value.includes("{")) el.setAttribute(attr, pattern(value, data));
        }
      }
    }
  }
  function fillLists(data) {
    for (const list of main.querySelectorAll("[data-list]")) {
      const template = document.getElementById(list.dataset.template);
      const items = get(data, list.dataset.list);
      if (!template || !Array.isArray(items)) continue;
      const rows = items.map((item) => {
        const row = template.content.firstElementChild.cloneNode(true);
        fill(row, item, true);
        return row;
      });
      list.replaceChildren(...rows);
    }
  }
  const SVG = "http://www.w3.org/2000/svg";
  const OUTCOMES = ["completed", "retried", "failed", "died"];
  function svg(name, attrs) {
    const el = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
    return el;
  }
  // Stacked bars, one a minute (oldest left), of the tries ended in every queue, by outcome.
  function drawChart(figure, series) {
    if (!series || !series.queues) return;
    const queues = Object.values(series.queues);
    const minutes = queues.length ? queues[0].completed.length : 0;
    const totals = [];
    for (let m = 0; m < minutes; m++) {
      const at = {};
      for (const o of OUTCOMES) at[o] = queues.reduce((n, q) => n + ((q[o] || [])[m] || 0), 0);
      totals.push(at);
    }
    const peak = Math.max(1, ...totals.map((at) => OUTCOMES.reduce((n, o) => n + at[o], 0)));
    // Bars between a top margin (the scale's label) and a bottom one (the time labels).
    const width = 600, height = 150, pad = 16, bar = width / Math.max(1, minutes);
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height + 2 * pad}`, role: "img", class: "chart" });
    totals.forEach((at, m) => {
      let top = pad + height;
      const when = new Date((series.first_minute_at_s + 60 * m) * 1000);
      const label = `${when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })}: ` +
        OUTCOMES.map((o) => `${at[o]} ${o}`).join(", ");
      const group = svg("g", { "data-minute": m });
      const title = svg("title", {});
      title.textContent = label;
      group.appendChild(title);
      for (const o of OUTCOMES) {
        if (!at[o]) continue;
        const h = (at[o] / peak) * height;
        top -= h;
        group.appendChild(svg("rect", { x: m * bar + 1, y: top, width: bar - 2, height: h, class: `bar-${o}` }));
      }
      chart.appendChild(group);
    });
    chart.appendChild(svg("line", { x1: 0, y1: pad + height, x2: width, y2: pad + height, class: "axis" }));
    const scale = svg("text", { x: 2, y: 12, class: "axis-label" });
    scale.textContent = `${peak} / min`;
    const ago = svg("text", { x: 2, y: pad + height + 14, class: "axis-label" });
    ago.textContent = "60 min ago";
    const now = svg("text", { x: width - 2, y: pad + height + 14, class: "axis-label", "text-anchor": "end" });
    now.textContent = "now";
    chart.append(scale, ago, now);
    figure.replaceChildren(chart);
  }
  function showAll(data) {
    fillLists(data);
    fill(main, data, false);
    for (const figure of main.querySelectorAll("[data-chart]")) drawChart(figure, get(data, figure.dataset.chart));
    main.dataset.updatedAt = new Date().toISOString();
  }
  async function poll() {
    if (document.hidden) return;
    try {
      const answer = await fetch(main.dataset.api + window.location.search, {
        headers: { accept: "application/json" },
        credentials: "same-origin",
      });
      if (answer.status === 401) {
        window.location.assign(main.dataset.root + "/login");
        return;
      }
      if (!answer.ok) return;
      showAll(await answer.json());
    } catch (error) {
      // The console or the network is away for a moment: the next poll tries again.
    }
  }
  let polling = false;
  function startPolling() {
    if (polling) return;
    polling = true;
    poll();
    setInterval(poll, every);
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) poll();
    });
  }
  function follow(url) {
    const source = new EventSource(url);
    source.onmessage = (event) => {
      try {
        showAll(JSON.parse(event.data));
      } catch (error) {
        // A malformed event: the next one carries the whole state again.
      }
    };
    // The import ended: nothing more will change, and closing stops the browser reconnecting.
    source.addEventListener("end", () => source.close());
    source.onerror = () => {
      // CLOSED: refused (401, not an event stream): the browser will not retry; poll instead.
      if (source.readyState === EventSource.CLOSED) startPolling();
    };
  }
  if (main.dataset.events && typeof window.EventSource === "function") follow(main.dataset.events);
  else startPolling();
})();
