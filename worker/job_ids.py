"""The arq job ids of imports and exports, in one place for the client, the jobs and the reconciler.

Ids are deterministic so that arq refuses a duplicate enqueue while the job exists, and so
that the reconciler can tell from PostgreSQL alone which job Redis should know.
"""

from __future__ import annotations

import re
import uuid
from typing import Literal

# How long the pointer to an import's continuation lives; far beyond any import's run time.
CONTINUATION_POINTER_TTL_S = 7 * 24 * 3600


def import_job_id(import_id: uuid.UUID | str) -> str:
    return f"import:{import_id}"


def import_continuation_job_id(import_id: uuid.UUID | str, from_row: int) -> str:
    """The job that carries an import on from its checkpoint after a soft time limit."""
    return f"import:{import_id}:from:{from_row}"


def import_continuation_pointer(import_id: uuid.UUID | str) -> str:
    """Redis key holding the id of the import's latest continuation job (for the reconciler)."""
    return f"c360:import-continuation:{import_id}"


def export_job_id(export_id: uuid.UUID | str) -> str:
    return f"export:{export_id}"


_ROW_JOB_ID = re.compile(r"(import|export):([0-9a-f-]{36})(?::from:([0-9]+))?", re.ASCII)


def row_of_job_id(job_id: str) -> tuple[Literal["import", "export"], uuid.UUID] | None:
    """The import or export row an arq job id above names, or None for any other id.

    Only the exact strings the builders above produce count (an id is rebuilt and compared),
    so an owner check on the row cannot be sidestepped by a differently spelt id.
    """
    match = _ROW_JOB_ID.fullmatch(job_id)
    if match is None:
        return None
    kind, raw_id, from_row = match.groups()
    try:
        row_id = uuid.UUID(raw_id)
    except ValueError:
        return None
    if kind == "export":
        return ("export", row_id) if from_row is None and export_job_id(row_id) == job_id else None
    if from_row is None:
        rebuilt = import_job_id(row_id)
    else:
        rebuilt = import_continuation_job_id(row_id, int(from_row))
    return ("import", row_id) if rebuilt == job_id else None
