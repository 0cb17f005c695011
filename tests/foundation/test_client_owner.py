"""Owner checks (H1): user A, signed in to a web app, calls every read with user B's ids.

The web app passes the id from the URL and the signed-in user as `user_id=`. Another user's row
must look exactly like an id that does not exist, and a cancel must change nothing.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import ContactImportError, ContactImportJob, Export
from tests.conftest import RunBurst
from tests.support.users import new_user
from worker.client import JobsClient
from worker.context import Ctx
from worker.job import job
from worker.routes import (
    export_job_id,
    import_continuation_job_id,
    import_job_id,
    row_of_job_id,
)


async def _add(sessions: async_sessionmaker[AsyncSession], row: Any) -> uuid.UUID:
    async with sessions.begin() as session:
        session.add(row)
        await session.flush()
        row_id: uuid.UUID = row.id
    return row_id


async def _import_of(
    sessions: async_sessionmaker[AsyncSession], user: uuid.UUID, status: str = "pending"
) -> uuid.UUID:
    """An import row of `user`, with one rejected row holding raw CSV cells."""
    import_id = await _add(
        sessions, ContactImportJob(user_id=user, file_path="/imports/b.csv", status=status)
    )
    async with sessions.begin() as session:
        session.add(
            ContactImportError(
                job_id=import_id,
                row_number=2,
                message="invalid email",
                payload={"email": "bob@private", "phone": "+1 555 0100"},
            )
        )
    return import_id


async def _export_of(
    sessions: async_sessionmaker[AsyncSession], user: uuid.UUID, status: str = "completed"
) -> uuid.UUID:
    return await _add(sessions, Export(user_id=user, kind="contacts", status=status))


def _shape(exc: pytest.ExceptionInfo[LookupError], row_id: object) -> str:
    return str(exc.value).replace(str(row_id), "<id>")


@pytest.fixture
async def users(
    sessions: async_sessionmaker[AsyncSession], user_id: uuid.UUID
) -> tuple[uuid.UUID, uuid.UUID]:
    """(A, B): A is the attacker, signed in; B is the victim."""
    return user_id, await new_user(sessions)


async def test_import_status_of_another_user_looks_like_an_unknown_id(
    jobs_client: JobsClient,
    sessions: async_sessionmaker[AsyncSession],
    users: tuple[uuid.UUID, uuid.UUID],
) -> None:
    a, b = users
    theirs, mine, unknown = (
        await _import_of(sessions, b),
        await _import_of(sessions, a),
        uuid.uuid4(),
    )

    with pytest.raises(LookupError) as foreign:
        await jobs_client.import_status(theirs, user_id=a)
    with pytest.raises(LookupError) as missing:
        await jobs_client.import_status(unknown, user_id=a)
    assert _shape(foreign, theirs) == _shape(missing, unknown) == "no import job <id>"

    assert (await jobs_client.import_status(mine, user_id=a)).id == mine
    assert (await jobs_client.import_status(str(theirs), user_id=str(b))).id == theirs
    # Without user_id (the operator CLI) every row is answered, as before.
    assert (await jobs_client.import_status(theirs)).id == theirs


async def test_import_errors_of_another_user_are_not_shown(
    jobs_client: JobsClient,
    sessions: async_sessionmaker[AsyncSession],
    users: tuple[uuid.UUID, uuid.UUID],
) -> None:
    a, b = users
    theirs, unknown = await _import_of(sessions, b), uuid.uuid4()

    with pytest.raises(LookupError) as foreign:
        await jobs_client.import_errors(theirs, user_id=a)
    with pytest.raises(LookupError) as missing:
        await jobs_client.import_errors(unknown, limit=5, user_id=a)
    assert _shape(foreign, theirs) == _shape(missing, unknown) == "no import job <id>"

    (own,) = await jobs_client.import_errors(theirs, user_id=b)
    assert own.payload == {"email": "bob@private", "phone": "+1 555 0100"}
    assert await jobs_client.import_errors(unknown) == []  # no user_id: as before


@pytest.mark.parametrize("status", ["pending", "processing"])
async def test_cancel_of_another_users_import_changes_nothing(
    jobs_client: JobsClient,
    sessions: async_sessionmaker[AsyncSession],
    users: tuple[uuid.UUID, uuid.UUID],
    status: str,
) -> None:
    a, b = users
    theirs = await _import_of(sessions, b, status=status)

    with pytest.raises(LookupError, match=f"^no import job {theirs}$"):
        await jobs_client.cancel_import(theirs, user_id=a)

    async with sessions() as session:
        row = await session.get(ContactImportJob, theirs)
    assert row is not None
    assert (row.status, row.cancel_requested, row.finished_at, row.message) == (
        status,
        False,
        None,
        None,
    )
    cancelled = await jobs_client.cancel_import(theirs, user_id=b)  # the owner still can
    assert cancelled.status == ("cancelled" if status == "pending" else "processing")


async def test_export_status_and_url_of_another_user_look_like_an_unknown_id(
    jobs_client: JobsClient,
    sessions: async_sessionmaker[AsyncSession],
    users: tuple[uuid.UUID, uuid.UUID],
) -> None:
    a, b = users
    theirs, unknown = await _export_of(sessions, b), uuid.uuid4()

    for read in (jobs_client.export_status, jobs_client.export_url):
        with pytest.raises(LookupError) as foreign:
            await read(theirs, user_id=a)
        with pytest.raises(LookupError) as missing:
            await read(unknown, user_id=a)
        assert _shape(foreign, theirs) == _shape(missing, unknown) == "no export <id>"

    # A pending export of another user is not told apart either ("is pending" would be).
    pending = await _export_of(sessions, b, status="pending")
    with pytest.raises(LookupError, match=f"^no export {pending}$"):
        await jobs_client.export_url(pending, user_id=a)

    assert (await jobs_client.export_status(theirs, user_id=b)).id == theirs
    assert (await jobs_client.export_url(theirs, user_id=b)).endswith(f"/{b}/{theirs}.csv")


@job()
async def finished(ctx: Ctx, secret: str) -> dict[str, str]:
    return {"file_path": secret}


async def test_job_result_answers_only_the_jobs_of_the_users_own_rows(
    jobs_client: JobsClient,
    arq_redis: ArqRedis,
    sessions: async_sessionmaker[AsyncSession],
    users: tuple[uuid.UUID, uuid.UUID],
    run_burst: RunBurst,
) -> None:
    a, b = users
    mine, theirs = await _import_of(sessions, a), await _import_of(sessions, b)
    their_export = await _export_of(sessions, b)
    # Results a worker stored under the deterministic ids (worker/routes.py).
    stored = {
        import_job_id(mine): "mine",
        import_continuation_job_id(mine, 7): "mine, continued",
        import_job_id(theirs): "B's",
        import_continuation_job_id(theirs, 7): "B's, continued",
        export_job_id(their_export): "/exports/B/all.csv",
        f"welcome:{a}": "a welcome email",
        "email:k-1": "someone's email",
    }
    for arq_id, secret in stored.items():
        await arq_redis.enqueue_job(
            "finished", secret=secret, _job_id=arq_id, _queue_name="default"
        )
    worker = await run_burst("default", jobs=[finished])
    assert worker.jobs_complete == len(stored)

    assert await jobs_client.job_result(import_job_id(mine), user_id=a) == {"file_path": "mine"}
    continued = import_continuation_job_id(mine, 7)
    assert await jobs_client.job_result(continued, user_id=a) == {"file_path": "mine, continued"}
    refused = [
        import_job_id(theirs),
        import_continuation_job_id(theirs, 7),
        export_job_id(their_export),
        f"welcome:{a}",  # not an import or export row, even the user's own
        "email:k-1",
        import_job_id(mine).upper(),  # another spelling of an owned id
        f"import:{mine}:from:007",
        f"export:{mine}",  # an import's id in the export namespace
        "garbage",
    ]
    for arq_id in refused:
        with pytest.raises(LookupError) as raised:
            await jobs_client.job_result(arq_id, timeout_s=1, user_id=a)
        assert str(raised.value) == f"no job {arq_id}", arq_id

    # Without user_id (operators) any job is answered, as before.
    assert await jobs_client.job_result(export_job_id(their_export)) == {
        "file_path": "/exports/B/all.csv"
    }


@pytest.mark.parametrize(
    ("job_id", "named"),
    [
        ("import:{u}", ("import", "{u}")),
        ("import:{u}:from:12", ("import", "{u}")),
        ("export:{u}", ("export", "{u}")),
        ("export:{u}:from:12", None),
        ("import:{u}:from:", None),
        ("import:{u}:from:-1", None),
        ("import:{u}:from:\N{SUPERSCRIPT TWO}", None),
        ("import:{u}x", None),
        ("import:{{{u}}}", None),
        ("welcome:{u}", None),
        ("", None),
    ],
)
def test_row_of_job_id_takes_only_the_exact_ids_the_builders_make(
    job_id: str, named: tuple[str, str] | None
) -> None:
    u = uuid.uuid4()
    expected = None if named is None else (named[0], uuid.UUID(named[1].format(u=u)))
    assert row_of_job_id(job_id.format(u=u)) == expected
