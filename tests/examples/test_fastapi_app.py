"""The reference FastAPI app over real HTTP (uvicorn), on real PostgreSQL, Redis and workers.

Uploads are sent as generator bodies of many chunks (chunked transfer, no Content-Length), the
way a large file arrives, and the tests watch the app's partial file on disk while it arrives.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import Contact, ContactImportJob, EmailMessage, EmailSuppression, WaitlistEntry
from examples.fastapi_app.app import UPLOAD_REFUSED, create_app
from examples.fastapi_app.multipart import MAX_PART_HEADER_BYTES
from examples.fastapi_app.uploads import FLUSH_BYTES, PARTIAL_SUFFIX
from tests.conftest import RunBurst
from tests.support.asgi_server import serve_asgi
from tests.support.users import new_user
from worker.import_source import user_import_dir
from worker.settings import Settings
from worker.tokens import UNSUBSCRIBE, MissingSecretKey, make_token

KEY = SecretStr("a-fastapi-example-test-key-of-32-chars+")
CSV = {"content-type": "text/csv"}
ROWS = 12_000
# Every 1000th row (from the 8th) has no valid email: a row error, not a stopped import.
BAD_ROW_EVERY = 1000
CHUNK_BYTES = 16 * 1024
# Bounds on waiting for what must happen, so a broken app fails the test instead of hanging it.
DEADLINE_S = 30.0

Sessions = async_sessionmaker[AsyncSession]
Serve = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def serve(settings: Settings) -> Serve:
    """`async with serve(max_upload_bytes=...) as http:` the app on uvicorn, and a client."""

    @asynccontextmanager
    async def run(**options: Any) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(settings.model_copy(update={"secret_key": KEY}), **options)
        async with (
            serve_asgi(app) as base_url,
            httpx.AsyncClient(base_url=base_url, timeout=DEADLINE_S) as http,
        ):
            yield http

    return run


def as_user(user_id: uuid.UUID) -> dict[str, str]:
    return {"x-user-id": str(user_id)}


def contacts_csv(rows: int) -> bytes:
    lines = ["Email,First Name,City,Notes"]
    for i in range(rows):
        email = f"not-an-email-{i}" if i % BAD_ROW_EVERY == 7 else f"person{i}@example.com"
        lines.append(f"{email},Name {i},City {i % 50},{'n' * 40}")
    return ("\n".join(lines) + "\n").encode()


def files_in(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.exists() else []


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():
        assert loop.time() < deadline, f"gave up waiting: {what}"
        await asyncio.sleep(0.01)


async def watched_upload(
    data: bytes, directory: Path, chunk_bytes: int = CHUNK_BYTES, overhead_bytes: int = 0
) -> AsyncIterator[bytes]:
    """`data` in chunks; before each next chunk, the app must have written what it was sent.

    An app that held the body in memory until the end would never get the partial file to
    grow while the upload is under way: this generator then fails instead of sending on.
    `overhead_bytes`: what the body holds besides the file (a form's parts and boundaries).
    """
    for start in range(0, len(data), chunk_bytes):
        yield data[start : start + chunk_bytes]
        sent = start + chunk_bytes - overhead_bytes
        if sent < 2 * FLUSH_BYTES:
            continue

        def written_enough(sent: int = sent) -> bool:
            partial = [p for p in files_in(directory) if p.name.endswith(PARTIAL_SUFFIX)]
            # Whole only at the end: no finished .csv may appear while bytes are still coming.
            assert all(p.name.endswith(PARTIAL_SUFFIX) for p in files_in(directory))
            return len(partial) == 1 and partial[0].stat().st_size >= sent - FLUSH_BYTES

        await wait_for(written_enough, f"the partial file to hold {sent - FLUSH_BYTES} bytes")


async def read_events(http: httpx.AsyncClient, url: str, user_id: uuid.UUID) -> list[Any]:
    """The `data:` payloads of an SSE stream, until its `end` event (which must come)."""
    received: list[Any] = []
    async with http.stream("GET", url, headers=as_user(user_id)) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        event = "message"
        async for line in answer.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "end":
                return received
            elif line.startswith("data: "):
                received.append(json.loads(line.removeprefix("data: ")))
            elif not line:
                event = "message"
    raise AssertionError(f"the stream closed without an end event, after {received}")


async def test_a_streamed_upload_is_imported_and_progress_is_polled_and_streamed(
    serve: Serve, settings: Settings, sessions: Sessions, run_burst: RunBurst
) -> None:
    user_id = await new_user(sessions)
    directory = user_import_dir(settings, user_id)
    data = contacts_csv(ROWS)
    bad_rows = len(range(7, ROWS, BAD_ROW_EVERY))
    async with serve(events_poll_s=0.02) as http:
        answer = await http.post(
            "/imports",
            content=watched_upload(data, directory),
            headers={**CSV, **as_user(user_id)},
        )
        assert answer.status_code == 202, answer.text
        started = answer.json()
        assert started["status"] == "pending"
        import_id = started["id"]
        (stored,) = files_in(directory)  # the upload, renamed whole; no partial file is left
        assert stored.suffix == ".csv" and stored.read_bytes() == data

        url = f"/imports/{import_id}"
        polled = (await http.get(url, headers=as_user(user_id))).json()
        assert (polled["status"], polled["processed_rows"]) == ("pending", 0)
        stream = asyncio.create_task(read_events(http, f"{url}/events", user_id))
        await run_burst("imports")
        events = await asyncio.wait_for(stream, DEADLINE_S)
        polled = (await http.get(url, headers=as_user(user_id))).json()
        errors = await http.get(f"{url}/errors", params={"limit": 5}, headers=as_user(user_id))

    final = {
        "status": "completed",
        "total_rows": ROWS,
        "processed_rows": ROWS,
        "created_count": ROWS - bad_rows,
        "updated_count": 0,
        "error_count": bad_rows,
        "percent": 100.0,
    }
    assert {k: polled[k] for k in final} == final
    assert events[-1] == polled
    assert events[0]["status"] in ("pending", "processing")
    # One event per change: no two alike in a row, and progress only moves forward.
    assert all(a != b for a, b in itertools.pairwise(events))
    done = [event["processed_rows"] for event in events]
    assert done == sorted(done)
    assert [e["row_number"] for e in errors.json()] == [i + 2 for i in range(7, 5000, 1000)]
    assert "email" in errors.json()[0]["message"]
    async with sessions() as session:
        stored_rows = await session.scalar(
            select(func.count()).select_from(Contact).where(Contact.user_id == user_id)
        )
        assert stored_rows == ROWS - bad_rows
        source = await session.scalar(select(ContactImportJob.file_path))
    assert source == str(stored)


def form(boundary: str, *parts: tuple[str, str | None, bytes]) -> bytes:
    """A multipart/form-data body of (field name, file name or None, value) parts."""
    body = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        kind = "\r\nContent-Type: text/csv" if filename else ""
        body += f"--{boundary}\r\nContent-Disposition: {disposition}{kind}\r\n\r\n".encode()
        body += value + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


async def test_a_form_upload_streams_its_file_field_alone(
    serve: Serve, settings: Settings, sessions: Sessions
) -> None:
    user_id = await new_user(sessions)
    directory = user_import_dir(settings, user_id)
    data = contacts_csv(ROWS)
    boundary = "c360-test-boundary-7MA4YWxkTrZu0gW"
    body = form(boundary, ("note", None, b"my contacts"), ("file", "c.csv", data), ("x", None, b""))
    multipart = {"content-type": f"multipart/form-data; boundary={boundary}", **as_user(user_id)}
    async with serve() as http:
        # An odd chunk size, so boundaries and part headers fall across chunks.
        chunks = watched_upload(
            body, directory, chunk_bytes=997, overhead_bytes=len(body) - len(data)
        )
        answer = await http.post("/imports", content=chunks, headers=multipart)
        assert answer.status_code == 202, answer.text
        (stored,) = files_in(directory)
        assert stored.read_bytes() == data  # the file field's bytes, and nothing else
        stored.unlink()
        # httpx's own form encoder, as a browser's form would send it.
        encoded = await http.post(
            "/imports", files={"file": ("c.csv", data, "text/csv")}, headers=as_user(user_id)
        )
        assert encoded.status_code == 202, encoded.text
        (stored,) = files_in(directory)
        stored.unlink()

        for refused in (
            form(boundary, ("note", None, b"no file here")),
            form(boundary, ("file", "a.csv", data[:100]), ("file", "b.csv", data[:100])),
            form(boundary, ("file", "a.csv", data))[:-200],  # cut short
            form(boundary, ("note", None, b"n" * 70_000), ("file", "a.csv", data)),
        ):
            answer = await http.post("/imports", content=refused, headers=multipart)
            assert answer.status_code == 400, answer.text
            assert "form" in answer.json()["detail"]
            assert files_in(directory) == []
        no_boundary = {"content-type": "multipart/form-data", **as_user(user_id)}
        answer = await http.post("/imports", content=form(boundary), headers=no_boundary)
        assert answer.status_code == 400
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(ContactImportJob)) == 2


async def test_another_users_import_is_404_and_left_alone(serve: Serve, sessions: Sessions) -> None:
    owner, other = await new_user(sessions), await new_user(sessions)
    async with serve() as http:
        answer = await http.post(
            "/imports", content=contacts_csv(3), headers={**CSV, **as_user(owner)}
        )
        assert answer.status_code == 202, answer.text
        url = f"/imports/{answer.json()['id']}"
        for method, path in (
            ("GET", url),
            ("GET", f"{url}/events"),
            ("GET", f"{url}/errors"),
            ("POST", f"{url}/cancel"),
        ):
            theirs = await http.request(method, path, headers=as_user(other))
            assert theirs.status_code == 404, (method, path, theirs.text)
            unknown = path.replace(url, f"/imports/{uuid.uuid4()}")
            assert (await http.request(method, unknown, headers=as_user(owner))).status_code == 404
        assert (await http.get(url, headers=as_user(owner))).json()["status"] == "pending"

        # The sign-in stand-in: no header, not a UUID, or no such user.
        for headers in ({}, {"x-user-id": "admin"}, as_user(uuid.uuid4())):
            assert (await http.get(url, headers=headers)).status_code == 401
        refused = await http.post("/imports", content=b"email\na@b.io\n", headers=as_user(owner))
        assert refused.status_code == 415  # no CSV content type

        cancelled = await http.post(f"{url}/cancel", headers=as_user(owner))
        assert cancelled.json()["status"] == "cancelled"
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(ContactImportJob)) == 1


async def test_an_upload_over_the_cap_is_413_and_leaves_no_file(
    serve: Serve, settings: Settings, sessions: Sessions
) -> None:
    user_id = await new_user(sessions)
    directory = user_import_dir(settings, user_id)
    cap_bytes = 4 * FLUSH_BYTES
    data = contacts_csv(40_000)
    assert len(data) > 2 * cap_bytes

    async def chunks(body: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(body), CHUNK_BYTES):
            yield body[start : start + CHUNK_BYTES]

    headers = {**CSV, **as_user(user_id)}
    async with serve(max_upload_bytes=cap_bytes) as http:
        streamed = await http.post("/imports", content=chunks(data), headers=headers)
        assert streamed.status_code == 413, streamed.text
        assert files_in(directory) == []
        declared = await http.post("/imports", content=data[: cap_bytes + 1], headers=headers)
        assert declared.status_code == 413  # by its Content-Length, before reading it
        empty = await http.post("/imports", content=b"", headers=headers)
        assert empty.status_code == 400
        assert files_in(directory) == []
        exact = await http.post("/imports", content=chunks(data[:cap_bytes]), headers=headers)
        assert exact.status_code == 202, exact.text
    assert [p.stat().st_size for p in files_in(directory)] == [cap_bytes]
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(ContactImportJob)) == 1


async def test_an_upload_cut_off_midway_leaves_no_file(
    serve: Serve, settings: Settings, sessions: Sessions
) -> None:
    user_id = await new_user(sessions)
    directory = user_import_dir(settings, user_id)
    data = contacts_csv(ROWS)

    class Gone(Exception):
        pass

    async def cut_off() -> AsyncIterator[bytes]:
        for start in range(0, 4 * FLUSH_BYTES, CHUNK_BYTES):
            yield data[start : start + CHUNK_BYTES]
        await wait_for(lambda: bool(files_in(directory)), "the partial file")
        raise Gone  # the client dies: httpx drops the connection mid-body

    async with serve() as http:
        with pytest.raises(Gone):
            await http.post("/imports", content=cut_off(), headers={**CSV, **as_user(user_id)})
        await wait_for(lambda: not files_in(directory), "the partial file to be removed")
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(ContactImportJob)) == 0


async def test_unsubscribe_round_trip_through_the_mounted_public_app(
    serve: Serve, sessions: Sessions
) -> None:
    entry_id = uuid.uuid4()
    async with sessions.begin() as session:
        session.add(WaitlistEntry(id=entry_id, email="ada@example.com"))
    token = make_token(UNSUBSCRIBE, entry_id, KEY)
    forged = make_token(UNSUBSCRIBE, entry_id, SecretStr("another-key-that-is-32-chars-long!!"))

    async def unsubscribed() -> bool:
        async with sessions() as session:
            entry = await session.get(WaitlistEntry, entry_id)
            assert entry is not None
            return entry.unsubscribed_at is not None

    one_click = {"List-Unsubscribe": "One-Click"}
    async with serve() as http:
        page = await http.get(f"/email/unsubscribe/{token}")
        assert page.status_code == 200
        assert "<form" in page.text and "Unsubscribe" in page.text
        assert not await unsubscribed()  # a prefetched link changes nothing
        assert (await http.get(f"/email/unsubscribe/{forged}")).status_code == 400
        assert (await http.post(f"/email/unsubscribe/{forged}", data=one_click)).status_code == 400
        assert not await unsubscribed()
        done = await http.post(f"/email/unsubscribe/{token}", data=one_click)
        assert done.status_code == 200
        assert await unsubscribed()
        again = await http.post(f"/email/unsubscribe/{token}", data=one_click)
        assert again.status_code == 200  # one-click clients may post twice
    async with sessions() as session:
        reasons = (await session.scalars(select(EmailSuppression.reason))).all()
    assert reasons == ["unsubscribe"]


async def test_waitlist_sign_up_and_welcome_email_are_enqueued(
    serve: Serve, sessions: Sessions
) -> None:
    user_id = await new_user(sessions, email="grace@example.com")
    async with serve() as http:
        joined = await http.post("/waitlist", json={"email": " Ada@Example.com ", "name": "Ada"})
        assert joined.status_code == 202, joined.text
        assert (joined.json()["email"], joined.json()["created"]) == ("ada@example.com", True)
        bad = await http.post("/waitlist", json={"email": "not-an-address", "name": "Ada"})
        assert bad.status_code == 422
        assert "email" in bad.json()["detail"]
        welcome = await http.post("/emails/welcome", headers=as_user(user_id))
        assert welcome.status_code == 202, welcome.text
        assert welcome.json()["job_id"]
        assert (await http.post("/emails/welcome")).status_code == 401
    async with sessions() as session:
        assert (await session.scalars(select(WaitlistEntry.email))).all() == ["ada@example.com"]
        assert (await session.scalars(select(EmailMessage.to_email))).all() == ["grace@example.com"]


def test_without_secret_key_the_app_refuses_to_start(settings: Settings) -> None:
    with pytest.raises(MissingSecretKey, match="SECRET_KEY"):
        create_app(settings.model_copy(update={"secret_key": None}))


async def test_part_headers_past_their_cap_are_400_and_leave_no_file(
    serve: Serve, settings: Settings, sessions: Sessions
) -> None:
    user_id = await new_user(sessions)
    directory = user_import_dir(settings, user_id)
    boundary = "c360-test-boundary-Hd83"
    multipart = {"content-type": f"multipart/form-data; boundary={boundary}", **as_user(user_id)}
    data = contacts_csv(3)
    # Each header line short enough for any parser's own per-line limit (python-multipart's
    # is 4 KiB from 0.0.2x on, none before): only their sum passes the cap.
    line_bytes = 3000
    count = MAX_PART_HEADER_BYTES // line_bytes + 1
    long_names = [f"X-{'n' * line_bytes}-{n}: v" for n in range(count)]
    long_values = [f"X-Note-{n}: {'v' * line_bytes}" for n in range(count)]
    async with serve() as http:
        for headers in (long_names, long_values):
            body = b"".join(
                (
                    f"--{boundary}\r\n".encode(),
                    "".join(f"{line}\r\n" for line in headers).encode(),
                    b'Content-Disposition: form-data; name="file"; filename="c.csv"\r\n\r\n',
                    data,
                    f"\r\n--{boundary}--\r\n".encode(),
                )
            )
            answer = await http.post("/imports", content=body, headers=multipart)
            assert answer.status_code == 400, answer.text
            assert answer.json()["detail"] == (
                f"a part's headers hold more than {MAX_PART_HEADER_BYTES} bytes: "
                "send the CSV as the form field 'file'"
            )
            assert files_in(directory) == []
        # A form with ordinary headers still goes through.
        fine = form(boundary, ("file", "c.csv", data))
        assert (await http.post("/imports", content=fine, headers=multipart)).status_code == 202
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(ContactImportJob)) == 1


async def test_a_refused_import_source_answers_without_the_servers_paths(
    serve: Serve, settings: Settings, sessions: Sessions
) -> None:
    owner, other = await new_user(sessions), await new_user(sessions)
    # A user directory that is a symlink into another user's: the upload lands there, and the
    # import refuses it as outside its user's directory, naming both real paths.
    elsewhere = user_import_dir(settings, other)
    elsewhere.mkdir(parents=True)
    user_import_dir(settings, owner).symlink_to(elsewhere, target_is_directory=True)
    async with serve() as http:
        answer = await http.post(
            "/imports", content=contacts_csv(3), headers={**CSV, **as_user(owner)}
        )
    assert answer.status_code == 400, answer.text
    detail = answer.json()["detail"]
    assert detail == UPLOAD_REFUSED
    assert str(settings.import_dir.resolve()) not in answer.text
    assert files_in(elsewhere) == []  # refused before anything was created: the file goes too
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(ContactImportJob)) == 0
