"""Byte sources for the CSV reader: a local file, an S3 object, bytes in memory, re-chunking.

A source is a *factory* returning a fresh async iterator of bytes, because the reader reads the
file more than once (a counting pass, a resume, a restart as Windows-1252).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path

from worker.storage.s3 import S3ClientFactory
from worker.storage.s3 import classify as classify_s3_error

SourceFactory = Callable[[], AsyncIterator[bytes]]

DEFAULT_CHUNK_BYTES = 1 << 20


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
    """A source factory for a local file (each call reopens it)."""
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


def s3_object_source(
    client_factory: S3ClientFactory, bucket: str, key: str, chunk_size: int = DEFAULT_CHUNK_BYTES
) -> SourceFactory:
    """A source factory streaming `s3://bucket/key`: each pass is a new GET of the object."""
    return lambda: s3_object_chunks(client_factory, bucket, key, chunk_size)


async def s3_object_chunks(
    client_factory: S3ClientFactory, bucket: str, key: str, chunk_size: int = DEFAULT_CHUNK_BYTES
) -> AsyncIterator[bytes]:
    """Yield the object's bytes as they arrive; S3 failures become Transient/PermanentError."""
    location = f"s3://{bucket}/{key}"
    try:
        async with client_factory() as client:
            response = await client.get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                while chunk := await body.read(chunk_size):
                    yield chunk
            finally:
                body.close()
    except Exception as exc:
        mapped = classify_s3_error(exc, "GET", location)
        if mapped is None:
            raise
        raise mapped from exc
