"""MAX_PAYLOAD_BYTES holds for every payload, plain JSON as well as gzip, at both ends."""

from __future__ import annotations

import gzip
import os

import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq.jobs import Job, SerializationError

from tests.conftest import RunBurst
from worker.context import Ctx
from worker.job import job
from worker.serialization import MAX_PAYLOAD_BYTES, PayloadRefused, deserialize


def _plain_json_of(size_bytes: int) -> bytes:
    """A valid, uncompressed job payload of exactly `size_bytes` bytes."""
    head = b'{"t":1,"f":"record_size","a":[],"k":{"label":"'
    tail = b'"},"et":1}'
    return head + b"x" * (size_bytes - len(head) - len(tail)) + tail


@pytest.mark.parametrize(
    "payload",
    [
        _plain_json_of(MAX_PAYLOAD_BYTES + 1),
        # Incompressible bytes behind the gzip magic: refused by its size, never inflated.
        gzip.compress(os.urandom(MAX_PAYLOAD_BYTES + 1), compresslevel=1),
    ],
    ids=["plain-json", "gzip"],
)
def test_a_payload_over_the_cap_is_refused_before_parsing(payload: bytes) -> None:
    assert len(payload) > MAX_PAYLOAD_BYTES
    with pytest.raises(PayloadRefused, match=f"larger than {MAX_PAYLOAD_BYTES}; refusing it"):
        deserialize(payload)


def test_a_payload_at_the_cap_is_still_read() -> None:
    payload = _plain_json_of(MAX_PAYLOAD_BYTES)
    assert deserialize(payload)["f"] == "record_size"


async def test_a_caller_cannot_enqueue_a_payload_the_worker_would_refuse(
    arq_redis: ArqRedis, redis_raw: aioredis.Redis
) -> None:
    with pytest.raises(SerializationError) as raised:
        await arq_redis.enqueue_job(
            "record_size", label="x" * MAX_PAYLOAD_BYTES, _queue_name="default"
        )
    assert isinstance(raised.value.__cause__, ValueError)
    assert "keep bulk data in PostgreSQL or S3" in str(raised.value.__cause__)
    assert await redis_raw.zcard("default") == 0


executed: list[int] = []


@job()
async def record_size(ctx: Ctx, label: str) -> dict[str, int]:
    executed.append(len(label))
    return {"size": len(label)}


async def test_an_oversized_raw_payload_in_the_queue_fails_alone_and_the_worker_goes_on(
    arq_redis: ArqRedis, redis_raw: aioredis.Redis, run_burst: RunBurst
) -> None:
    executed.clear()
    # Someone writes a valid but oversized, uncompressed JSON job straight into Redis.
    await redis_raw.set("arq:job:too-big", _plain_json_of(MAX_PAYLOAD_BYTES + 1))
    await redis_raw.zadd("default", {"too-big": 1})
    good = await arq_redis.enqueue_job("record_size", label="ok", _queue_name="default")
    assert good is not None

    worker = await run_burst("default", jobs=[record_size])

    assert executed == [2]
    assert (worker.jobs_complete, worker.jobs_failed) == (1, 1)
    info = await Job("too-big", arq_redis, _deserializer=deserialize).result_info()
    assert info is not None and info.success is False
    assert "unable to deserialize job" in str(info.result)
