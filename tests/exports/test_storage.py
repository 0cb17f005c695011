"""Export storage: local atomic files and S3 multipart uploads against moto's server."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.exports.conftest import TEST_CLIENT_CONFIG
from tests.support.s3_server import TEST_PART_SIZE_BYTES, client_error
from worker.errors import PermanentError, TransientError
from worker.settings import Settings
from worker.storage import (
    LocalStorage,
    S3ClientFactory,
    S3Storage,
    StorageWriter,
    export_key,
    make_storage,
    s3_client_factory,
)
from worker.storage.local import LocalWriter
from worker.storage.s3 import classify

USER_ID = uuid.UUID("11111111-1111-4111-8111-111111111111")
EXPORT_ID = uuid.UUID("22222222-2222-4222-8222-222222222222")
KEY = f"{USER_ID}/{EXPORT_ID}.csv"


def payload(size_bytes: int) -> bytes:
    """Deterministic, non-repeating-looking bytes, so misplaced parts change the content."""
    out = bytearray()
    counter = 0
    while len(out) < size_bytes:
        out += hashlib.sha256(counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size_bytes])


async def write_in_chunks(out: StorageWriter, data: bytes, chunk_bytes: int) -> None:
    for start in range(0, len(data), chunk_bytes):
        await out.write(data[start : start + chunk_bytes])


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# --- keys and the factory ----------------------------------------------------------------


def test_export_key_is_user_then_export_id() -> None:
    assert export_key(USER_ID, str(EXPORT_ID)) == KEY


@pytest.mark.parametrize("bad", ["../etc/passwd", "not-a-uuid", ""])
def test_export_key_refuses_non_uuid_ids(bad: str) -> None:
    with pytest.raises(ValueError):
        export_key(bad, EXPORT_ID)


@pytest.mark.parametrize(
    "bad_key", ["../x.csv", "/abs.csv", "a//b.csv", "a/./b.csv", "a\\b.csv", ""]
)
def test_storages_refuse_keys_that_escape_their_root(tmp_path: Path, bad_key: str) -> None:
    with pytest.raises(ValueError, match="invalid storage key"):
        LocalStorage(tmp_path).location(bad_key)


def test_make_storage_local_is_rooted_at_export_dir(tmp_path: Path) -> None:
    storage = make_storage(Settings(export_dir=tmp_path / "exports"))
    assert isinstance(storage, LocalStorage)
    assert storage.location(KEY) == str(tmp_path / "exports" / KEY)


def test_make_storage_s3_needs_a_client_factory() -> None:
    settings = Settings(storage_backend="s3", s3_bucket="bucket-a")
    with pytest.raises(ValueError, match="S3 client factory"):
        make_storage(settings)


# --- local -------------------------------------------------------------------------------


async def test_local_round_trip_through_several_flushes(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, buffer_bytes=1000)
    data = payload(10_500)
    async with storage.writer(KEY) as out:
        await write_in_chunks(out, data, 333)
    assert out.bytes_written == 10_500
    assert (tmp_path / KEY).read_bytes() == data
    assert files_under(tmp_path) == [KEY]
    assert storage.location(KEY) == str(tmp_path / KEY)
    assert await storage.url(KEY) == (tmp_path / KEY).as_uri()


async def test_local_unicode_round_trip_split_inside_characters(tmp_path: Path) -> None:
    text = 'id,name\n1,Zoë Ørsted\n2,東京 😀\n3,"=cmd"\n'
    data = text.encode("utf-8")
    storage = LocalStorage(tmp_path, buffer_bytes=4)
    async with storage.writer(KEY) as out:
        await write_in_chunks(out, data, 3)  # 3-byte chunks cut the multi-byte characters
    assert (tmp_path / KEY).read_text(encoding="utf-8") == text


async def test_local_final_name_appears_only_at_commit(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, buffer_bytes=10)
    final = tmp_path / KEY
    async with storage.writer(KEY) as out:
        await out.write(b"a" * 25)  # over buffer_bytes: the whole buffer goes to the file
        assert not final.exists()
        [tmp] = files_under(tmp_path)
        assert tmp.startswith(f"{USER_ID}/.{EXPORT_ID}.csv.") and tmp.endswith(".tmp")
        assert (tmp_path / tmp).read_bytes() == b"a" * 25
        await out.write(b"b" * 5)  # under buffer_bytes: stays in memory until commit
        assert (tmp_path / tmp).read_bytes() == b"a" * 25
    assert files_under(tmp_path) == [KEY]
    assert final.read_bytes() == b"a" * 25 + b"b" * 5
    # Owner-only, whatever the umask (audit L8; tests/foundation/test_export_file_modes.py).
    assert final.stat().st_mode & 0o777 == 0o600


async def test_local_failure_inside_the_block_leaves_nothing(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, buffer_bytes=10)
    with pytest.raises(RuntimeError, match="query failed"):
        async with storage.writer(KEY) as out:
            await out.write(b"x" * 50)
            raise RuntimeError("query failed")
    assert files_under(tmp_path) == []


async def test_local_failed_rewrite_keeps_the_previous_file_whole(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, buffer_bytes=10)
    async with storage.writer(KEY) as out:
        await out.write(b"old export")
    with pytest.raises(RuntimeError):
        async with storage.writer(KEY) as out:
            await out.write(b"new, partial" * 10)
            raise RuntimeError("boom")
    assert (tmp_path / KEY).read_bytes() == b"old export"
    assert files_under(tmp_path) == [KEY]


async def test_local_cancelled_task_leaves_no_partial_or_temp_file(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, buffer_bytes=100)
    halfway = asyncio.Event()

    async def export() -> None:
        async with storage.writer(KEY) as out:
            await out.write(b"r" * 1000)
            halfway.set()
            await asyncio.Event().wait()  # a COPY that is still streaming

    task = asyncio.create_task(export())
    await halfway.wait()
    assert len(files_under(tmp_path)) == 1  # the temporary file, 1000 bytes in
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert files_under(tmp_path) == []


async def test_local_cancel_during_a_threaded_write_waits_for_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temporary file is removed only after the thread writing it has finished."""
    in_write = threading.Event()
    release = threading.Event()
    original = LocalWriter._write_sync

    def slow_write(self: LocalWriter, block: bytearray) -> None:
        in_write.set()
        assert release.wait(10)
        original(self, block)

    monkeypatch.setattr(LocalWriter, "_write_sync", slow_write)
    storage = LocalStorage(tmp_path, buffer_bytes=10)

    async def export() -> None:
        async with storage.writer(KEY) as out:
            await out.write(b"z" * 20)

    task = asyncio.create_task(export())
    assert await asyncio.to_thread(in_write.wait, 10)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # still waiting for the thread, not racing it
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert files_under(tmp_path) == []


