"""Byte sources for the CSV reader: a local file, an S3 object, bytes in memory, re-chunking.

A source is a *factory* returning a fresh async iterator of bytes, because the reader reads the
file more than once (head sniff, counting pass, data pass, a restart as Windows-1252).

The job's sources are *pinned*: every pass, and every later run of the same import, must read
the same bytes, because a resume skips `processed_rows` rows of a fresh read. A local file is
opened once, without following symlinks, and every pass reads that one descriptor with
`os.pread`; its pin is inode, size and mtime, re-checked at each read. An S3 object's pin is the
ETag of its first GET, and every later GET sends `IfMatch`. A pin that no longer matches raises
`SourceChanged`, which fails the import with a message a person can act on.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from worker.errors import PermanentError
from worker.storage.s3 import S3ClientFactory
from worker.storage.s3 import classify as classify_s3_error

log = logging.getLogger(__name__)

SourceFactory = Callable[[], AsyncIterator[bytes]]

DEFAULT_CHUNK_BYTES = 1 << 20

_LOCAL_PIN = "file inode={} size={} mtime_ns={}"
_S3_PIN_PREFIX = "s3 etag="


CHANGED_MESSAGE = "the file changed while it was being imported; upload it again as a new import"


class SourceChanged(PermanentError):
    """The source is not the one the import started on: never read on with other bytes."""

    def __init__(self, message: str = CHANGED_MESSAGE) -> None:
        super().__init__(message)


def _changed(location: str, detail: str) -> SourceChanged:
    # The detail (pins, server paths) goes to the log only; the user is told what to do.
    log.warning("import source %s changed: %s", location, detail)
    return SourceChanged()


class LocalFile:
    """A local import file opened once; every pass reads this descriptor.

    `open` walks the path from `directory` one component at a time with `O_NOFOLLOW`, so a
    component swapped for a symlink after the caller's check fails the open instead of leading
    elsewhere, and a swap after the open changes nothing: the descriptor keeps the file.
    """

    def __init__(self, fd: int, location: str, pin: str) -> None:
        self._fd = fd
        self._location = location
        self.pin = pin

    @classmethod
    def open(cls, directory: Path, relative: Path, expected_pin: str | None = None) -> LocalFile:
        """Open `directory/relative` (blocking: run it in a thread); `SourceChanged` if the file
        is not the one `expected_pin` describes, `PermanentError` if a component is a link."""
        location = str(directory / relative)
        if not relative.parts:
            raise ValueError(f"{location}: not a file below {directory}")
        fd = _open_below(directory, relative.parts)
        try:
            pin = _local_pin(os.fstat(fd), location)
            if expected_pin is not None and pin != expected_pin:
                raise _changed(location, f"pinned {expected_pin!r}, now {pin!r}")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, location, pin)

    def source(self, chunk_size: int = DEFAULT_CHUNK_BYTES) -> SourceFactory:
        """A factory of passes over the file from its start (each with its own offset)."""
        return lambda: self._chunks(chunk_size)

    async def _chunks(self, chunk_size: int) -> AsyncIterator[bytes]:
        offset = 0
        while chunk := await asyncio.to_thread(self._read_at, offset, chunk_size):
            offset += len(chunk)
            yield chunk

    def _read_at(self, offset: int, size: int) -> bytes:
        # A write in place keeps the inode but moves size or mtime: caught at the next read.
        pin = _local_pin(os.fstat(self._fd), self._location)
        if pin != self.pin:
            raise _changed(self._location, f"pinned {self.pin!r}, now {pin!r}")
        return os.pread(self._fd, size, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _open_below(directory: Path, parts: tuple[str, ...]) -> int:
    """An fd for `directory/parts...` that followed no symlink at or below `directory`."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(directory, flags | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                below = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = below
            # O_NONBLOCK: a FIFO swapped in must not hang the thread (no effect on files).
            file_fd = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a link (or a file) where we checked
            raise PermanentError(
                "the import file was moved or replaced by a link while the import started; "
                "upload it again as a new import"
            ) from None
        raise PermanentError(f"the import file cannot be opened: {exc.strerror}") from None
    return file_fd


def _local_pin(found: os.stat_result, location: str) -> str:
    if not stat.S_ISREG(found.st_mode):
        raise _changed(location, "not a regular file any more")
    return _LOCAL_PIN.format(found.st_ino, found.st_size, found.st_mtime_ns)


