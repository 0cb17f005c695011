"""Local file-system failures of an export, as a PermanentError naming the target.

Database errors need nothing here: `worker.retry.classify` sorts raw asyncpg errors from the
COPY connection by SQLSTATE like SQLAlchemy's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from worker.errors import PermanentError


@contextlib.contextmanager
def file_errors(location: str) -> Iterator[None]:
    """A local file-system failure (permissions, a file where a directory should be, a full
    disk) as a PermanentError naming where the export was going; network errors pass."""
    try:
        yield
    except (ConnectionError, TimeoutError):
        raise  # sockets are OSErrors too: the retry policy treats these as transient
    except OSError as exc:
        raise PermanentError(
            f"could not write {location}: {type(exc).__name__}: {exc}",
            # The path and the OS's words are for the operators' log, not for the user.
            public=(
                "the export file could not be written (a storage problem on our side, logged "
                "for the operators); try again later, or contact support if it keeps happening"
            ),
        ) from exc
