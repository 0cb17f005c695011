"""The console through a real browser: Debian's chromium driven by playwright.

The console runs as `python -m worker console` on a loopback port (a real uvicorn process), the
jobs through real worker processes or burst workers, and every test watches the page for
dialogs, console errors and uncaught exceptions: none may appear unless the test caused them on
purpose. With C360_SCREENSHOTS=1 the overview test writes docs/console-overview.png.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Dialog,
    Page,
    Response,
    async_playwright,
    expect,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bench.make_contacts_csv import main as make_contacts_csv
from db.models import EmailMessage
from tests.conftest import RunBurst
from tests.console.conftest import PASSWORD
from tests.reliability.conftest import REPO_ROOT, Processes, free_port, wait_for, worker_env
from tests.support.redis_replies import reply
from worker.client import JobsClient
from worker.lease import Leases, running_key
from worker.routes import QUEUES
from worker.settings import Settings
from worker.stats import stats_key
from worker.web.auth import SESSION_COOKIE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CHROMIUM = os.environ.get("C360_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = REPO_ROOT / "docs" / "console-overview.png"
XSS = "<img src=x onerror=alert(1)>"
NONE_SHOWN = "\u2013"  # what the templates and console.js show for a missing value
# Long enough for an expect() to outlast a poll (every 3 s) on a loaded machine.
WAIT_MS = 15_000
Sessions = async_sessionmaker[AsyncSession]


def service_env(settings: Settings, **overrides: Any) -> dict[str, str]:
    """The environment of a console or worker process on the tests' database and Redis."""
    env = worker_env(
        settings,
        console_password=PASSWORD,
        import_dir=settings.import_dir,
        export_dir=settings.export_dir,
        **overrides,
    )
    if "c360_job_modules" not in overrides:
        env.pop("C360_JOB_MODULES")  # the real jobs, not the fault tests' fixtures
    return env


@pytest.fixture(scope="module")
async def console_url(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """`python -m worker console` on a free loopback port, killed when the module ends."""
    port = free_port()
    procs = Processes(tmp_path_factory.mktemp("console"))
    process = procs.start("console", "--port", str(port), env=service_env(settings))
    url = f"http://127.0.0.1:{port}"

    async def healthy() -> bool:
        if process.poll() is not None:
            pytest.fail(f"the console exited: {procs.log(process)}")
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(f"{url}/healthz")).status_code == 200
        except httpx.TransportError:
            return False

    try:
        await wait_for(healthy, 30, "the console to answer /healthz")
        yield url
    finally:
        procs.kill_all()


@pytest.fixture(scope="module")
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"no chromium at {CHROMIUM}: `scripts/services.sh test` installs Debian's package "
            "(or set C360_CHROMIUM to another Chromium binary)"
        )
    return CHROMIUM


@pytest.fixture(scope="module")
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium)
        yield launched
        await launched.close()


@dataclass
class Tab:
    """A page and what it reported: dialogs, console errors, uncaught exceptions."""

    page: Page
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # Substrings of console errors a test caused on purpose (the CSP check).
    expected: list[str] = field(default_factory=list)

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not any(x in e for x in self.expected)]


@pytest.fixture
async def tab(browser: Browser, console_url: str) -> AsyncIterator[Tab]:
    """A fresh browser context (no cookie) and page; no dialog or JS error may appear in it."""
    context = await browser.new_context(
        base_url=console_url, viewport={"width": 1280, "height": 720}
    )
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    watched = Tab(page)

    async def on_dialog(dialog: Dialog) -> None:
        watched.dialogs.append(dialog.message)
        await dialog.dismiss()

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            watched.errors.append(f"{page.url}: {message.text}")

    page.on("dialog", on_dialog)
    page.on("console", on_console)
    page.on("pageerror", lambda exc: watched.errors.append(f"{page.url}: uncaught {exc}"))

    # Which URL failed: the console's "Failed to load resource" line does not say.
    def on_response(answer: Response) -> None:
        if answer.status >= 400:
            watched.errors.append(f"answer {answer.status} for {answer.url}")

    page.on("response", on_response)
    try:
        yield watched
    finally:
        await context.close()
    assert watched.dialogs == [], "a script opened a dialog"
    unexpected = watched.unexpected_errors()
    assert not unexpected, "the page logged errors:\n" + "\n".join(unexpected)


