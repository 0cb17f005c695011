"""Exports on the local disk, written atomically under `EXPORT_DIR`.

A writer fills a temporary file next to the final one (same directory, so the rename cannot
cross a filesystem), fsyncs it and renames it over the final name: readers see the old file or
the whole new one, never a partial one. File IO runs in worker threads, in ~1 MiB blocks, so
the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from worker.storage.base import check_key, run_to_completion

DEFAULT_BUFFER_BYTES = 1024 * 1024
TMP_SUFFIX = ".tmp"
# Exports hold every contact's PII: owner-only whatever the umask (it can only take bits
# away). A deployment whose downloads are served by another account in the group passes
# file_mode=0o640, dir_mode=0o750.
DEFAULT_FILE_MODE = 0o600
DEFAULT_DIR_MODE = 0o700


class LocalStorage:
    """Files under `root`; `key` `a/b.csv` is stored at `root/a/b.csv`."""

    def __init__(
        self,
        root: Path,
        *,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        file_mode: int = DEFAULT_FILE_MODE,
        dir_mode: int = DEFAULT_DIR_MODE,
    ) -> None:
        if buffer_bytes <= 0:
            raise ValueError("buffer_bytes must be positive")
        # Resolved once so that location() is absolute even if the worker's cwd changes.
        self.root = root.expanduser().resolve()
        self.buffer_bytes = buffer_bytes
        self.file_mode = file_mode
        self.dir_mode = dir_mode

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def location(self, key: str) -> str:
        return str(self.path(key))

    async def url(self, key: str, expires_s: int = 3600) -> str:
        """A `file://` URL; `expires_s` is accepted for symmetry with S3 and ignored."""
        return self.path(key).as_uri()

    async def discard_abandoned(self, key: str) -> int:
        """Delete the temporary files of `key`'s killed writers (`.<name>.<hex>.tmp`)."""
        return await asyncio.to_thread(_discard_temporary_files, self.path(key))

    @contextlib.asynccontextmanager
    async def writer(self, key: str) -> AsyncIterator[LocalWriter]:
        out = LocalWriter(self.path(key), self.buffer_bytes, self.file_mode, self.dir_mode)
        try:
            await run_to_completion(asyncio.to_thread(out.open_sync))
            yield out
            await out.commit()
        except BaseException:
            # CancelledError included: run_to_completion above made sure no thread is still
            # writing to the temporary file when we remove it.
            await run_to_completion(asyncio.to_thread(out.discard_sync))
            raise


class LocalWriter:
    """Buffers chunks and appends them to a temporary file from a worker thread."""

    def __init__(
        self,
        final_path: Path,
        buffer_bytes: int,
        file_mode: int = DEFAULT_FILE_MODE,
        dir_mode: int = DEFAULT_DIR_MODE,
    ) -> None:
        self.final_path = final_path
        self._buffer_bytes = buffer_bytes
        self._file_mode = file_mode
        self._dir_mode = dir_mode
        self._buffer = bytearray()
        self._file: BinaryIO | None = None
        self._tmp_path: Path | None = None
        self._bytes_written = 0

    @property
    def bytes_written(self) -> int:
        return self._bytes_written

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._file is None:
            raise RuntimeError("write() outside of `async with storage.writer(key)`")
        self._buffer += chunk
        self._bytes_written += len(chunk)
        if len(self._buffer) >= self._buffer_bytes:
            # Hand the full buffer to the thread and start a new one, so no bytes are copied.
            block, self._buffer = self._buffer, bytearray()
            await run_to_completion(asyncio.to_thread(self._write_sync, block))

    async def commit(self) -> None:
        block, self._buffer = self._buffer, bytearray()
        await run_to_completion(asyncio.to_thread(self._commit_sync, block))

    # Everything below runs in a worker thread, one call at a time.

    def open_sync(self) -> None:
        directory = self.final_path.parent
        _make_directories(directory, self._dir_mode)
        # Hidden and suffixed so a directory listing never mistakes it for a finished export.
        # O_EXCL makes a name clash an error instead of a shared file. The rename keeps the
        # mode, so the final file is file_mode from its first byte on.
        tmp_path = directory / f".{self.final_path.name}.{secrets.token_hex(8)}{TMP_SUFFIX}"
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self._file_mode)
        self._tmp_path = tmp_path
        self._file = os.fdopen(fd, "wb")
        # The umask may have taken bits away from a wider file_mode; it never adds any.
        os.fchmod(fd, self._file_mode)

    def _write_sync(self, block: bytearray) -> None:
        assert self._file is not None
        self._file.write(block)
        # Down to the OS now: io's own 8 KiB buffer would otherwise hold the tail of the block.
        self._file.flush()

    def _commit_sync(self, block: bytearray) -> None:
        assert self._file is not None and self._tmp_path is not None
        self._file.write(block)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp_path, self.final_path)
        self._tmp_path = None
        _fsync_directory(self.final_path.parent)

    def discard_sync(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        if self._tmp_path is not None:
            self._tmp_path.unlink(missing_ok=True)
            self._tmp_path = None


def _discard_temporary_files(final_path: Path) -> int:
    if not final_path.parent.is_dir():
        return 0
    discarded = 0
    for tmp_path in final_path.parent.glob(f".{glob.escape(final_path.name)}.*{TMP_SUFFIX}"):
        tmp_path.unlink(missing_ok=True)
        discarded += 1
    return discarded


def _make_directories(directory: Path, mode: int) -> None:
    """Create the missing components of `directory` with exactly `mode`; leave existing ones.

    Not `Path.mkdir(parents=True)`: it creates the parents with 0o777 minus the umask.
    """
    missing: list[Path] = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, mode)
        except FileExistsError:  # another export of the same user created it just now
            if not path.is_dir():
                raise
            continue
        os.chmod(path, mode)  # as for files: the umask only ever narrows it


def _fsync_directory(directory: Path) -> None:
    # The rename is only durable once the directory entry itself reaches the disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
