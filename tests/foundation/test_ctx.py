"""The typed ctx tells the truth: what startup opens is always there, or nothing is.

mypy checks reads of required TypedDict keys only (python/mypy#12094), so every key a job can
rely on must be required; these tests keep the type and `lifecycle.startup` in step.
"""

from __future__ import annotations

import asyncio
from typing import Any, NotRequired, get_origin, get_type_hints

import aioboto3
import httpx
import pytest
from arq.connections import ArqRedis

import worker.lifecycle
from jobs.email.batcher import EmailBatcher
from tests.support.ctx import CtxOpener, startup_with
from worker.context import Ctx, Resources
from worker.http import make_http_client
from worker.lease import Leases
from worker.lifecycle import shutdown, startup
from worker.recycle import Recycler
from worker.settings import Settings
from worker.storage import LocalStorage

# Set by worker.job for each run; a job's coroutine called without the wrapper has none.
NOT_ALWAYS_THERE = {"soft_deadline"}


def not_required(typed_dict: type) -> set[str]:
    """The `NotRequired` keys, read from the evaluated annotations: with postponed annotations
    (PEP 563) `__optional_keys__` cannot see them."""
    # The names worker/context.py imports for type checking only.
    names = {
        "aioboto3": aioboto3,
        "ArqRedis": ArqRedis,
        "Leases": Leases,
        "Recycler": Recycler,
        "EmailBatcher": EmailBatcher,
    }
    hints = get_type_hints(typed_dict, localns=names, include_extras=True)
    return {key for key, hint in hints.items() if get_origin(hint) is NotRequired}


def test_every_key_of_a_jobs_ctx_is_required_but_the_soft_deadline() -> None:
    assert not_required(Ctx) == NOT_ALWAYS_THERE
    assert not_required(Resources) == set()
    assert {"leases", "recycler", "email_batcher", "job_id"} <= Ctx.__annotations__.keys()


@pytest.mark.parametrize("queue", ["imports", "exports", "default"])
async def test_startup_fills_every_resource_with_its_type(
    settings: Settings, arq_redis: ArqRedis, queue: str
) -> None:
    ctx: dict[str, Any] = {"settings": settings, "queue_name": queue, "redis": arq_redis}
    await startup(ctx)
    try:
        assert Resources.__required_keys__ <= ctx.keys()
        assert isinstance(ctx["leases"], Leases) and ctx["leases"].queue == queue
        assert isinstance(ctx["recycler"], Recycler)
        assert isinstance(ctx["http"], httpx.AsyncClient)
    finally:
        await shutdown(ctx)


def renewal_tasks() -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks() if task.get_name() == "c360-lease-renewal"]


async def test_a_failing_startup_closes_what_it_opened_and_adds_nothing(
    settings: Settings, arq_redis: ArqRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[httpx.AsyncClient] = []

    def recorded_http_client() -> Any:
        client = make_http_client()
        opened.append(client)
        return client

    def no_recycler(**limits: int) -> Recycler:
        raise RuntimeError("injected: the last resource cannot be made")

    monkeypatch.setattr(worker.lifecycle, "make_http_client", recorded_http_client)
    monkeypatch.setattr(worker.lifecycle, "Recycler", no_recycler)
    ctx: dict[str, Any] = {"settings": settings, "queue_name": "exports", "redis": arq_redis}

    with pytest.raises(RuntimeError, match="injected"):
        await startup(ctx)

    assert sorted(ctx) == ["queue_name", "redis", "settings"]
    [http] = opened
    assert http.is_closed
    await asyncio.sleep(0)  # let the cancelled renewal task finish
    assert renewal_tasks() == []
    await shutdown(ctx)  # what arq does next: nothing left to close, and no error


async def test_open_ctx_swaps_in_the_tests_resources_and_gives_the_job_keys(
    open_ctx: CtxOpener, tmp_path: Any
) -> None:
    storage = LocalStorage(tmp_path)
    ctx = await open_ctx("exports", storage=storage)
    assert ctx["storage"] is storage
    assert ctx["job_try"] == 1 and ctx["job_id"].startswith("test-")


def test_a_misspelt_resource_is_refused_naming_it() -> None:
    with pytest.raises(TypeError, match=r"not a resource lifecycle\.startup opens: storge"):
        startup_with(storge=object())