async def sign_in(page: Page) -> None:
    await page.goto("/login")
    await page.fill("#username", "admin")
    await page.fill("#password", PASSWORD)
    await page.click("#login-submit")
    await page.wait_for_url(re.compile(r"/$"))


async def updated_at(page: Page) -> str | None:
    return await page.get_attribute("main#page", "data-updated-at")


async def next_poll(page: Page, *, now: bool = False) -> None:
    """Wait until console.js has polled the API again and written the answer into the page.

    `now`: make it poll at once, as it does when a hidden tab becomes visible, instead of
    waiting for its timer.
    """
    before = await updated_at(page)
    if now:
        await page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    await page.wait_for_function(
        # `?? null`: before the first poll there is no attribute, and None arrives as null.
        "before => (document.getElementById('page').dataset.updatedAt ?? null) !== before",
        arg=before,
        timeout=WAIT_MS,
    )


async def written_by_script(page: Page) -> None:
    """Wait until console.js has written an answer into this document at least once.

    Lists poll; one import's page follows server-sent events, which for a finished import write
    the page once and end, so "the next poll" may never come there.
    """
    await page.wait_for_function(
        "() => Boolean(document.getElementById('page').dataset.updatedAt)", timeout=WAIT_MS
    )


async def mark_document(page: Page) -> None:
    """Tag the loaded document; `same_document` is true only while no reload has happened."""
    await page.evaluate("window.__c360SameDocument = true")


async def same_document(page: Page) -> bool:
    return bool(await page.evaluate("window.__c360SameDocument === true"))


def write_import(settings: Settings, user: uuid.UUID, name: str, body: str) -> None:
    folder = settings.import_dir / str(user)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(body)


# ---- sign-in ------------------------------------------------------------------------------------


async def test_a_wrong_password_is_refused_and_sets_no_cookie(tab: Tab) -> None:
    page = tab.page
    await page.goto("/login")
    await page.fill("#username", "admin")
    await page.fill("#password", "not-the-password")
    await page.click("#login-submit")

    await expect(page.locator("#login-error")).to_be_visible()
    await expect(page.locator("#login-error")).to_have_text("Wrong user name or password.")
    assert [c["name"] for c in await page.context.cookies()] == []
    await page.goto("/")  # still signed out: the overview sends us back to the form
    await expect(page).to_have_url(re.compile(r"/login$"))
    assert await page.locator("main#page").count() == 0
    # The browser logs the 401 answer as a failed resource load: that is the refusal itself.
    tab.expected += ["status of 401", "answer 401 for"]


async def test_sign_in_sets_an_httponly_strict_cookie_and_sign_out_clears_it(tab: Tab) -> None:
    page = tab.page
    await sign_in(page)

    await expect(page.locator("main#page h1")).to_have_text("Overview")
    (cookie,) = await page.context.cookies()
    assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"]) == (
        SESSION_COOKIE,
        True,
        "Strict",
    )
    assert await page.evaluate("document.cookie") == ""  # out of reach of any script

    await page.click("#logout")
    await page.wait_for_url(re.compile(r"/login$"))
    assert await page.context.cookies() == []


# ---- overview -----------------------------------------------------------------------------------


async def redis_counts(redis_raw: aioredis.Redis, queue: str) -> dict[str, int]:
    """What Redis holds for one queue, read without the console's code."""
    now_ms = int(time.time() * 1000)
    stats = {
        k.decode(): int(v) for k, v in (await reply(redis_raw.hgetall(stats_key(queue)))).items()
    }
    workers = [k async for k in redis_raw.scan_iter(match=f"{queue}:health-check:*")]
    return {
        "queued": await redis_raw.zcount(queue, "-inf", now_ms),
        "deferred": await redis_raw.zcount(queue, f"({now_ms}", "+inf"),
        "running": await reply(redis_raw.hlen(running_key(queue))),
        "workers": len(workers),
        **{name: stats.get(name, 0) for name in ("completed", "failed", "retried", "died")},
    }


