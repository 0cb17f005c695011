"""A loopback HTTP server that speaks Resend and SendGrid, for tests and benchmarks.

It runs in its own thread with its own event loop on 127.0.0.1 and an ephemeral port, so the
test process and worker subprocesses reach it over real sockets. Usage::

    with ProviderServer(default_delay_s=0.2) as server:
        server.script("/emails", Answer(status=429, headers={"retry-after": "2"}))
        server.script("/v3/mail/send", Answer(hang=True))
        server.always("/emails", Answer(status=401))   # every request, until server.fix("/emails")
        server.script("/emails/batch", Answer(accept=True, hang=True))  # accepted, never answered
        server.reject_recipient("bad@example.com")   # Resend refuses that member (alone)
        server.rate_limit_per_s = 5                  # beyond 5 sends a second: 429 retry-after
        ...  # point EMAIL_API_BASE_URL at server.base_url
        server.requests            # every request: RecordedRequest(method, path, headers, json)
        server.delivered           # what a real provider would have delivered

Without a scripted answer each path gives the provider's success answer: Resend `POST /emails`
-> 200 `{"id": ...}`; SendGrid `POST /v3/mail/send` -> 202 with `X-Message-Id`; SendGrid
`PUT /v3/marketing/contacts` -> 202 `{"job_id": ...}`; Resend `POST /emails/batch` (a JSON array
of `/emails` objects) -> 200 `{"data": [{"id": ...}, ...]}`, and with `x-batch-validation:
permissive` a rejected recipient's member fails alone: `{"data": [ids of the others, in order],
"errors": [{"index": i, "message": ...}]}` (strict: 422 and nothing sent), as
https://resend.com/docs/api-reference/emails/send-batch-emails and
https://resend.com/changelog/batch-validation-modes describe. Each accepted member is one
`Delivery` (path `/emails/batch`, its own JSON). The fake keeps SendGrid's marketing
contacts (`server.marketing_contacts`, email -> contact id): `POST
/v3/marketing/contacts/search/emails` `{"emails": [...]}` answers 200 `{"result": {email:
{"contact": {...}} | {"error": "..."}}}`, or 404 when none is known, and
`DELETE /v3/marketing/contacts?ids=a,b` deletes them (202 `{"job_id": ...}`), as documented at
https://www.twilio.com/docs/sendgrid/api-reference/contacts/get-contacts-by-emails and
.../delete-contacts. Resend idempotency is modelled after
https://resend.com/docs/dashboard/emails/idempotency-keys: a repeated `Idempotency-Key` with the
same body answers the first answer and delivers nothing new (for a batch too: the same ids);
with another body, 409 `invalid_idempotent_request`. `rate_limit_per_s` counts sends (`/emails`,
`/emails/batch`, `/v3/mail/send`) in a sliding second, as Resend's per-team limit does
(https://resend.com/docs/api-reference/rate-limit): one over it answers 429 with `retry-after`
(SendGrid's path: `X-RateLimit-Reset`) and is not processed; `rate_limited` counts those.

`python -m tests.support.provider_server --delay-ms 200` serves until killed and prints its
base URL on the first line (the benchmark runs it in its own process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from multidict import CIMultiDict

RESEND_EMAILS = "/emails"
RESEND_BATCH = "/emails/batch"
SENDGRID_MAIL = "/v3/mail/send"
SENDGRID_CONTACTS = "/v3/marketing/contacts"
SENDGRID_CONTACTS_SEARCH = "/v3/marketing/contacts/search/emails"

# A hanging handler gives up after this long even if the client never does, so a forgotten
# hang cannot keep a test run alive.
_MAX_HANG_S = 120.0


@dataclass(frozen=True)
class Answer:
    """One scripted answer. `body` is JSON-encoded unless it is `bytes`.

    `hang=True`: read the request, then never answer (until the client gives up or the server
    stops). `delay_s`: wait that long before answering (overrides the default delay).
    `drop=True`: close the connection without answering, after reading the request.
    `accept=True`: process the request as the provider would (deliver, keep its idempotency
    key) before the hang, drop or status: a timeout or a 5xx after the provider accepted.
    """

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Any = None
    delay_s: float | None = None
    hang: bool = False
    drop: bool = False
    accept: bool = False


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received; `headers` is case-insensitive, `json` is None if not JSON."""

    method: str
    path: str
    headers: Mapping[str, str]
    json: Any
    raw_body: bytes
    query: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Delivery:
    """One message or contacts batch the fake provider accepted and would have acted on."""

    path: str
    provider_id: str
    json: Any


