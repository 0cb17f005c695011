"""Stream an uploaded CSV into the user's import directory, a bounded piece at a time.

The body goes to `IMPORT_DIR/<user_id>/<uuid>.csv.part` as it arrives and is renamed to
`<uuid>.csv` only when it is whole, so an import never reads half an upload. An upload over the
cap, an empty one, a client that goes away or any other error removes the partial file. The
file is written in a worker thread (anyio's async file), so the event loop only moves bytes;
at most `FLUSH_BYTES` plus one body piece of an upload is in memory at any time.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator
from http import HTTPStatus
from pathlib import Path

import anyio
from fastapi import HTTPException

# Servers hand the body over in pieces of a few KiB to 64 KiB: gathering them into one write
# per 256 KiB keeps the thread hops few without holding much of the upload.
FLUSH_BYTES = 256 * 1024
DEFAULT_MAX_UPLOAD_BYTES = 100 * 1024 * 1024
PARTIAL_SUFFIX = ".part"


def too_large(max_bytes: int) -> HTTPException:
    return HTTPException(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        f"the upload is larger than the limit of {max_bytes} bytes; split the file",
    )


async def save_upload(chunks: AsyncIterator[bytes], directory: Path, max_bytes: int) -> Path:
    """Write `chunks` to a new `<uuid>.csv` in `directory` (created if missing); its path.

    Raises 413 past `max_bytes` and 400 for an empty body, leaving no file behind either way.
    """
    await anyio.to_thread.run_sync(functools.partial(directory.mkdir, parents=True, exist_ok=True))
    final = directory / f"{uuid.uuid4().hex}.csv"
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    size_bytes = 0
    try:
        # "x": a fresh name of our own, never an existing file (or a symlink planted there).
        async with await anyio.open_file(partial, "xb") as out:
            pending: list[bytes] = []
            pending_bytes = 0
            async for chunk in chunks:
                size_bytes += len(chunk)
                if size_bytes > max_bytes:
                    raise too_large(max_bytes)
                pending.append(chunk)
                pending_bytes += len(chunk)
                if pending_bytes >= FLUSH_BYTES:
                    await out.write(b"".join(pending))
                    pending, pending_bytes = [], 0
            await out.write(b"".join(pending))
        if size_bytes == 0:
            raise HTTPException(HTTPStatus.BAD_REQUEST, "the upload is empty: send a CSV")
        await anyio.to_thread.run_sync(partial.rename, final)
    except BaseException:
        # Also on cancellation (the client went away): shielded, so the clean-up itself runs.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(functools.partial(partial.unlink, missing_ok=True))
        raise
    return final


async def remove(path: Path) -> None:
    await anyio.to_thread.run_sync(functools.partial(path.unlink, missing_ok=True))