async def test_the_overview_shows_what_redis_holds_and_follows_it_live(
    tab: Tab, settings: Settings, arq_redis: ArqRedis, redis_raw: aioredis.Redis, tmp_path: Path
) -> None:
    page = tab.page
    for n in range(4):
        await arq_redis.enqueue_job("send_email", _queue_name="default", _job_id=f"mail-{n}")
    await arq_redis.enqueue_job("export_contacts", _queue_name="exports", _defer_by=900)
    await Leases(arq_redis, "imports").acquire("import:x")  # a job some worker runs
    counters = {
        "default": {"completed": 1284, "failed": 7, "retried": 19, "died": 1},
        "imports": {"completed": 42, "failed": 1, "retried": 3},
        "exports": {"completed": 310, "retried": 2},
    }
    for queue, values in counters.items():
        await reply(redis_raw.hset(stats_key(queue), mapping=values))
    # A real worker process heartbeats on the exports queue (its only job is deferred).
    procs = Processes(tmp_path)
    try:
        worker = procs.start("work", "exports", env=service_env(settings))

        async def heartbeat() -> bool:
            assert worker.poll() is None, procs.log(worker)
            return (await redis_counts(redis_raw, "exports"))["workers"] == 1

        await wait_for(heartbeat, 30, "the exports worker's first heartbeat")

        await sign_in(page)
        await mark_document(page)
        await next_poll(page)  # the page as console.js keeps it, not only as rendered
        for queue in QUEUES:
            held = await redis_counts(redis_raw, queue)
            shown = {f: await page.text_content(f"#q-{queue}-{f}") for f in held}
            assert shown == {f: str(n) for f, n in held.items()}, queue
        age = await page.text_content("#q-default-oldest_queued_age_s")
        assert age is not None and float(age) >= 0
        assert await page.text_content("#q-imports-oldest_queued_age_s") == NONE_SHOWN

        # Two more jobs and a failure: the page follows without a reload.
        await arq_redis.enqueue_job("send_email", _queue_name="default", _job_id="mail-4")
        await arq_redis.enqueue_job("send_email", _queue_name="default", _job_id="mail-5")
        await reply(redis_raw.hincrby(stats_key("default"), "failed", 1))
        await expect(page.locator("#q-default-queued")).to_have_text("6", timeout=WAIT_MS)
        await expect(page.locator("#q-default-failed")).to_have_text("8", timeout=WAIT_MS)
        assert await same_document(page)

        if os.environ.get("C360_SCREENSHOTS") == "1":
            # As wide as a laptop's window, as tall as the page: no empty half below.
            await page.set_viewport_size({"width": 1100, "height": 240})
            await page.screenshot(path=str(SCREENSHOT), full_page=True)
    finally:
        procs.kill_all()


# ---- imports ------------------------------------------------------------------------------------


async def test_a_running_imports_bar_advances_without_a_reload(
    tab: Tab,
    settings: Settings,
    jobs_client: JobsClient,
    user_id: uuid.UUID,
    tmp_path: Path,
) -> None:
    page = tab.page
    rows = 100_000
    folder = settings.import_dir / str(user_id)
    folder.mkdir(parents=True)
    make_contacts_csv([str(folder / "big.csv"), "--rows", str(rows), "--seed", "12"])
    import_id = (await jobs_client.import_contacts(user_id, "big.csv")).id

    await sign_in(page)
    await page.goto(f"/imports/{import_id}")
    await expect(page.locator("#import-status")).to_have_text("pending")
    assert await page.eval_on_selector("#import-progress", "el => el.value") == 0
    await mark_document(page)

    procs = Processes(tmp_path)
    try:
        # Small batches: the import commits its progress many times while the page polls.
        worker = procs.start("work", "imports", env=service_env(settings, import_batch_rows=2_000))
        seen: list[tuple[float, str | None]] = []
        deadline = time.monotonic() + 90
        while True:
            assert worker.poll() is None, procs.log(worker)
            value = await page.eval_on_selector("#import-progress", "el => el.value")
            stamp = await updated_at(page)
            if not seen or seen[-1] != (value, stamp):
                seen.append((value, stamp))
            if value == 100 and await page.text_content("#import-status") == "completed":
                break
            assert time.monotonic() < deadline, f"the bar stopped at {seen[-1:]}"
            await asyncio.sleep(0.2)
    finally:
        procs.kill_all()

    values = [value for value, _ in seen]
    assert values == sorted(values), f"the bar went backwards: {values}"
    assert values[0] == 0 and values[-1] == 100
    assert len({stamp for _, stamp in seen if stamp is not None}) >= 2  # several polls
    assert await same_document(page), "the page was reloaded"
    done = await jobs_client.import_status(import_id)
    assert (done.status, done.processed_rows) == ("completed", rows)
    assert await page.text_content("#import-processed_rows") == str(rows)


