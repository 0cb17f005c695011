"""The operator console (CONTRACT §12): `create_app(settings)` is its ASGI app (Starlette).

It reads durable state only (PostgreSQL rows, our Redis counters, arq's keys), so a restarted
console loses nothing and shows what `python -m worker status --json` shows (worker/observe.py).
Pages are rendered on the server with every value escaped, then kept live by console.js,
which polls the JSON API under /api and writes values with `textContent` only; one import's
page follows server-sent events instead (`/api/imports/{id}/events`, worker/web/events.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from arq.connections import ArqRedis
from jinja2 import Environment, FileSystemLoader
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db.session import create_engine, make_sessionmaker
from worker import observe
from worker.client import JobsClient
from worker.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from worker.metrics import render_metrics
from worker.recycle import BYTES_PER_MB
from worker.redis_connect import arq_pool
from worker.settings import Settings
from worker.web import actions, events, reads
from worker.web.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    SESSION_MAX_AGE_S,
    Authenticator,
    Session,
    client_of,
    csrf_matches,
)

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
POLL_MS = 3000
# What the workers page shows of `observe.redis_status`'s worker entries (`status --json`).
WORKER_FIELDS = (
    "worker", "host", "pid", "started_at", "last_heartbeat_s_ago", "rss_bytes", "jobs_done",
)  # fmt: skip
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
]

Endpoint = Callable[[Request], Awaitable[Response]]
Handler = Callable[[Request, Session], Awaitable[Response]]


class SecurityHeaders:
    """Adds the CSP and friends to every answer, static files and errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def root_path(request: Request) -> str:
    """Where the console is mounted, '' at the root (a host app's Mount, uvicorn --root-path):
    every link, redirect and API address the console writes starts with it."""
    return str(request.scope.get("root_path", "")).rstrip("/")


class OpenOnFirstRequest:
    """Opens the console's resources before its first request when no lifespan did (mounted)."""

    def __init__(self, app: ASGIApp, console: Console) -> None:
        self.app = app
        self.console = console

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.console.is_open:
            await self.console.open()
        await self.app(scope, receive, send)


