"""Where an import may read from: a file inside IMPORT_DIR, or an object in S3_BUCKET.

Checked twice, by the client before anything is created and by the job before it opens the
file, because a symlink inside IMPORT_DIR can be swapped between the two.
"""

from __future__ import annotations

from pathlib import Path

from worker.settings import Settings


def resolve_import_source(settings: Settings, file_path: str) -> str:
    """The canonical source (an absolute path with symlinks resolved, or `s3://bucket/key`).

    Raises `ValueError` with a message that says what is allowed instead.
    """
    if file_path.startswith("s3://"):
        bucket, _, key = file_path.removeprefix("s3://").partition("/")
        if not settings.s3_bucket:
            raise ValueError("s3:// imports need S3_BUCKET to be set on the worker")
        if bucket != settings.s3_bucket or not key:
            raise ValueError(f"S3 imports must come from s3://{settings.s3_bucket}/<key>")
        return file_path
    if "://" in file_path:
        raise ValueError("import sources are files inside IMPORT_DIR or s3://S3_BUCKET/key URLs")
    root = settings.import_dir.resolve()
    candidate = Path(file_path)
    # Relative paths are relative to IMPORT_DIR, which is all a web app should know about.
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(
            f"{file_path} resolves to {resolved}, outside IMPORT_DIR ({root}); "
            "copy the file into IMPORT_DIR first"
        )
    if not resolved.is_file():
        raise ValueError(f"{file_path}: no such file in IMPORT_DIR ({root})")
    return str(resolved)