class ProviderServer:
    """The fake provider. Thread-safe accessors; start with `start()` or `with`."""

    def __init__(
        self, *, default_delay_s: float = 0.0, record: bool = True, bodies: bool = True
    ) -> None:
        self.default_delay_s = default_delay_s
        self._record = record
        # bodies=False: a delivery keeps only its `to` (benchmarks deliver 10^5 emails).
        self._bodies = bodies
        self._lock = threading.Lock()
        self._scripts: dict[str, deque[Answer]] = defaultdict(deque)
        self._always: dict[str, Answer] = {}
        self._requests: list[RecordedRequest] = []
        self._delivered: list[Delivery] = []
        # key -> (the first request's body, the first answer as JSON text)
        self._idempotency: dict[str, tuple[bytes, str]] = {}
        self._contacts: dict[str, str] = {}
        self._request_count = 0
        self._rejected: dict[str, str] = {}
        self._recent_sends: deque[float] = deque()
        self.rate_limit_per_s: float | None = None
        self._rate_limited = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.port = 0

    # ---- test-facing API -------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, path: str, *answers: Answer) -> None:
        """Queue answers for `path`; each request pops one, then the default success resumes."""
        with self._lock:
            self._scripts[path].extend(answers)

    def always(self, path: str, answer: Answer) -> None:
        """Answer every request to `path` with `answer` (a revoked key) until `fix(path)`."""
        with self._lock:
            self._always[path] = answer

    def fix(self, path: str) -> None:
        """Stop `always` for `path`: the provider's default answers resume."""
        with self._lock:
            self._always.pop(path, None)

    def reject_recipient(self, address: str, message: str | None = None) -> None:
        """Refuse every email to `address` as Resend refuses an invalid one (422 alone; in a
        permissive batch, that member's error)."""
        with self._lock:
            self._rejected[address.lower()] = message or f"Invalid `to` field: {address}"

    @property
    def rate_limited(self) -> int:
        """Requests answered 429 by `rate_limit_per_s`."""
        with self._lock:
            return self._rate_limited

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    @property
    def request_count(self) -> int:
        """Requests received (counted even when `record=False`)."""
        with self._lock:
            return self._request_count

    @property
    def delivered(self) -> list[Delivery]:
        with self._lock:
            return list(self._delivered)

    @property
    def marketing_contacts(self) -> dict[str, str]:
        """SendGrid's marketing contacts now: lower-cased email -> contact id."""
        with self._lock:
            return dict(self._contacts)

    def reset(self) -> None:
        with self._lock:
            self._scripts.clear()
            self._always.clear()
            self._requests.clear()
            self._delivered.clear()
            self._idempotency.clear()
            self._contacts.clear()
            self._request_count = 0
            self._rejected.clear()
            self._recent_sends.clear()
            self._rate_limited = 0
        self.rate_limit_per_s = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._serve, args=(sock,), name="provider-server", daemon=True
        )
        self._thread.start()
        self._ready.wait(10)
        if self._startup_error is not None:
            raise RuntimeError("provider server failed to start") from self._startup_error
        return self

    def stop(self) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main(sock))
        except BaseException as exc:  # surfaced to start() instead of dying silently
            self._startup_error = exc
            self._ready.set()
        finally:
            sock.close()
            loop.close()

    async def _main(self, sock: socket.socket) -> None:
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.SockSite(runner, sock, backlog=1024)
        await site.start()
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    # ---- the fake providers ------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        with self._lock:
            self._request_count += 1
            if self._record:
                self._requests.append(
                    RecordedRequest(
                        request.method,
                        request.path,
                        CIMultiDict(request.headers),
                        payload,
                        raw,
                        dict(request.query),
                    )
                )
            if self._over_rate_limit(request):
                self._rate_limited += 1
                return _rate_limited_response(request.path)
            scripted = self._scripts[request.path]
            answer = scripted.popleft() if scripted else self._always.get(request.path)
        accepted: web.Response | None = None
        if answer is not None and answer.accept:
            accepted = self._success(request, payload, raw)

        delay_s = self.default_delay_s
        if answer is not None and answer.delay_s is not None:
            delay_s = answer.delay_s
        if answer is not None and answer.hang:
            assert self._stopping is not None
            # Never answer; the client's read timeout is what ends this request.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), _MAX_HANG_S)
            raise web.HTTPServiceUnavailable()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        if answer is not None and answer.drop:
            transport = request.transport
            if transport is not None:
                transport.abort()
            return web.Response(status=204)  # written to a closed transport: goes nowhere
        if answer is not None and not (answer.accept and answer.status == 200):
            return _scripted_response(answer)
        return accepted or self._success(request, payload, raw)

    def _kept(self, email: Any) -> Any:
        return email if self._bodies else {"to": email.get("to")}

    def _over_rate_limit(self, request: web.Request) -> bool:
        """Called under the lock: whether this send is one too many in the last second."""
        if self.rate_limit_per_s is None or request.method != "POST":
            return False
        if request.path not in (RESEND_EMAILS, RESEND_BATCH, SENDGRID_MAIL):
            return False
        now = time.monotonic()
        while self._recent_sends and self._recent_sends[0] <= now - 1.0:
            self._recent_sends.popleft()
        if len(self._recent_sends) >= self.rate_limit_per_s:
            return True
        self._recent_sends.append(now)
        return False

    def _resend_idempotent(
        self, key: str | None, raw: bytes, answer: Callable[[], Any]
    ) -> web.Response:
        """Resend's idempotency (called under the lock): a repeat answers the first answer."""
        if key is not None and key in self._idempotency:
            first_body, first_answer = self._idempotency[key]
            if first_body != raw:
                return web.json_response(
                    {
                        "statusCode": 409,
                        "name": "invalid_idempotent_request",
                        "message": "Same idempotency key used with a different "
                        "request payload. Change your idempotency key or payload.",
                    },
                    status=409,
                )
            return web.json_response(json.loads(first_answer))
        body = answer()
        if isinstance(body, web.Response):
            return body
        if key is not None:
            self._idempotency[key] = (raw, json.dumps(body))
        return web.json_response(body)

    def _resend_batch(self, request: web.Request, payload: Any, raw: bytes) -> web.Response:
        permissive = request.headers.get("x-batch-validation", "strict") == "permissive"
        if not isinstance(payload, list) or not 1 <= len(payload) <= 100:
            return web.json_response(
                {"statusCode": 422, "name": "validation_error", "message": "1-100 emails"},
                status=422,
            )

        def answer() -> Any:
            errors = []
            for index, email in enumerate(payload):
                for address in email.get("to", []):
                    if address.lower() in self._rejected:
                        errors.append({"index": index, "message": self._rejected[address.lower()]})
            if errors and not permissive:
                return web.json_response(
                    {
                        "statusCode": 422,
                        "name": "validation_error",
                        "message": errors[0]["message"],
                    },
                    status=422,
                )
            refused = {error["index"] for error in errors}
            data = []
            for index, email in enumerate(payload):
                if index not in refused:
                    message_id = str(uuid.uuid4())
                    self._delivered.append(Delivery(RESEND_BATCH, message_id, self._kept(email)))
                    data.append({"id": message_id})
            return {"data": data, "errors": errors} if permissive else {"data": data}

        with self._lock:
            return self._resend_idempotent(request.headers.get("Idempotency-Key"), raw, answer)

    def _success(self, request: web.Request, payload: Any, raw: bytes) -> web.Response:
        path = request.path
        if path == RESEND_EMAILS and request.method == "POST":

            def answer() -> Any:
                for address in (payload or {}).get("to", []):
                    if address.lower() in self._rejected:
                        message = self._rejected[address.lower()]
                        return web.json_response(
                            {"statusCode": 422, "name": "validation_error", "message": message},
                            status=422,
                        )
                message_id = str(uuid.uuid4())
                self._delivered.append(Delivery(path, message_id, self._kept(payload)))
                return {"id": message_id}

            with self._lock:
                return self._resend_idempotent(request.headers.get("Idempotency-Key"), raw, answer)
        if path == RESEND_BATCH and request.method == "POST":
            return self._resend_batch(request, payload, raw)
        if path == SENDGRID_MAIL and request.method == "POST":
            message_id = uuid.uuid4().hex[:22]
            with self._lock:
                self._delivered.append(Delivery(path, message_id, payload))
            return web.Response(status=202, headers={"X-Message-Id": message_id})
        if path == SENDGRID_CONTACTS and request.method == "PUT":
            job_id = str(uuid.uuid4())
            with self._lock:
                self._delivered.append(Delivery(path, job_id, payload))
                for contact in payload["contacts"]:
                    email = contact["email"].lower()
                    self._contacts.setdefault(email, str(uuid.uuid4()))
            return web.json_response({"job_id": job_id}, status=202)
        if path == SENDGRID_CONTACTS_SEARCH and request.method == "POST":
            with self._lock:
                result: dict[str, Any] = {}
                for email in payload["emails"]:
                    contact_id = self._contacts.get(email.lower())
                    result[email.lower()] = (
                        {"contact": {"id": contact_id, "email": email.lower()}}
                        if contact_id is not None
                        else {"error": "contact not found"}
                    )
            if not any("contact" in match for match in result.values()):
                return web.json_response({"errors": [{"message": "No contacts found"}]}, status=404)
            return web.json_response({"result": result})
        if path == SENDGRID_CONTACTS and request.method == "DELETE":
            ids = set(request.query.get("ids", "").split(","))
            with self._lock:
                self._contacts = {e: i for e, i in self._contacts.items() if i not in ids}
            return web.json_response({"job_id": str(uuid.uuid4())}, status=202)
        return web.json_response({"message": f"no route {request.method} {path}"}, status=404)


def _rate_limited_response(path: str) -> web.Response:
    if path == SENDGRID_MAIL:
        reset = str(int(time.time()) + 1)
        headers = {
            "X-RateLimit-Limit": "1",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": reset,
        }
        return web.json_response(
            {"errors": [{"message": "too many requests"}]}, status=429, headers=headers
        )
    body = {"statusCode": 429, "name": "rate_limit_exceeded", "message": "Too many requests."}
    return web.json_response(body, status=429, headers={"retry-after": "1"})


def _scripted_response(answer: Answer) -> web.Response:
    headers = dict(answer.headers)
    if isinstance(answer.body, bytes):
        return web.Response(status=answer.status, headers=headers, body=answer.body)
    if answer.body is None:
        return web.Response(status=answer.status, headers=headers)
    headers.setdefault("Content-Type", "application/json")
    return web.Response(status=answer.status, headers=headers, text=json.dumps(answer.body))


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=0.0, help="latency of every answer")
    args = parser.parse_args()
    # Benchmarks send many requests: count them but keep no per-request records.
    server = ProviderServer(default_delay_s=args.delay_ms / 1000, record=False).start()
    print(server.base_url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        sys.stdout.flush()


if __name__ == "__main__":
    _main()
