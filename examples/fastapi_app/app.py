"""The reference FastAPI app: how a web app starts imports and email and shows their progress.

    uvicorn --factory examples.fastapi_app.app:create_app --no-access-log

One `JobsClient` per process, opened by the lifespan and closed at shutdown, reaches every
route through `Depends(get_jobs)`. The public app (unsubscribe and confirmation links, provider
webhooks) is mounted at the root on that same client. Routes (all JSON but the SSE stream):

- `POST /imports`: a raw CSV body (`Content-Type: text/csv`) or a form's file field `file`,
  streamed to `IMPORT_DIR/<user_id>/<uuid>.csv`, then enqueued; 202 with the import's status.
- `GET /imports/{id}`, `GET /imports/{id}/events` (SSE), `GET /imports/{id}/errors`,
  `POST /imports/{id}/cancel`: only the signed-in user's imports; any other id is 404.
- `POST /emails/welcome`: the signed-in user's welcome email. `POST /waitlist`: a sign-up.

Paths under the mounted public app carry signed tokens: run the server without an access log.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from db.models import User
from examples.fastapi_app import events, multipart, uploads
from worker.client import EnqueuedJob, ImportRowError, ImportStatus, JobsClient, WaitlistSignup
from worker.import_source import user_import_dir
from worker.settings import Settings
from worker.tokens import MissingSecretKey
from worker.web import public

log = logging.getLogger(__name__)

# The uploaded file was stored but could not become an import (the server's IMPORT_DIR layout
# refused it, e.g. a user directory that is a symlink): the reason names server paths, so the
# client gets this and the log gets the reason.
UPLOAD_REFUSED = (
    "the upload was received but could not be queued as an import, and nothing was created; "
    "try again, and if it keeps failing, report it to the site's operator"
)
# What a browser or curl sends for a .csv, and Excel's tab-separated "Unicode text" (.txt).
CSV_MEDIA_TYPES = frozenset(
    {"text/csv", "application/csv", "text/plain", "text/tab-separated-values"}
)
CSV_BODY_DOC = {
    "content": {
        "text/csv": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {multipart.FILE_FIELD: {"type": "string", "format": "binary"}},
                "required": [multipart.FILE_FIELD],
            }
        },
    }
}


def get_jobs(request: Request) -> JobsClient:
    """The process's one client, opened by the lifespan."""
    jobs = getattr(request.app.state, "jobs", None)
    if not isinstance(jobs, JobsClient):
        raise RuntimeError("the app's lifespan has not run: serve it with uvicorn or similar")
    return jobs


Jobs = Annotated[JobsClient, Depends(get_jobs)]


async def current_user(jobs: Jobs, x_user_id: Annotated[str | None, Header()] = None) -> uuid.UUID:
    """STAND-IN FOR REAL AUTHENTICATION: the user is whoever the `X-User-Id` header names.

    Anyone can send any header, so a real app takes the user from its session or token
    instead. The stand-in still insists on the id of an existing user, so what follows (the
    owner checks in JobsClient) sees exactly what it would behind real sign-in.
    """
    try:
        user_id = uuid.UUID(x_user_id or "")
    except ValueError:
        user_id = None
    if user_id is not None:
        async with jobs.sessions() as session:
            if await session.get(User, user_id) is not None:
                return user_id
    raise HTTPException(HTTPStatus.UNAUTHORIZED, "not signed in: send X-User-Id with a user's id")


UserId = Annotated[uuid.UUID, Depends(current_user)]


def _no_import(import_id: uuid.UUID) -> HTTPException:
    # Another user's import and an unknown id read the same, so ids cannot be probed.
    return HTTPException(HTTPStatus.NOT_FOUND, f"no import {import_id}")


class WaitlistJoin(BaseModel):
    email: str
    name: str | None = None


