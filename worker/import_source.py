"""Where a user's import may read from: their own directory or their own S3 upload prefix.

A local file must resolve, symlinks followed, inside `IMPORT_DIR/<user_id>/`; an S3 object
must be `s3://S3_BUCKET/uploads/<user_id>/...`. Anything else (another user's directory or
prefix, `exports/` keys, `..` tricks, a symlink into another user's directory) is refused:
the same bucket also holds every user's exports, and an id is all another user needs to name a
path. Checked by the client before anything is created and by the job against the row's owner
before it opens the file; the job then opens the file without following any further symlink
(`jobs.imports.sources.LocalFile`), so a swap after this check reads nothing outside.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from worker.settings import Settings

UPLOADS_PREFIX = "uploads/"


def user_import_dir(settings: Settings, user_id: uuid.UUID) -> Path:
    """`IMPORT_DIR/<user_id>/` below the resolved IMPORT_DIR.

    The user's own component is deliberately not resolved: if it were a symlink to another
    user's directory, files there must not count as inside.
    """
    return settings.import_dir.resolve() / str(user_id)


def s3_upload_prefix(user_id: uuid.UUID) -> str:
    """The key prefix of the user's uploads in S3_BUCKET."""
    return f"{UPLOADS_PREFIX}{user_id}/"


def resolve_import_source(settings: Settings, user_id: uuid.UUID | str, file_path: str) -> str:
    """The canonical source of `user_id`'s import: an absolute path with symlinks resolved, or
    `s3://bucket/key`.

    A relative path is relative to the user's directory, `IMPORT_DIR/<user_id>/`. Raises
    `ValueError` with a message that says what is allowed instead. Touches the filesystem
    (resolve, stat): call it off the event loop.
    """
    owner = _owner(user_id)
    if file_path.startswith("s3://"):
        return _s3_source(settings, owner, file_path)
    if "://" in file_path:
        raise ValueError(
            "import sources are files inside IMPORT_DIR/<user_id>/ or "
            "s3://S3_BUCKET/uploads/<user_id>/... URLs"
        )
    home = user_import_dir(settings, owner)
    candidate = Path(file_path)
    resolved = (candidate if candidate.is_absolute() else home / candidate).resolve()
    if not resolved.is_relative_to(home):
        raise ValueError(
            f"{file_path} resolves to {resolved}, outside IMPORT_DIR/{owner}/ ({home}); "
            "an import reads only files in its user's own directory"
        )
    if not resolved.is_file():
        raise ValueError(f"{file_path}: no such file in IMPORT_DIR/{owner}/ ({home})")
    return str(resolved)


def _s3_source(settings: Settings, owner: uuid.UUID, file_path: str) -> str:
    if not settings.s3_bucket:
        raise ValueError("s3:// imports need S3_BUCKET to be set on the worker")
    bucket, _, key = file_path.removeprefix("s3://").partition("/")
    prefix = s3_upload_prefix(owner)
    if bucket != settings.s3_bucket or not key.startswith(prefix) or key == prefix:
        raise ValueError(
            f"S3 imports must come from s3://{settings.s3_bucket}/{prefix}<name> "
            "(the user's own uploads; export files and other users' keys are refused)"
        )
    # S3 keys are literal, but some S3-compatible stores and proxies normalise dot segments:
    # `uploads/<A>/../<B>/x.csv` must not become B's upload anywhere on the way.
    segments = key[len(prefix) :].split("/")
    if "\\" in key or any(segment in ("", ".", "..") for segment in segments):
        raise ValueError(
            f"{file_path}: S3 import keys may not hold empty, '.' or '..' segments or backslashes"
        )
    return file_path


def _owner(user_id: uuid.UUID | str) -> uuid.UUID:
    if isinstance(user_id, uuid.UUID):
        return user_id
    try:
        return uuid.UUID(str(user_id))
    except ValueError:
        raise ValueError(f"user_id must be a UUID, not {user_id!r}") from None
