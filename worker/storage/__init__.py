"""Where export files go: the local disk (`STORAGE_BACKEND=local`) or S3 (`s3`).

storage = make_storage(settings, s3_client_factory(session, settings))
key = export_key(user_id, export_id)
async with storage.writer(key) as out:      # commit on normal exit, nothing left on error
    await conn.copy_from_query(sql, output=out.write, format="csv", header=True)
file_path = storage.location(key)           # /abs/EXPORT_DIR/u/e.csv or s3://bucket/exports/u/e.csv
url = await storage.url(key, expires_s=3600)  # file://... or a presigned GET URL
"""

from __future__ import annotations

from worker.settings import Settings
from worker.storage.base import Storage, StorageWriter, export_key, run_to_completion
from worker.storage.local import LocalStorage
from worker.storage.s3 import (
    DEFAULT_PART_SIZE_BYTES,
    S3ClientFactory,
    S3Storage,
    s3_client_factory,
)


def make_storage(
    settings: Settings,
    s3_client: S3ClientFactory | None = None,
    *,
    part_size_bytes: int = DEFAULT_PART_SIZE_BYTES,
) -> Storage:
    """The storage `STORAGE_BACKEND` names; `s3` needs `s3_client` (see `s3_client_factory`).

    Raises `ValueError` when `STORAGE_BACKEND=s3` and no client factory is given.
    """
    if settings.storage_backend == "local":
        return LocalStorage(settings.export_dir)
    if s3_client is None:
        raise ValueError("STORAGE_BACKEND=s3 needs an S3 client factory (s3_client_factory)")
    if not settings.s3_bucket:  # Settings already refuses this; kept for direct callers
        raise ValueError("STORAGE_BACKEND=s3 needs S3_BUCKET")
    return S3Storage(s3_client, settings.s3_bucket, part_size_bytes=part_size_bytes)


__all__ = [
    "LocalStorage",
    "S3ClientFactory",
    "S3Storage",
    "Storage",
    "StorageWriter",
    "export_key",
    "make_storage",
    "run_to_completion",
    "s3_client_factory",
]