class PublicMount:
    """The public app, built by the lifespan around the app's client; mounted at the root.

    A mounted app's own lifespan never runs, so the public app borrows the host's client,
    which exists only once the host's lifespan has opened it.
    """

    def __init__(self) -> None:
        self.app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is None:
            raise RuntimeError("the app's lifespan has not run: serve it with uvicorn or similar")
        await self.app(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    *,
    max_upload_bytes: int = uploads.DEFAULT_MAX_UPLOAD_BYTES,
    events_poll_s: float = events.DEFAULT_POLL_S,
) -> FastAPI:
    """The app; `Settings()` from the environment when none is given. Needs SECRET_KEY."""
    settings = settings if settings is not None else Settings()
    if settings.secret_key is None:  # here, not at the first request: the public app needs it
        raise MissingSecretKey("the app needs SECRET_KEY: it checks the signed links in email")
    mounted = PublicMount()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with JobsClient.from_settings(settings) as jobs:
            app.state.jobs = jobs
            mounted.app = public.create_app(settings, jobs=jobs)
            try:
                yield
            finally:
                mounted.app = None
                del app.state.jobs

    app = FastAPI(title="Contact360 reference app", lifespan=lifespan)

    @app.post(
        "/imports",
        status_code=HTTPStatus.ACCEPTED,
        openapi_extra={"requestBody": {**CSV_BODY_DOC, "required": True}},
    )
    async def start_import(request: Request, jobs: Jobs, user_id: UserId) -> ImportStatus:
        """Stream the CSV body to the user's import directory and enqueue its import."""
        content_type = request.headers.get("content-type", "")
        media_type = content_type.partition(";")[0].strip().lower()
        if media_type == "multipart/form-data":
            body = multipart.file_chunks(request.stream(), content_type)
        elif media_type in CSV_MEDIA_TYPES:
            body = request.stream()
        else:
            raise HTTPException(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                "send the CSV as the body (Content-Type: text/csv) or as the form field 'file'",
            )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_upload_bytes:
            raise uploads.too_large(max_upload_bytes)  # before a byte of it is read
        directory = user_import_dir(jobs.settings, user_id)
        try:
            path = await uploads.save_upload(body, directory, max_upload_bytes)
        except ClientDisconnect:  # the partial file is gone; nobody reads this answer
            raise HTTPException(HTTPStatus.BAD_REQUEST, "the upload was cut off") from None
        try:
            return await jobs.import_contacts(user_id, str(path))
        except ValueError as error:  # refused before anything was created: the file goes too
            await uploads.remove(path)
            # The reason names server paths (IMPORT_DIR): the log has it, the client does not.
            log.warning("upload %s refused as an import source: %s", path.name, error)
            raise HTTPException(HTTPStatus.BAD_REQUEST, UPLOAD_REFUSED) from None
        # Any other error keeps the file: the import's row may be committed already (a failed
        # enqueue), and the worker's reconciler then enqueues it from PostgreSQL.

    @app.get("/imports/{import_id}")
    async def import_status(import_id: uuid.UUID, jobs: Jobs, user_id: UserId) -> ImportStatus:
        try:
            return await jobs.import_status(import_id, user_id=user_id)
        except LookupError:
            raise _no_import(import_id) from None

    @app.get("/imports/{import_id}/events", response_class=StreamingResponse)
    async def import_events(import_id: uuid.UUID, jobs: Jobs, user_id: UserId) -> StreamingResponse:
        """Server-sent events: the status at each change, then `end` when the import ends."""
        try:
            await jobs.import_status(import_id, user_id=user_id)  # 404 now, not in the stream
        except LookupError:
            raise _no_import(import_id) from None
        return StreamingResponse(
            events.import_events(jobs, import_id, user_id, events_poll_s),
            media_type="text/event-stream",
            # No buffering by nginx-like proxies, so each event arrives when it is sent.
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    @app.get("/imports/{import_id}/errors")
    async def import_errors(
        import_id: uuid.UUID,
        jobs: Jobs,
        user_id: UserId,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[ImportRowError]:
        """The rejected rows, by row number."""
        try:
            return await jobs.import_errors(import_id, limit, user_id=user_id)
        except LookupError:
            raise _no_import(import_id) from None

    @app.post("/imports/{import_id}/cancel")
    async def cancel_import(import_id: uuid.UUID, jobs: Jobs, user_id: UserId) -> ImportStatus:
        """Stop the import: a pending one at once, a running one at its next batch."""
        try:
            return await jobs.cancel_import(import_id, user_id=user_id)
        except LookupError:
            raise _no_import(import_id) from None

    @app.post("/emails/welcome", status_code=HTTPStatus.ACCEPTED)
    async def send_welcome(jobs: Jobs, user_id: UserId) -> EnqueuedJob:
        """The user's welcome email (once per user: a repeat sends nothing more)."""
        return await jobs.send_welcome_email(user_id)

    @app.post("/waitlist", status_code=HTTPStatus.ACCEPTED)
    async def join_waitlist(signup: WaitlistJoin, jobs: Jobs) -> WaitlistSignup:
        """A public sign-up; the confirmation email follows (WAITLIST_CONFIRM)."""
        try:
            return await jobs.join_waitlist(signup.email, signup.name)
        except ValueError as error:
            raise HTTPException(HTTPStatus.UNPROCESSABLE_ENTITY, str(error)) from None

    # Last: a mount at the root matches every path, so the routes above must come first.
    app.mount("/", mounted)
    return app
