"""What a user reads when an import fails on our side: plain words, the detail in the logs.

A web app shows `ImportStatus.message` as it is, so it must never carry the driver's text
(SQL values of other rows, constraint names), server paths or bucket names (review L9).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.imports.conftest import run_job, start_import
from worker.client import JobsClient
from worker.context import Ctx
from worker.errors import PermanentError
from worker.retry import PUBLIC_DATABASE_ERROR

CONSTRAINT = "c360_test_blocked_city"


@pytest.fixture
async def blocked_city(engine: AsyncEngine) -> AsyncIterator[str]:
    """A constraint the merge runs into (as a schema change or a bad migration would)."""
    async with engine.begin() as connection:
        await connection.execute(
            text(
                f"ALTER TABLE contacts ADD CONSTRAINT {CONSTRAINT} "
                "CHECK (city IS DISTINCT FROM 'Blockville')"
            )
        )
    yield "Blockville"
    async with engine.begin() as connection:
        await connection.execute(text(f"ALTER TABLE contacts DROP CONSTRAINT {CONSTRAINT}"))


async def test_a_database_constraint_fails_the_import_in_plain_words(
    caplog: pytest.LogCaptureFixture,
    ctx: Ctx,
    jobs_client: JobsClient,
    user_id: uuid.UUID,
    blocked_city: str,
) -> None:
    data = f"email,city\nok@x.io,Paris\nsecret-lead@x.io,{blocked_city}\n"
    import_id = await start_import(jobs_client, user_id, data)
    with pytest.raises(PermanentError):
        await run_job(ctx, import_id)

    status = await jobs_client.import_status(import_id)
    assert status.status == "failed"
    assert status.message == PUBLIC_DATABASE_ERROR
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("job failed")]
    # The operator's log line has what the user must not see.
    for detail in (CONSTRAINT, blocked_city, "secret-lead@x.io"):
        assert detail in line
        assert detail not in (status.message or "")
