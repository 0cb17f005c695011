"""Calls that mypy (`make lint`) must accept or reject: a job keeps its coroutine's signature.

Not a pytest module (nothing here runs): mypy checks it with the rest of tests/. Each
`type: ignore[code]` marks a call that must stay an error; strict mode's warn_unused_ignores
fails the lint when one is accepted, as it would be if `JobDefinition` lost its ParamSpec
(`Callable[..., Any]` takes any arguments and returns Any).
"""

from __future__ import annotations

from typing import assert_type

from db.models import ImportStatusName
from jobs.email.outbox import SendResult
from jobs.email.transactional import send_email
from jobs.exports.job import ExportResult, generate_contact_export
from jobs.imports.job import ImportResult, process_contacts_import
from worker.context import Ctx
from worker.reconcile import ReconcileResult, reconcile_jobs


async def calls(ctx: Ctx) -> None:
    assert_type(await generate_contact_export.run(ctx, export_id="x"), ExportResult)
    assert_type(await process_contacts_import.coroutine(ctx, job_id="x"), ImportResult)
    assert_type(await reconcile_jobs.run(ctx), ReconcileResult)
    sent = await send_email.run(ctx, to="a@b.co", subject="s", html="<p>h</p>", text=None)
    assert_type(sent, SendResult)
    imported = await process_contacts_import.run(ctx, job_id="x")
    assert_type(imported["status"], ImportStatusName)

    await generate_contact_export.run(ctx, export_ix="x")  # type: ignore[call-arg]  # misspelt
    await send_email.run(ctx, to="a@b.co", subject=1, html="")  # type: ignore[arg-type]  # int
    await reconcile_jobs.run(ctx, "extra")  # type: ignore[call-arg]  # a cron takes none
    imported["imported"]  # type: ignore[misc]  # not a key of ImportResult
