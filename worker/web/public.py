"""The public web app (CONTRACT §13): the pages our email links to, for anyone with the link.

    app = create_app(settings)                  # serves alone, opens its own JobsClient
    app = create_app(settings, jobs=jobs)       # mounted in a web app, on that app's client
    host.mount("/", app)                        # Starlette/FastAPI: at the root, the links'
                                                # paths are /email/... and /waitlist/...

Routes, each keyed by a signed token (worker/tokens.py), so no session or CSRF token exists:
the link itself is the credential, and it can only act on the one entry it names.

- `GET /email/unsubscribe/{token}`: a page with a button (400 for a bad token); changes
  nothing, because mail scanners and link previews fetch every link in a message.
- `POST /email/unsubscribe/{token}`: unsubscribes (RFC 8058 one-click, whose body is
  `List-Unsubscribe=One-Click`, or the page's button, which sends the same). 200 also when
  already unsubscribed; a bad token 400, and nothing changes.
- `GET /waitlist/confirm/{token}`: a page with a button; `POST`: confirms the sign-up.

A mounted app does not get its own lifespan run by most hosts (Starlette runs only the
outer app's), so pass the host's `JobsClient` as `jobs=`. Needs SECRET_KEY (create_app raises
`MissingSecretKey` without it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment, FileSystemLoader
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from jobs.email.drafts import ONE_CLICK
from worker import tokens
from worker.client import JobsClient
from worker.settings import Settings
from worker.tokens import MissingSecretKey
from worker.web.console import SecurityHeaders
from worker.web.webhooks import webhook_routes

HERE = Path(__file__).parent
# A one-click body is 26 bytes; the page's form sends the same. Nothing in it is needed (the
# token authorises), so a larger body is not read at all.
MAX_BODY_BYTES = 1024
FIELD_NAME, _, FIELD_VALUE = ONE_CLICK.partition("=")


class PublicApp:
    """The app's client (borrowed, or opened by its lifespan) and its endpoints."""

    def __init__(self, settings: Settings, jobs: JobsClient | None) -> None:
        if settings.secret_key is None:
            raise MissingSecretKey(
                "the public app needs SECRET_KEY: it checks the signed links in our email"
            )
        self.settings = settings
        self._jobs = jobs
        self.templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True)

    @property
    def jobs(self) -> JobsClient:
        if self._jobs is None:
            raise RuntimeError(
                "the public app has no JobsClient: pass create_app(settings, jobs=...) when "
                "mounting it, or serve it alone (python -m worker public)"
            )
        return self._jobs

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self._jobs is not None:  # borrowed: the host opens and closes it
            yield
            return
        async with JobsClient.from_settings(self.settings) as jobs:
            self._jobs = jobs
            try:
                yield
            finally:
                self._jobs = None

    def page(self, status: int, title: str, message: str, button: str | None = None) -> Response:
        html = self.templates.get_template("public_page.html").render(
            title=title,
            message=message,
            button=button,
            field_name=FIELD_NAME,
            field_value=FIELD_VALUE,
        )
        return HTMLResponse(html, status_code=status)

    def bad_link(self) -> Response:
        return self.page(
            400,
            "This link does not work",
            "It may have been copied incompletely, or it has expired. Nothing was changed.",
        )

    def routes(self, link: Link) -> list[BaseRoute]:
        """`GET` (a page with a button, changing nothing) and `POST` (acts) for one link kind."""

        async def ask(request: Request) -> Response:
            # Only the signature: a dead link must not show a button that then fails.
            token = request.path_params["token"]
            if tokens.read_token(link.purpose, token, self.settings.secret_key) is None:
                return self.bad_link()
            return self.page(200, link.ask_title, link.ask_message, button=link.button)

        async def act(request: Request) -> Response:
            await _drain(request)
            if not await link.act(self.jobs, request.path_params["token"]):
                return self.bad_link()
            return self.page(200, link.done_title, link.done_message)

        path = link.purpose.path + "{token}"
        return [Route(path, ask, methods=["GET"]), Route(path, act, methods=["POST"])]


@dataclass(frozen=True, slots=True)
class Link:
    """One kind of signed link: its purpose, its page's words and what its POST does."""

    purpose: tokens.Purpose
    ask_title: str
    ask_message: str
    button: str
    done_title: str
    done_message: str
    act: Callable[[JobsClient, str], Awaitable[bool]]


UNSUBSCRIBE = Link(
    tokens.UNSUBSCRIBE,
    "Unsubscribe",
    "Stop the Contact360 waitlist emails to this address?",
    "Unsubscribe",
    "You are unsubscribed",
    "We will send no more waitlist emails.",
    JobsClient.unsubscribe,
)
CONFIRM_WAITLIST = Link(
    tokens.CONFIRM_WAITLIST,
    "Confirm your place",
    "Confirm that you want to join the Contact360 waitlist with this address.",
    "Confirm",
    "You are on the waitlist",
    "We will write when your spot opens.",
    JobsClient.confirm_waitlist,
)


async def _drain(request: Request) -> None:
    """Read at most MAX_BODY_BYTES of the body, and ignore it: the token is what counts.

    RFC 8058 clients send `List-Unsubscribe=One-Click` as urlencoded or multipart form data
    (§3.1, and the examples in §8); either way the POST itself is the request.
    """
    read = 0
    async for chunk in request.stream():
        read += len(chunk)
        if read > MAX_BODY_BYTES:
            break


def create_app(settings: Settings, *, jobs: JobsClient | None = None) -> Starlette:
    """The public app as an ASGI app; raises `MissingSecretKey` without SECRET_KEY."""
    app_ = PublicApp(settings, jobs)
    # Provider webhooks share the app, its client and its security headers.
    routes = [
        *app_.routes(UNSUBSCRIBE),
        *app_.routes(CONFIRM_WAITLIST),
        *webhook_routes(settings, lambda: app_.jobs),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)], lifespan=app_.lifespan)
    app.state.public = app_
    return app