# --- S3 ----------------------------------------------------------------------------------


def md5_etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'


def multipart_etag(parts: list[bytes]) -> str:
    # S3's multipart ETag: MD5 of the concatenated part MD5s, then "-<number of parts>".
    digest = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    return f'"{digest}-{len(parts)}"'


def assert_nothing_left(s3: Any, bucket: str) -> None:
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


async def test_s3_small_file_is_one_put_object(
    s3_storage: S3Storage, s3: Any, s3_bucket: str
) -> None:
    data = "id,email\n1,zoë@example.com\n".encode()
    async with s3_storage.writer(KEY) as out:
        await write_in_chunks(out, data, 5)
    assert out.parts_uploaded == 0
    obj = s3.get_object(Bucket=s3_bucket, Key=f"exports/{KEY}")
    assert obj["Body"].read() == data
    assert obj["ETag"] == md5_etag(data)  # a multipart upload's ETag would end in "-N"
    assert obj["ContentType"] == "text/csv; charset=utf-8"
    assert s3_storage.location(KEY) == f"s3://{s3_bucket}/exports/{KEY}"


async def test_s3_exactly_one_part_is_still_one_put(
    s3_storage: S3Storage, s3: Any, s3_bucket: str
) -> None:
    data = payload(TEST_PART_SIZE_BYTES)
    async with s3_storage.writer(KEY) as out:
        await write_in_chunks(out, data, 10_000)
    obj = s3.get_object(Bucket=s3_bucket, Key=f"exports/{KEY}")
    assert (obj["ETag"], obj["Body"].read()) == (md5_etag(data), data)


async def test_s3_empty_file_is_an_empty_object(
    s3_storage: S3Storage, s3: Any, s3_bucket: str
) -> None:
    async with s3_storage.writer(KEY):
        pass
    assert s3.get_object(Bucket=s3_bucket, Key=f"exports/{KEY}")["Body"].read() == b""


async def test_s3_large_file_is_a_multipart_upload_of_full_parts(
    s3_storage: S3Storage, s3: Any, s3_bucket: str
) -> None:
    data = payload(3 * TEST_PART_SIZE_BYTES + 1234)
    async with s3_storage.writer(KEY) as out:
        await write_in_chunks(out, data, 65_521)  # chunk size unrelated to the part size
    assert out.parts_uploaded == 4
    parts = [data[i : i + TEST_PART_SIZE_BYTES] for i in range(0, len(data), TEST_PART_SIZE_BYTES)]
    assert [len(p) for p in parts] == [TEST_PART_SIZE_BYTES] * 3 + [1234]
    obj = s3.get_object(Bucket=s3_bucket, Key=f"exports/{KEY}")
    assert obj["ETag"] == multipart_etag(parts)
    assert obj["Body"].read() == data
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