async def test_cancel_from_the_imports_list_cancels_the_import(
    tab: Tab, settings: Settings, jobs_client: JobsClient, user_id: uuid.UUID
) -> None:
    page = tab.page
    write_import(settings, user_id, "a.csv", "email\nann@example.com\n")
    import_id = (await jobs_client.import_contacts(user_id, "a.csv")).id  # no worker: it waits

    await sign_in(page)
    await page.goto("/imports")
    # After a poll the rows are console.js's, cloned from the row template: click one of those.
    await next_poll(page, now=True)
    row = page.locator(f"tr#import-{import_id}")
    await expect(row.locator("progress")).to_have_count(1)
    await expect(page.locator(f"#retry-{import_id}")).to_be_hidden()
    await page.locator(f"#cancel-{import_id} button").click()

    await page.wait_for_url(re.compile(r"/imports$"))
    await expect(row.locator("td[data-bind=status]")).to_have_text("cancelled")
    await expect(page.locator(f"#cancel-{import_id}")).to_be_hidden()
    assert (await jobs_client.import_status(import_id)).status == "cancelled"


async def test_a_header_made_of_markup_shows_as_text_and_runs_no_script(
    tab: Tab, settings: Settings, jobs_client: JobsClient, run_burst: RunBurst, user_id: uuid.UUID
) -> None:
    page = tab.page
    write_import(settings, user_id, "xss.csv", f"email,{XSS}\nann@example.com,1\n")
    import_id = (await jobs_client.import_contacts(user_id, "xss.csv")).id
    await run_burst("imports")
    message = (await jobs_client.import_status(import_id)).message
    assert message is not None and XSS in message

    await sign_in(page)
    for path, selector in ((f"/imports/{import_id}", "#import-message"), ("/imports", None)):
        await page.goto(path)
        cell = page.locator(selector or f"tr#import-{import_id} td[data-bind=message]")
        for _ in ("as rendered by the server", "as written by console.js"):
            await expect(cell).to_contain_text(XSS)  # the markup is the text
            assert await page.locator("main img").count() == 0
            await written_by_script(page)

    # And were markup ever to slip in, the CSP refuses its inline handler. The page answers
    # when the browser reports the violation, or (a CSP that lets it run) after 5 s.
    tab.expected += ["Content Security Policy", "status of 404", "/static/no-such.png"]
    probe = await page.evaluate(
        """() => new Promise((done) => {
            const answer = (violated) => done({ violated, ran: window.__c360Ran === 1 });
            document.addEventListener("securitypolicyviolation", () => answer(true));
            setTimeout(() => answer(false), 5000);
            const probe = document.createElement("div");
            probe.innerHTML = '<img src="/static/no-such.png" onerror="window.__c360Ran = 1">';
            document.body.append(probe);
        })"""
    )
    assert probe == {"violated": True, "ran": False}
    assert await page.evaluate("window.__c360Ran") is None
    assert tab.dialogs == []


# ---- exports ------------------------------------------------------------------------------------


