// Live updates for the console's pages: poll the page's JSON API (main[data-api]) every few
// seconds while the tab is visible, and write values with textContent only (never innerHTML),
// so nothing from the data can become markup or script.
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
  async function poll() {
    if (document.hidden) return;
    try {
      const answer = await fetch(main.dataset.api + window.location.search, {
        headers: { accept: "application/json" },
        credentials: "same-origin",
      });
      if (answer.status === 401) {
        window.location.assign("/login");
        return;
      }
      if (!answer.ok) return;
      const data = await answer.json();
      fillLists(data);
      fill(main, data, false);
      main.dataset.updatedAt = new Date().toISOString();
    } catch (error) {
      // The console or the network is away for a moment: the next poll tries again.
    }
  }
  setInterval(poll, every);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) poll();
  });
})();