class S3Object:
    """`s3://bucket/key`, pinned by the ETag of its first GET (or `expected_pin`)."""

    def __init__(
        self,
        client_factory: S3ClientFactory,
        bucket: str,
        key: str,
        expected_pin: str | None = None,
    ) -> None:
        self._client_factory = client_factory
        self._bucket = bucket
        self._key = key
        self.location = f"s3://{bucket}/{key}"
        self._etag: str | None = None
        if expected_pin is not None:
            if not expected_pin.startswith(_S3_PIN_PREFIX):
                raise _changed(self.location, f"pinned {expected_pin!r}, not an S3 object")
            self._etag = expected_pin.removeprefix(_S3_PIN_PREFIX)

    @property
    def pin(self) -> str | None:
        """None until the first GET answered."""
        return None if self._etag is None else _S3_PIN_PREFIX + self._etag

    def source(self, chunk_size: int = DEFAULT_CHUNK_BYTES) -> SourceFactory:
        return lambda: self._chunks(chunk_size)

    async def _chunks(self, chunk_size: int) -> AsyncIterator[bytes]:
        params: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key}
        if self._etag is not None:
            params["IfMatch"] = self._etag
        try:
            async with self._client_factory() as client:
                response = await client.get_object(**params)
                if self._etag is None:
                    self._etag = response["ETag"]
                body = response["Body"]
                try:
                    while chunk := await body.read(chunk_size):
                        yield chunk
                finally:
                    body.close()
        except Exception as exc:
            if isinstance(exc, ClientError) and _precondition_failed(exc):
                raise _changed(self.location, f"no object with ETag {self._etag}") from None
            mapped = classify_s3_error(exc, "GET", self.location)
            if mapped is None:
                raise
            raise mapped from exc


PinnedSource = LocalFile | S3Object


def _precondition_failed(exc: ClientError) -> bool:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return error.get("Code") == "PreconditionFailed" or status == 412


async def local_file_chunks(
    path: str | Path, chunk_size: int = DEFAULT_CHUNK_BYTES
) -> AsyncIterator[bytes]:
    """Yield the bytes of a local file; every read runs in a thread so the loop never waits."""
    handle = await asyncio.to_thread(open, path, "rb")
    try:
        while chunk := await asyncio.to_thread(handle.read, chunk_size):
            yield chunk
    finally:
        await asyncio.to_thread(handle.close)


def local_file_source(path: str | Path, chunk_size: int = DEFAULT_CHUNK_BYTES) -> SourceFactory:
    """A source factory that reopens `path` for each pass: for trusted paths (tests, benchmarks).

    The job reads user files through `LocalFile` instead, which neither follows a swapped link
    nor reads other bytes on a later pass.
    """
    return lambda: local_file_chunks(path, chunk_size)


async def bytes_chunks(data: bytes, chunk_size: int = DEFAULT_CHUNK_BYTES) -> AsyncIterator[bytes]:
    """Yield `data` in slices of `chunk_size` bytes (tests use tiny sizes to hit every boundary)."""
    for start in range(0, len(data), chunk_size):
        yield data[start : start + chunk_size]


def bytes_source(data: bytes, chunk_size: int = DEFAULT_CHUNK_BYTES) -> SourceFactory:
    """A source factory over bytes held in memory."""
    return lambda: bytes_chunks(data, chunk_size)


async def rechunk(chunks: AsyncIterator[bytes], step_bytes: int) -> AsyncGenerator[bytes, None]:
    """Coalesce small chunks and split big ones into pieces of about `step_bytes`.

    The parse of one piece runs between two awaits, so its size bounds how long the event loop
    is blocked; S3 bodies arrive in chunks of any size (aiobotocore's default is 1 KiB).
    """
    pending: list[bytes] = []
    pending_bytes = 0
    async for chunk in chunks:
        if not chunk:
            continue
        pending.append(chunk)
        pending_bytes += len(chunk)
        if pending_bytes < step_bytes:
            continue
        data = b"".join(pending)
        cut = len(data) - len(data) % step_bytes
        for start in range(0, cut, step_bytes):
            yield data[start : start + step_bytes]
        pending = [data[cut:]] if cut < len(data) else []
        pending_bytes = len(data) - cut
    if pending_bytes:
        yield b"".join(pending)


async def close_iterator(chunks: AsyncIterator[bytes]) -> None:
    """Close an async iterator that may hold a file or a connection (generators have aclose)."""
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()
