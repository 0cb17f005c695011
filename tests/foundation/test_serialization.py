"""JSON-only payloads: round trips, compression, readable failures, and refusal of the rest."""

from __future__ import annotations

import gzip
import json
import pickle
import uuid
from datetime import UTC, date, datetime

import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus

from tests.conftest import RunBurst
from worker.context import Ctx
from worker.errors import PermanentError
from worker.job import job
from worker.serialization import (
    COMPRESS_ABOVE_BYTES,
    GZIP_MAGIC,
    MAX_PAYLOAD_BYTES,
    PayloadRefused,
    RemoteJobError,
    deserialize,
    serialize,
)


def test_job_payload_round_trips_datetimes_uuids_and_nesting() -> None:
    job_id = uuid.uuid4()
    when = datetime(2026, 11, 26, 8, 30, tzinfo=UTC)
    data = {"f": "x", "a": [1, "two"], "k": {"id": job_id, "at": when, "day": date(2026, 1, 2)}}
    encoded = serialize(data)
    assert encoded.startswith(b"{")
    assert deserialize(encoded) == data


def test_large_payloads_are_gzipped_and_round_trip() -> None:
    data = {"k": {"html": "<p>hello</p>" * 500}}
    encoded = serialize(data)
    assert encoded[:2] == GZIP_MAGIC
    assert len(encoded) < COMPRESS_ABOVE_BYTES
    assert deserialize(encoded) == data


def test_failed_result_stores_exception_as_readable_json() -> None:
    try:
        try:
            raise OSError("disk full")
        except OSError as cause:
            raise PermanentError("could not write the export") from cause
    except PermanentError as exc:
        encoded = serialize({"s": False, "r": exc})
    plain = json.loads(encoded)
    assert plain["r"] == {
        "$exc": {
            "type": "worker.errors.PermanentError",
            "message": "could not write the export: disk full",
        }
    }
    rebuilt = deserialize(encoded)["r"]
    assert isinstance(rebuilt, RemoteJobError)
    assert rebuilt.type_name == "worker.errors.PermanentError"
    assert str(rebuilt) == "worker.errors.PermanentError: could not write the export: disk full"


def test_unknown_types_are_refused_at_enqueue_time() -> None:
    with pytest.raises(TypeError, match="object values cannot be sent"):
        serialize({"k": object()})


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (pickle.dumps({"f": "send_email", "a": (), "k": {}}), "looks like a Python pickle"),
        (b"\x00\x01garbage", "not a JSON job payload"),
        (b"{not json", "not a valid JSON job payload"),
        (gzip.compress(pickle.dumps({"f": "x"})), "looks like a Python pickle"),
        (GZIP_MAGIC + b"broken", "corrupt gzip payload"),
        (gzip.compress(b"{" + b" " * (MAX_PAYLOAD_BYTES + 10) + b"}"), "larger than"),
    ],
    # gzip stamps the time into its header: fixed ids keep every xdist worker collecting alike.
    ids=["pickle", "binary", "broken-json", "gzipped-pickle", "broken-gzip", "oversized-gzip"],
)
def test_anything_but_our_json_is_refused(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadRefused, match=reason):
        deserialize(payload)


executed: list[str] = []


@job()
async def record_call(ctx: Ctx, label: str) -> dict[str, str]:
    executed.append(label)
    return {"label": label}


async def test_pickle_and_garbage_in_the_queue_are_refused_never_run_and_worker_goes_on(
    arq_redis: ArqRedis, redis_raw: aioredis.Redis, run_burst: RunBurst
) -> None:
    executed.clear()
    # Someone writes a pickle (arq's default format) and garbage bytes straight into Redis.
    for job_id, payload in (
        (
            "evil-pickle",
            pickle.dumps({"t": 1, "f": "record_call", "a": [], "k": {"label": "pwned"}}),
        ),
        ("garbage", b"\xde\xad\xbe\xef"),
    ):
        await redis_raw.set(f"arq:job:{job_id}", payload)
        await redis_raw.zadd("default", {job_id: 1})
    good = await arq_redis.enqueue_job("record_call", label="ok", _queue_name="default")
    assert good is not None

    worker = await run_burst("default", jobs=[record_call])

    assert executed == ["ok"]
    assert (worker.jobs_complete, worker.jobs_failed) == (1, 2)
    assert await good.result(timeout=1) == {"label": "ok"}
    for job_id in ("evil-pickle", "garbage"):
        refused = Job(job_id, arq_redis, _deserializer=deserialize)
        assert await refused.status() == JobStatus.complete
        info = await refused.result_info()
        assert info is not None and info.success is False
        assert isinstance(info.result, RemoteJobError)
        assert "unable to deserialize job" in str(info.result)
        # The stored failure itself is plain JSON any tool can read.
        stored = json.loads(await redis_raw.get(f"arq:result:{job_id}"))
        assert stored["r"]["$exc"]["type"] == "arq.jobs.DeserializationError"
