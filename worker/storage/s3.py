"""Exports in an S3 bucket (or any S3-compatible store), streamed as multipart uploads.

Client lifecycle: the worker's startup owns one `aioboto3.Session()` (credentials come from the
standard AWS variables or profile chain, never from our settings, and are never logged) and
puts `s3_client_factory(session, settings)` in the job ctx. Each writer or `url()` call opens a
client with `async with factory() as client:` and closes it when done, so a job never holds a
connection pool longer than it needs. To share one long-lived client instead, enter it in
startup's `AsyncExitStack` and pass `lambda: contextlib.nullcontext(client)` as the factory.

A writer buffers `part_size_bytes` (5 MiB by default, the least S3 accepts for a non-last part),
uploads full parts with `upload_part` and finishes with `complete_multipart_upload`. A file no
larger than one part is sent with one `put_object` instead. Any exception or cancellation
aborts the multipart upload, so no incomplete upload keeps costing storage.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import aiohttp
from aiobotocore.config import AioConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from worker.errors import PermanentError, TransientError, WorkerError
from worker.retry import PUBLIC_UNREACHABLE
from worker.storage.base import check_key, run_to_completion

if TYPE_CHECKING:
    import aioboto3
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

    from worker.settings import Settings

log = logging.getLogger(__name__)

#: S3's own floor for every part but the last (EntityTooSmall below it).
S3_MIN_PART_SIZE_BYTES = 5 * 1024 * 1024
#: S3's floor: the upload path holds ~2.8 bytes per byte of part (botocore and aiohttp copies),
#: so the smallest legal part keeps an S3 export's worker under 150 MB (bench/bench_export.py).
DEFAULT_PART_SIZE_BYTES = S3_MIN_PART_SIZE_BYTES
#: How long a cancelled writer keeps waiting for an in-flight request or the abort.
DEFAULT_ABORT_TIMEOUT_S = 30.0
CSV_CONTENT_TYPE = "text/csv; charset=utf-8"

#: Timeouts so a hung endpoint turns into a TransientError instead of a job stuck until
#: JOB_TIMEOUT_S; botocore's "standard" retry mode already retries throttling and 5xx a little.
DEFAULT_CLIENT_CONFIG = AioConfig(
    connect_timeout=10, read_timeout=60, retries={"mode": "standard", "max_attempts": 3}
)

S3ClientFactory = Callable[[], AbstractAsyncContextManager["S3Client"]]
"""`async with factory() as client:` yields an S3 client and closes it on exit."""


def s3_client_factory(
    session: aioboto3.Session, settings: Settings, config: AioConfig | None = None
) -> S3ClientFactory:
    """Clients of `session` for `S3_ENDPOINT_URL` / `S3_REGION` (None: AWS defaults)."""

    # Always SigV4: botocore still presigns S3 URLs with the deprecated SigV2 by default.
    client_config = (config or DEFAULT_CLIENT_CONFIG).merge(AioConfig(signature_version="s3v4"))

    def factory() -> AbstractAsyncContextManager[S3Client]:
        return session.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            config=client_config,
        )

    return factory


class S3Storage:
    """Objects in `bucket` under `key_prefix` (`exports/`): key `a/b.csv` is `exports/a/b.csv`."""

    def __init__(
        self,
        client_factory: S3ClientFactory,
        bucket: str,
        *,
        key_prefix: str = "exports/",
        part_size_bytes: int = DEFAULT_PART_SIZE_BYTES,
        abort_timeout_s: float = DEFAULT_ABORT_TIMEOUT_S,
    ) -> None:
        # Below S3_MIN_PART_SIZE_BYTES only works against stores that allow it (tests lower
        # moto's limit), so it is accepted but not the default.
        if part_size_bytes <= 0:
            raise ValueError("part_size_bytes must be positive")
        self.bucket = bucket
        self.key_prefix = key_prefix
        self.part_size_bytes = part_size_bytes
        self.abort_timeout_s = abort_timeout_s
        self._client_factory = client_factory

    def object_key(self, key: str) -> str:
        return self.key_prefix + check_key(key)

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.object_key(key)}"

    async def url(self, key: str, expires_s: int = 3600) -> str:
        """A presigned GET URL valid for `expires_s` seconds (signed locally, no request)."""
        with _mapped_errors("presign", self.location(key)):
            async with self._client_factory() as client:
                return await client.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": self.bucket, "Key": self.object_key(key)},
                    ExpiresIn=expires_s,
                )

    async def discard_abandoned(self, key: str) -> int:
        """Abort the open multipart uploads of `key` (their writers were killed mid-upload).

        Without this, each one keeps costing storage until a bucket lifecycle rule
        (AbortIncompleteMultipartUpload) removes it, if the bucket has one.
        """
        object_key = self.object_key(key)
        discarded = 0
        with _mapped_errors("abort abandoned uploads of", self.location(key)):
            async with self._client_factory() as client:
                paginator = client.get_paginator("list_multipart_uploads")
                async for page in paginator.paginate(Bucket=self.bucket, Prefix=object_key):
                    for upload in page.get("Uploads", []):
                        if upload.get("Key") != object_key or "UploadId" not in upload:
                            continue  # a longer key that shares the prefix
                        await client.abort_multipart_upload(
                            Bucket=self.bucket, Key=object_key, UploadId=upload["UploadId"]
                        )
                        discarded += 1
        return discarded

    @contextlib.asynccontextmanager
    async def writer(self, key: str) -> AsyncIterator[S3Writer]:
        # Creating a client does no network IO (credentials resolve at the first request).
        async with self._client_factory() as client:
            out = S3Writer(client, self, self.object_key(key), self.location(key))
            try:
                yield out
                await out.commit()
            except BaseException:
                # Still inside `async with client`: the client closes only after the abort.
                await out.abort()
                raise


class S3Writer:
    """Buffers one part; uploads it when more data follows, otherwise puts the object whole."""

    def __init__(self, client: S3Client, storage: S3Storage, object_key: str, location: str):
        self._client = client
        self._bucket = storage.bucket
        self._key = object_key
        self._location = location
        self._part_size_bytes = storage.part_size_bytes
        self._abort_timeout_s = storage.abort_timeout_s
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []
        self._bytes_written = 0

    @property
    def bytes_written(self) -> int:
        return self._bytes_written

    @property
    def parts_uploaded(self) -> int:
        return len(self._parts)

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self._buffer += chunk
        self._bytes_written += len(chunk)
        # Strictly greater: a file of exactly one part still goes out as a single put_object.
        while len(self._buffer) > self._part_size_bytes:
            part = bytes(self._buffer[: self._part_size_bytes])
            del self._buffer[: self._part_size_bytes]
            await self._upload_part(part)

    async def commit(self) -> None:
        body = bytes(self._buffer)
        self._buffer.clear()
        if self._upload_id is None:
            await self._call("put_object", self._put_object(body))
            return
        if body:
            await self._upload_part(body)
        await self._call("complete_multipart_upload", self._complete())

    async def abort(self) -> None:
        """Abort the multipart upload, if one was started; never raises an Exception."""
        if self._upload_id is None:
            return
        upload_id, self._upload_id = self._upload_id, None
        try:
            await run_to_completion(
                self._client.abort_multipart_upload(
                    Bucket=self._bucket, Key=self._key, UploadId=upload_id
                ),
                timeout_s=self._abort_timeout_s,
            )
        except Exception as exc:
            # The caller is already failing with its own error, which matters more. A bucket
            # lifecycle rule (AbortIncompleteMultipartUpload) is the backstop for this case.
            log.warning(
                "could not abort multipart upload %s of %s: %s", upload_id, self._location, exc
            )

    async def _upload_part(self, body: bytes) -> None:
        if self._upload_id is None:
            await self._call("create_multipart_upload", self._create())
        await self._call("upload_part", self._put_part(body))

    async def _call(self, operation: str, request: Awaitable[None]) -> None:
        # A request is never abandoned halfway: if the job is cancelled meanwhile we still
        # wait for its outcome (bounded by the client's timeouts), and the coroutines below
        # record it themselves, so the abort that follows knows of an upload created at the
        # last moment and no part is still landing when it runs.
        with _mapped_errors(operation, self._location):
            await run_to_completion(request)

    async def _create(self) -> None:
        created = await self._client.create_multipart_upload(
            Bucket=self._bucket, Key=self._key, ContentType=CSV_CONTENT_TYPE
        )
        self._upload_id = created["UploadId"]

    async def _put_part(self, body: bytes) -> None:
        assert self._upload_id is not None
        part_number = len(self._parts) + 1
        uploaded = await self._client.upload_part(
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=part_number,
            Body=body,
        )
        self._parts.append({"ETag": uploaded["ETag"], "PartNumber": part_number})

    async def _complete(self) -> None:
        assert self._upload_id is not None
        await self._client.complete_multipart_upload(
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": self._parts},
        )
        self._upload_id = None  # nothing left to abort

    async def _put_object(self, body: bytes) -> None:
        await self._client.put_object(
            Bucket=self._bucket, Key=self._key, Body=body, ContentType=CSV_CONTENT_TYPE
        )


# S3 error codes: https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "RequestTimeout",
        "OperationAborted",
        # The upload vanished under us (aborted elsewhere): starting over works.
        "NoSuchUpload",
    }
)
_PERMANENT_HINTS = {
    "AccessDenied": "the credentials may not write this bucket or key",
    "AllAccessDisabled": "all access to this bucket is disabled",
    "NoSuchBucket": "the bucket does not exist; check S3_BUCKET (and S3_ENDPOINT_URL)",
    "InvalidAccessKeyId": "the access key is unknown; check AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "the secret key does not match; check AWS_SECRET_ACCESS_KEY",
    "InvalidBucketName": "check S3_BUCKET",
    "ExpiredToken": "the session token has expired; check AWS_SESSION_TOKEN",
}


# Users see this, not the bucket, the key or the hint for the operator (worker.errors).
PUBLIC_STORAGE_ERROR = (
    "the file storage refused the request (a configuration problem on our side, logged for "
    "the operators); try again later, or contact support if it keeps happening"
)


def classify(exc: BaseException, operation: str, location: str) -> WorkerError | None:
    """The TransientError/PermanentError for an S3 client failure, or None if not one."""
    mapped = _classify(exc, operation, location)
    if mapped is None:
        return None
    if isinstance(mapped, TransientError):
        public = PUBLIC_UNREACHABLE
    elif _error_code(exc) in ("NoSuchKey", "NotFound"):
        public = "the file is not in storage (deleted, or never uploaded); upload it again"
    else:
        public = PUBLIC_STORAGE_ERROR
    return type(mapped)(str(mapped), public=public)


def _error_code(exc: BaseException) -> str | None:
    if not isinstance(exc, ClientError):
        return None
    return str(exc.response.get("Error", {}).get("Code", "")) or None


def _classify(exc: BaseException, operation: str, location: str) -> WorkerError | None:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        message = f"S3 {operation} for {location} failed: {code}"
        if error.get("Message"):
            message += f" ({error['Message']})"
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientError(message)
        if code in _PERMANENT_HINTS:
            message += f": {_PERMANENT_HINTS[code]}"
        return PermanentError(message)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return PermanentError(
            f"S3 {operation} for {location}: no usable AWS credentials "
            "(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile/role)"
        )
    if isinstance(exc, BotoConnectionError | HTTPClientError | ConnectionClosedError):
        # Connection refused, DNS, TLS, timeouts, a dropped connection: botocore's wrappers
        # around aiohttp's errors (aiobotocore/httpsession.py). Their text holds the endpoint.
        return TransientError(f"S3 {operation} for {location} failed: {exc}")
    if isinstance(exc, aiohttp.ClientError | TimeoutError):
        return TransientError(f"S3 {operation} for {location} failed: {type(exc).__name__}")
    if isinstance(exc, BotoCoreError):
        return PermanentError(f"S3 {operation} for {location} failed: {exc}")
    return None


@contextlib.contextmanager
def _mapped_errors(operation: str, location: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        mapped = classify(exc, operation, location)
        if mapped is None:
            raise
        raise mapped from exc


__all__ = [
    "DEFAULT_PART_SIZE_BYTES",
    "S3_MIN_PART_SIZE_BYTES",
    "S3ClientFactory",
    "S3Storage",
    "S3Writer",
    "classify",
    "s3_client_factory",
]
