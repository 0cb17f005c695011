"""Failures of an export's COPY connection and local files, as Transient/PermanentError.

The job wrapper's policy (`worker.retry.classify`) knows SQLAlchemy's `DBAPIError`, but the
COPY runs on the asyncpg connection underneath SQLAlchemy, whose errors arrive unwrapped:
`asyncpg.PostgresError` subclasses carrying a SQLSTATE. They are sorted here with the same
SQLSTATE list, so a server restart mid-export (57P01, 08006) retries and a broken query fails.
Local file-system errors become a PermanentError that names the file the export was going to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import asyncpg

from worker.errors import PermanentError, TransientError
from worker.retry import TRANSIENT_SQLSTATES


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    """Re-raise asyncpg's server errors as TransientError or PermanentError; others pass."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        state = getattr(exc, "sqlstate", None)
        message = f"database: {type(exc).__name__}: {exc}"
        if state in TRANSIENT_SQLSTATES:
            raise TransientError(message) from exc
        raise PermanentError(message) from exc
    except asyncpg.InterfaceError as exc:
        # "connection is closed" and friends: the connection died under us, a new one may work.
        if "closed" in str(exc):
            raise TransientError(f"database: {exc}") from exc
        raise


@contextlib.contextmanager
def file_errors(location: str) -> Iterator[None]:
    """A local file-system failure (permissions, a file where a directory should be, a full
    disk) as a PermanentError naming where the export was going; network errors pass."""
    try:
        yield
    except (ConnectionError, TimeoutError):
        raise  # sockets are OSErrors too: the retry policy treats these as transient
    except OSError as exc:
        raise PermanentError(f"could not write {location}: {type(exc).__name__}: {exc}") from exc