async def test_s3_failure_mid_multipart_aborts_the_upload(
    s3_storage: S3Storage, s3: Any, s3_bucket: str
) -> None:
    with pytest.raises(RuntimeError, match="database went away"):
        async with s3_storage.writer(KEY) as out:
            await out.write(payload(2 * TEST_PART_SIZE_BYTES + 10))
            assert out.parts_uploaded == 2
            # The upload really is in progress on the server before the failure.
            [upload] = s3.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]
            assert upload["Key"] == f"exports/{KEY}"
            raise RuntimeError("database went away")
    assert_nothing_left(s3, s3_bucket)


async def test_s3_cancelled_task_aborts_the_upload(
    s3_storage: S3Storage, s3: Any, s3_bucket: str
) -> None:
    halfway = asyncio.Event()

    async def export() -> None:
        async with s3_storage.writer(KEY) as out:
            await out.write(payload(2 * TEST_PART_SIZE_BYTES + 10))
            halfway.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(export())
    await halfway.wait()
    assert len(s3.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_nothing_left(s3, s3_bucket)


@pytest.mark.parametrize("cancel_after_s", [0.0, 0.01, 0.03, 0.1])
async def test_s3_cancel_at_any_moment_leaves_nothing(
    s3_storage: S3Storage, s3: Any, s3_bucket: str, cancel_after_s: float
) -> None:
    """Cancelled wherever it happens to be (creating the upload, mid-part, between parts)."""

    async def export() -> None:
        async with s3_storage.writer(KEY) as out:
            for _ in range(40):
                await out.write(payload(TEST_PART_SIZE_BYTES // 2))
            await asyncio.Event().wait()

    task = asyncio.create_task(export())
    await asyncio.sleep(cancel_after_s)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_nothing_left(s3, s3_bucket)


async def test_s3_presigned_url_downloads_the_object(s3_storage: S3Storage) -> None:
    data = "id,city\n1,Zürich\n".encode()
    async with s3_storage.writer(KEY) as out:
        await out.write(data)
    url = await s3_storage.url(KEY, expires_s=600)
    assert "X-Amz-Expires=600" in url
    async with httpx.AsyncClient() as http:
        response = await http.get(url)
    assert (response.status_code, response.content) == (200, data)


async def test_s3_missing_bucket_is_a_permanent_error(s3_factory: S3ClientFactory, s3: Any) -> None:
    storage = S3Storage(s3_factory, "no-such-bucket-here", part_size_bytes=TEST_PART_SIZE_BYTES)
    with pytest.raises(PermanentError) as caught:
        async with storage.writer(KEY) as out:
            await out.write(b"x" * 10)
    assert str(caught.value) == (
        f"S3 put_object for s3://no-such-bucket-here/exports/{KEY} failed: NoSuchBucket "
        "(The specified bucket does not exist): the bucket does not exist; check S3_BUCKET "
        "(and S3_ENDPOINT_URL)"
    )


async def test_s3_unreachable_endpoint_is_a_transient_error(
    aioboto3_session: Any, s3_bucket: str
) -> None:
    settings = Settings(
        storage_backend="s3",
        s3_bucket=s3_bucket,
        s3_endpoint_url=f"http://127.0.0.1:{unused_port()}",
        s3_region="us-east-1",
    )
    factory = s3_client_factory(aioboto3_session, settings, config=TEST_CLIENT_CONFIG)
    storage = S3Storage(factory, s3_bucket)
    with pytest.raises(TransientError) as caught:
        async with storage.writer(KEY) as out:
            await out.write(b"x")
    assert str(caught.value).startswith(
        f"S3 put_object for s3://{s3_bucket}/exports/{KEY} failed: "
    )
    assert "testing" not in str(caught.value)  # the fake secret key never shows


def unused_port() -> int:
    """A loopback port nothing listens on: bound to learn a free number, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("SlowDown", 503, TransientError),
        ("InternalError", 500, TransientError),
        ("Whatever", 502, TransientError),
        ("Throttling", 400, TransientError),
        ("TooManyRequests", 429, TransientError),
        ("NoSuchUpload", 404, TransientError),
        ("AccessDenied", 403, PermanentError),
        ("NoSuchBucket", 404, PermanentError),
        ("InvalidAccessKeyId", 403, PermanentError),
        ("EntityTooSmall", 400, PermanentError),
    ],
)
def test_classify_client_errors(code: str, status: int, expected: type[Exception]) -> None:
    mapped = classify(client_error(code, status), "upload_part", "s3://b/k")
    assert type(mapped) is expected
    assert str(mapped).startswith(f"S3 upload_part for s3://b/k failed: {code} (msg)")


def test_classify_leaves_unrelated_errors_alone() -> None:
    assert classify(ValueError("x"), "upload_part", "s3://b/k") is None
