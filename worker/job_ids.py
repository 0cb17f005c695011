"""The arq job ids of imports and exports, in one place for the client, the jobs and the reconciler.

Ids are deterministic so that arq refuses a duplicate enqueue while the job exists, and so
that the reconciler can tell from PostgreSQL alone which job Redis should know.
"""

from __future__ import annotations

import uuid

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