class Console:
    """The app's resources (Redis, the database, a JobsClient) and its endpoints.

    Served alone, the lifespan opens and closes the resources. Starlette runs no lifespan for
    a mounted app, so a console mounted in a host app opens them on its first request
    (`OpenOnFirstRequest`); the host may close them in its own lifespan with `aclose()`.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.auth = Authenticator(settings)  # raises without CONSOLE_PASSWORD
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"), autoescape=True, enable_async=False
        )
        self._redis: ArqRedis | None = None
        self._jobs: JobsClient | None = None
        self._resources: AsyncExitStack | None = None
        self._opening = asyncio.Lock()

    @property
    def is_open(self) -> bool:
        return self._jobs is not None

    @property
    def redis(self) -> ArqRedis:
        assert self._redis is not None, "the console's resources are not open"
        return self._redis

    @property
    def jobs(self) -> JobsClient:
        assert self._jobs is not None, "the console's resources are not open"
        return self._jobs

    async def open(self) -> None:
        """Open Redis, the database engine and the JobsClient, once, however many ask."""
        async with self._opening:
            if self.is_open:
                return
            async with AsyncExitStack() as resources:
                redis = await arq_pool(self.settings)
                resources.push_async_callback(redis.aclose)
                engine = create_engine(
                    self.settings.database,
                    pool_size=5,
                    pre_ping=True,
                    pooler=self.settings.database_pooler,
                )
                resources.push_async_callback(engine.dispose)
                client = JobsClient(
                    redis=redis, sessions=make_sessionmaker(engine), settings=self.settings
                )
                jobs = await resources.enter_async_context(client)
                # Opened: kept past this block (which closes them only when opening failed).
                self._resources = resources.pop_all()
            self._redis, self._jobs = redis, jobs

    async def aclose(self) -> None:
        resources, self._resources = self._resources, None
        self._redis = self._jobs = None
        if resources is not None:
            await resources.aclose()

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.open()
        try:
            yield
        finally:
            await self.aclose()

    # -- guards -------------------------------------------------------------------------

    def page(self, handler: Handler) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            session = self.auth.session(request)
            if session is None:
                return RedirectResponse(root_path(request) + "/login", status_code=303)
            return await handler(request, session)

        return endpoint

    def api(self, handler: Handler) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            session = self.auth.session(request)
            if session is None:
                return JSONResponse({"error": "not signed in"}, status_code=401)
            return await handler(request, session)

        return endpoint

    async def _checked_post(self, request: Request) -> tuple[Session, FormData] | Response:
        """The POST's session and form, or the 401/403 answer when either check fails."""
        session = self.auth.session(request)
        if session is None:
            return JSONResponse({"error": "not signed in"}, status_code=401)
        form = await request.form()
        submitted = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
        if not csrf_matches(session, submitted if isinstance(submitted, str) else None):
            return JSONResponse({"error": "missing or wrong CSRF token"}, status_code=403)
        return session, form

    def action(self, handler: Callable[[Request, Session], Awaitable[Any]]) -> Endpoint:
        """A POST: session, then CSRF (form field or header), then the change."""

        async def endpoint(request: Request) -> Response:
            checked = await self._checked_post(request)
            if isinstance(checked, Response):
                return checked
            session, form = checked
            try:
                result = await handler(request, session)
            except actions.ActionRefused as exc:
                return JSONResponse({"error": str(exc)}, status_code=409)
            except LookupError as exc:
                return JSONResponse({"error": str(exc)}, status_code=404)
            back = form.get("next")
            # Only a path of this site: `//host` or a scheme would make an open redirect.
            if isinstance(back, str) and back.startswith("/") and not back.startswith("//"):
                return RedirectResponse(back, status_code=303)
            return JSONResponse({"ok": True, **(result or {})})

        return endpoint

    def render(self, request: Request, name: str, session: Session, **context: Any) -> HTMLResponse:
        template = self.templates.get_template(name)
        html = template.render(
            root=root_path(request), csrf_token=session.csrf_token, poll_ms=POLL_MS, **context
        )
        return HTMLResponse(html)

    # -- open routes --------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    async def login_form(self, request: Request) -> Response:
        return self._login_page(request, error=None)

    def _login_page(self, request: Request, error: str | None, **answer: Any) -> HTMLResponse:
        html = self.templates.get_template("login.html").render(
            root=root_path(request), error=error
        )
        return HTMLResponse(html, **answer)

    async def login(self, request: Request) -> Response:
        client = client_of(request)
        locked_s = await self.auth.locked_for_s(self.redis, client)
        if locked_s > 0:
            # Not even checked: a guess made during the lockout tells the guesser nothing.
            return self._login_page(
                request,
                error=f"Too many failed logins: try again in {locked_s:.0f} s.",
                status_code=429,
                headers={"retry-after": str(max(1, round(locked_s)))},
            )
        form = await request.form()
        user, password = form.get("username"), form.get("password")
        if not (
            isinstance(user, str)
            and isinstance(password, str)
            and self.auth.credentials_match(user, password)
        ):
            slowdown_s = await self.auth.login_failed(self.redis, client)
            log.warning("console: failed login from %s", client)
            await asyncio.sleep(slowdown_s)  # each guess costs the guesser more time
            return self._login_page(request, error="Wrong user name or password.", status_code=401)
        await self.auth.login_succeeded(self.redis, client)
        log.info("console: %s signed in from %s", user, client)
        response = RedirectResponse(root_path(request) + "/", status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            self.auth.new_session_cookie(),
            max_age=SESSION_MAX_AGE_S,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def logout(self, request: Request) -> Response:
        checked = await self._checked_post(request)
        if isinstance(checked, Response):
            return checked
        log.info("console: %s signed out", checked[0].user)
        response = RedirectResponse(root_path(request) + "/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict")
        return response

    async def metrics(self, request: Request) -> Response:
        if not self.auth.metrics_allowed(request):
            return PlainTextResponse(
                "sign in, or use HTTP Basic or a bearer token",
                status_code=401,
                headers={"www-authenticate": 'Basic realm="c360 metrics"'},
            )
        body = await render_metrics(self.redis, self.jobs.sessions)
        return Response(body, media_type=METRICS_CONTENT_TYPE)

    # -- pages --------------------------------------------------------------------------

    async def overview_page(self, request: Request, session: Session) -> Response:
        data = observe.overview(await observe.snapshot(self.redis, self.jobs.sessions))
        return self.render(request, "overview.html", session, data=data, api="/api/overview")

    async def workers_page(self, request: Request, session: Session) -> Response:
        data = await self._workers()
        return self.render(request, "workers.html", session, data=data, api="/api/workers")

    async def job_page(self, request: Request, session: Session) -> Response:
        job_id = request.path_params["arq_job_id"]
        data = await reads.job_detail(self.redis, job_id)
        return self.render(request, "job.html", session, data=data, api=f"/api/jobs/{job_id}")

    async def failures_page(self, request: Request, session: Session) -> Response:
        data = await self._failures()
        return self.render(request, "failures.html", session, data=data, api="/api/failures")

    async def imports_page(self, request: Request, session: Session) -> Response:
        data = await self._imports(request)
        return self.render(request, "imports.html", session, data=data, api="/api/imports")

    async def import_page(self, request: Request, session: Session) -> Response:
        import_id = _uuid_param(request, "id")
        data = (
            None if import_id is None else await reads.import_detail(self.jobs.sessions, import_id)
        )
        if data is None:
            return PlainTextResponse("no such import", status_code=404)
        api = f"/api/imports/{import_id}"
        return self.render(
            request, "import.html", session, data=data, api=api, events=f"{api}/events"
        )

    async def exports_page(self, request: Request, session: Session) -> Response:
        data = await self._exports(request)
        return self.render(request, "exports.html", session, data=data, api="/api/exports")

    async def export_download(self, request: Request, session: Session) -> Response:
        export_id = _uuid_param(request, "id")
        try:
            url = await self.jobs.export_url(export_id or uuid.UUID(int=0), expires_s=300)
        except LookupError as exc:
            return PlainTextResponse(str(exc), status_code=404)
        log.info("console: %s downloaded export %s", session.user, export_id)
        return RedirectResponse(url, status_code=303)

    async def email_page(self, request: Request, session: Session) -> Response:
        data = await self._email(request)
        return self.render(request, "email.html", session, data=data, api="/api/email")

    async def cron_page(self, request: Request, session: Session) -> Response:
        data = {"crons": await reads.crons(self.redis, self.settings)}
        return self.render(request, "cron.html", session, data=data, api="/api/cron")

    # -- JSON -----------------------------------------------------------------------------

    async def _workers(self) -> dict[str, Any]:
        status = await observe.redis_status(self.redis, _now_ms())
        workers = []
        for queue, state in status["queues"].items():
            running: dict[str, list[str]] = {}
            for job in state["running_jobs"]:
                running.setdefault(job["worker"], []).append(job["job_id"])
            for worker in state["workers"]:
                workers.append(
                    {
                        "queue": queue,
                        **{field: worker[field] for field in WORKER_FIELDS},
                        "rss_mb": None
                        if worker["rss_bytes"] is None
                        else round(worker["rss_bytes"] / BYTES_PER_MB, 1),
                        "report": worker["info"],
                        "running": running.get(worker["worker"], []),
                    }
                )
        return {"workers": workers}

    async def _failures(self) -> dict[str, Any]:
        return {"groups": reads.group_failures(await reads.recent_failures(self.redis))}

    async def _imports(self, request: Request) -> dict[str, Any]:
        query = request.query_params
        return await reads.imports_page(
            self.jobs.sessions, query.get("status"), reads.page_of(query.get("page"))
        )

    async def _exports(self, request: Request) -> dict[str, Any]:
        query = request.query_params
        return await reads.exports_page(
            self.jobs.sessions, query.get("status"), reads.page_of(query.get("page"))
        )

    async def _email(self, request: Request) -> dict[str, Any]:
        page = reads.page_of(request.query_params.get("page"))
        return await reads.email_page(self.jobs.sessions, self.redis, self.settings, page)

    async def api_overview(self, request: Request, session: Session) -> Response:
        return JSONResponse(
            observe.overview(await observe.snapshot(self.redis, self.jobs.sessions))
        )

    async def api_workers(self, request: Request, session: Session) -> Response:
        return JSONResponse(await self._workers())

    async def api_job(self, request: Request, session: Session) -> Response:
        return JSONResponse(await reads.job_detail(self.redis, request.path_params["arq_job_id"]))

    async def api_failures(self, request: Request, session: Session) -> Response:
        return JSONResponse(await self._failures())

    async def api_imports(self, request: Request, session: Session) -> Response:
        return JSONResponse(await self._imports(request))

    async def api_import(self, request: Request, session: Session) -> Response:
        import_id = _uuid_param(request, "id")
        data = (
            None if import_id is None else await reads.import_detail(self.jobs.sessions, import_id)
        )
        if data is None:
            return JSONResponse({"error": "no such import"}, status_code=404)
        return JSONResponse(data)

    async def api_import_events(self, request: Request, session: Session) -> Response:
        import_id = _uuid_param(request, "id")
        if import_id is None or await reads.import_detail(self.jobs.sessions, import_id) is None:
            return JSONResponse({"error": "no such import"}, status_code=404)
        return events.import_events(request, self.jobs.sessions, import_id)

    async def api_exports(self, request: Request, session: Session) -> Response:
        return JSONResponse(await self._exports(request))

    async def api_email(self, request: Request, session: Session) -> Response:
        return JSONResponse(await self._email(request))

    async def api_cron(self, request: Request, session: Session) -> Response:
        return JSONResponse({"crons": await reads.crons(self.redis, self.settings)})

    # -- actions --------------------------------------------------------------------------

    async def cancel_import(self, request: Request, session: Session) -> dict[str, Any]:
        status = await actions.cancel_import(self.jobs, _required_uuid(request), session.user)
        return {"status": status.status}

    async def retry_import(self, request: Request, session: Session) -> dict[str, Any]:
        await actions.retry_import(
            self.jobs.sessions, self.redis, _required_uuid(request), session.user
        )
        return {}

    async def retry_export(self, request: Request, session: Session) -> dict[str, Any]:
        await actions.retry_export(
            self.jobs.sessions, self.redis, _required_uuid(request), session.user
        )
        return {}

    async def mark_email_sent(self, request: Request, session: Session) -> dict[str, Any]:
        await actions.mark_email_sent(self.jobs.sessions, _required_uuid(request), session.user)
        return {}

    async def send_email_again(self, request: Request, session: Session) -> dict[str, Any]:
        await actions.send_email_again(
            self.jobs.sessions, self.redis, _required_uuid(request), session.user
        )
        return {}


def _uuid_param(request: Request, name: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(request.path_params[name]))
    except ValueError:
        return None


def _required_uuid(request: Request) -> uuid.UUID:
    found = _uuid_param(request, "id")
    if found is None:
        raise actions.ActionRefused(f"not an id: {str(request.path_params['id'])[:64]!r}")
    return found


def _now_ms() -> int:
    return int(time.time() * 1000)


def create_app(settings: Settings) -> Starlette:
    """The console as an ASGI app; raises `ConsoleNotConfigured` without CONSOLE_PASSWORD."""
    c = Console(settings)
    routes = [
        Route("/healthz", c.healthz),
        Route("/login", c.login_form, methods=["GET"]),
        Route("/login", c.login, methods=["POST"]),
        Route("/logout", c.logout, methods=["POST"]),
        Route("/metrics", c.metrics),
        Route("/", c.page(c.overview_page)),
        Route("/workers", c.page(c.workers_page)),
        Route("/jobs/{arq_job_id:path}", c.page(c.job_page)),
        Route("/failures", c.page(c.failures_page)),
        Route("/imports", c.page(c.imports_page)),
        Route("/imports/{id}", c.page(c.import_page)),
        Route("/exports", c.page(c.exports_page)),
        Route("/exports/{id}/download", c.page(c.export_download)),
        Route("/email", c.page(c.email_page)),
        Route("/cron", c.page(c.cron_page)),
        Route("/api/overview", c.api(c.api_overview)),
        Route("/api/workers", c.api(c.api_workers)),
        Route("/api/jobs/{arq_job_id:path}", c.api(c.api_job)),
        Route("/api/failures", c.api(c.api_failures)),
        Route("/api/imports", c.api(c.api_imports)),
        Route("/api/imports/{id}", c.api(c.api_import)),
        Route("/api/imports/{id}/events", c.api(c.api_import_events)),
        Route("/api/imports/{id}/cancel", c.action(c.cancel_import), methods=["POST"]),
        Route("/api/imports/{id}/retry", c.action(c.retry_import), methods=["POST"]),
        Route("/api/exports", c.api(c.api_exports)),
        Route("/api/exports/{id}/retry", c.action(c.retry_export), methods=["POST"]),
        Route("/api/email", c.api(c.api_email)),
        Route("/api/email/{id}/mark-sent", c.action(c.mark_email_sent), methods=["POST"]),
        Route("/api/email/{id}/send-again", c.action(c.send_email_again), methods=["POST"]),
        Route("/api/cron", c.api(c.api_cron)),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [Middleware(SecurityHeaders), Middleware(OpenOnFirstRequest, console=c)]
    app = Starlette(routes=routes, middleware=middleware, lifespan=c.lifespan)
    app.state.console = c
    return app