async def test_a_failed_export_retried_from_its_button_completes(
    tab: Tab, sessions: Sessions, jobs_client: JobsClient, run_burst: RunBurst, user_id: uuid.UUID
) -> None:
    page = tab.page
    async with sessions.begin() as session:
        await session.execute(
            text("INSERT INTO contacts (user_id, email) VALUES (:u, 'a@example.com')"),
            {"u": user_id},
        )
    export_id = (await jobs_client.export_contacts(user_id)).id
    await run_burst("exports")
    # Fail it the way the job's on_failure does.
    async with sessions.begin() as session:
        await session.execute(
            text("UPDATE exports SET status = 'failed', error = 'disk full' WHERE id = :id"),
            {"id": export_id},
        )

    await sign_in(page)
    await page.goto("/exports")
    row = page.locator(f"tr#export-{export_id}")
    await expect(row.locator("td[data-bind=status]")).to_have_text("failed")
    await next_poll(page, now=True)
    await page.locator(f"#retry-{export_id} button").click()
    await page.wait_for_url(re.compile(r"/exports$"))
    await mark_document(page)

    await run_burst("exports")
    await expect(row.locator("td[data-bind=status]")).to_have_text("completed", timeout=WAIT_MS)
    await expect(row.locator("td[data-bind=row_count]")).to_have_text("1")
    await expect(page.locator(f"#retry-{export_id}")).to_be_hidden()
    await expect(row.locator("a", has_text="download")).to_be_visible()
    assert await same_document(page)
    done = await jobs_client.export_status(export_id)
    assert (done.status, done.row_count, done.error) == ("completed", 1, None)


# ---- every page ---------------------------------------------------------------------------------


async def test_every_page_loads_polls_and_keeps_its_ids_without_a_js_error(
    tab: Tab,
    settings: Settings,
    sessions: Sessions,
    jobs_client: JobsClient,
    run_burst: RunBurst,
    user_id: uuid.UUID,
) -> None:
    page = tab.page
    write_import(settings, user_id, "done.csv", "email\nann@example.com\nnot-an-email\n")
    finished = (await jobs_client.import_contacts(user_id, "done.csv")).id
    write_import(settings, user_id, "no-email.csv", "name\nAnn\n")
    failed_import = (await jobs_client.import_contacts(user_id, "no-email.csv")).id
    await run_burst("imports")
    assert (await jobs_client.import_status(failed_import)).status == "failed"
    write_import(settings, user_id, "waiting.csv", "email\nbob@example.com\n")
    waiting = (await jobs_client.import_contacts(user_id, "waiting.csv")).id
    # An email the provider may or may not have sent: held for review.
    email_id = uuid.uuid4()
    held = EmailMessage(
        id=email_id, idempotency_key="k1", to_email="x@example.com", subject="s", html="h",
        status="review", provider="resend", attempts=3, last_error="timeout",
    )  # fmt: skip
    async with sessions.begin() as session:
        session.add(held)
    export_id = (await jobs_client.export_contacts(user_id)).id
    await run_burst("exports")

    # Each page's ids, checked after a poll: console.js rebuilds lists from <template> rows.
    pages: dict[str, list[str]] = {
        "/": [f"#queue-{q}" for q in QUEUES] + ["#q-imports-completed"],
        "/workers": ["#workers-rows"],
        "/failures": ["#failure-groups"],
        "/imports": [
            f"tr#import-{finished}",
            f"#cancel-{waiting}",
            f"#retry-{failed_import}",
            f"tr#import-{finished} progress",
        ],
        f"/imports/{finished}": ["#import-progress", "#import-percent", "#import-job"],
        "/exports": [f"tr#export-{export_id}", f"#retry-{export_id}"],
        "/email": ["#count-review", "#review-rows", f"#mark-sent-{email_id}",
                   f"#send-again-{email_id}", "#rate-limiter"],
        "/cron": ["#cron-rows"],
        f"/jobs/import:{finished}": ["#job-status", "#job-function", "#job-arguments",
                                    "#job-result"],
    }  # fmt: skip
    await sign_in(page)
    for path, ids in pages.items():
        await page.goto(path)
        await expect(page.locator("main#page")).to_be_visible()
        await written_by_script(page)
        for selector in ids:
            assert await page.locator(selector).count() == 1, f"{path}: no {selector}"
        assert await page.locator("#logout").count() == 1
    assert await page.text_content("#job-status") == "complete"
    assert await page.text_content("#job-function") == "process_contacts_import"
    assert tab.errors == []
