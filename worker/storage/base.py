"""The storage interface exports are written through, and helpers both backends share.

A `Storage` hands out writers for keys. A writer is an async context manager: leaving the block
normally commits the whole object at once, leaving it by any exception (including
`asyncio.CancelledError`) aborts and leaves nothing behind under the key.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypeVar

T = TypeVar("T")


class StorageWriter(Protocol):
    """The inside of `async with storage.writer(key) as out:`."""

    @property
    def bytes_written(self) -> int:
        """Bytes accepted by `write` so far (buffered or already stored)."""
        ...

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        """Append `chunk`; buffered, so call it with chunks of any size.

        Its shape matches asyncpg's `copy_from_query(..., output=out.write)` sink.
        """
        ...


class Storage(Protocol):
    """Where finished export files live: a local directory or an S3 bucket."""

    def writer(self, key: str) -> AbstractAsyncContextManager[StorageWriter]:
        """Write the object `key` whole: committed on normal exit, nothing left on error."""
        ...

    def location(self, key: str) -> str:
        """Where `key` is stored, as recorded in `exports.file_path` (path or s3:// URI)."""
        ...

    async def url(self, key: str, expires_s: int = 3600) -> str:
        """A URL a user can download `key` from: `file://` locally, presigned GET on S3."""
        ...

    async def discard_abandoned(self, key: str) -> int:
        """Remove what killed writers of `key` left (temporary files, open multipart uploads).

        A SIGKILLed worker cannot clean up after its writer. Call this only while no other
        writer of `key` can be alive (the export holds its lock); returns how many were removed.
        """
        ...


def export_key(user_id: uuid.UUID | str, export_id: uuid.UUID | str) -> str:
    """The key of an export's file, `<user_id>/<export_id>.csv`, relative to the backend root.

    Both ids are parsed as UUIDs, so a key can never climb out of its root (`..`, `/`).
    Raises `ValueError` for an id that is not a UUID.
    """
    return f"{_uuid(user_id)}/{_uuid(export_id)}.csv"


def _uuid(value: uuid.UUID | str) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def check_key(key: str) -> str:
    """Refuse keys that are absolute, empty, or contain `..`/`.` segments or backslashes."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key {key!r}: expected a relative path like a/b.csv")
    return key


async def run_to_completion(aw: Awaitable[T], timeout_s: float | None = None) -> T:
    """Await `aw` even if the caller is cancelled meanwhile, then re-raise the cancellation.

    Used for operations whose outcome we must know before cleaning up: a file write running
    in a thread (cancelling the await does not stop the thread) or an S3 request that may
    still create a multipart upload or part on the server. `timeout_s` bounds how long a
    cancelled caller keeps waiting; after it the operation is left to finish on its own.
    """
    task = asyncio.ensure_future(aw)
    cancelled = False
    loop = asyncio.get_running_loop()
    deadline = None
    while not task.done():
        try:
            # asyncio.wait never cancels the task it waits for, unlike wait_for or a plain await.
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            await asyncio.wait({task}, timeout=remaining)
            if deadline is not None and not task.done():
                break
        except asyncio.CancelledError:
            cancelled = True
            if timeout_s is not None and deadline is None:
                deadline = loop.time() + timeout_s
    if cancelled:
        if not task.done():
            # Still running after the grace period: let it finish unobserved, without a
            # "Task exception was never retrieved" warning.
            task.add_done_callback(_consume_result)
        else:
            _consume_result(task)
        raise asyncio.CancelledError
    return task.result()


def _consume_result(task: asyncio.Future[T]) -> None:
    if not task.cancelled():
        task.exception()
