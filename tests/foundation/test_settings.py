"""Settings: defaults of CONTRACT §3, clear start-up errors, secrets that never show."""

from __future__ import annotations

import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from worker.main import worker_settings
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_contract_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    s = Settings()
    assert s.database_url == "postgresql+asyncpg://postgres@127.0.0.1:5432/contact360"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert (s.import_dir, s.export_dir) == (Path("data/imports"), Path("data/exports"))
    assert (s.storage_backend, s.email_provider, s.marketing_provider) == ("local", None, "none")
    assert s.email_from == "Contact360 <no-reply@localhost>"
    assert (s.email_rate_limit_per_s, s.job_timeout_s, s.job_soft_timeout_s) == (None, 1800, 1500)
    assert (s.keep_result_s, s.max_retries, s.retry_base_delay_s) == (3600, 3, 60)
    assert (s.worker_max_jobs_per_process, s.worker_max_memory_mb) == (1000, 200)
    assert (s.import_batch_rows, s.import_max_stored_errors) == (5000, 1000)


def test_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_BACKEND", "s3")
    monkeypatch.setenv("S3_BUCKET", "exports")
    monkeypatch.setenv("IMPORT_BATCH_ROWS", "250")
    monkeypatch.setenv("EMAIL_PROVIDER", "resend")
    monkeypatch.setenv("EMAIL_API_KEY", "re_live_secret")
    s = Settings()
    assert (s.storage_backend, s.s3_bucket, s.import_batch_rows) == ("s3", "exports", 250)
    assert s.email_api_key is not None
    assert s.email_api_key.get_secret_value() == "re_live_secret"
    assert s.email_base_url == "https://api.resend.com"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"database_url": "not a url"}, "DATABASE_URL is not a database URL"),
        ({"database_url": "mysql://u@h/db"}, "must point to PostgreSQL"),
        ({"database_url": "postgresql://u@h"}, "names no database"),
        ({"redis_url": "http://h"}, "REDIS_URL must start with redis://"),
        ({"job_timeout_s": -5}, "greater than 0"),
        ({"job_soft_timeout_s": 1800}, "JOB_SOFT_TIMEOUT_S (1800) must be below JOB_TIMEOUT_S"),
        ({"storage_backend": "s3"}, "STORAGE_BACKEND=s3 needs S3_BUCKET"),
        ({"storage_backend": "ftp"}, "'local' or 's3'"),
        ({"email_provider": "sendgrid"}, "EMAIL_PROVIDER=sendgrid needs EMAIL_API_KEY"),
        ({"max_retries": -1}, "greater than or equal to 0"),
    ],
)
def test_invalid_settings_fail_with_a_clear_message(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**overrides)
    assert message in str(caught.value)


def test_plain_postgres_scheme_is_normalised_to_asyncpg() -> None:
    s = Settings(database_url="postgresql://u@h:5433/db")
    assert s.database_url == "postgresql+asyncpg://u@h:5433/db"


def test_secrets_never_show_in_repr() -> None:
    s = Settings(
        database_url="postgresql://app:pg-secret@h/db",
        email_provider="resend",
        email_api_key="re_secret",
        marketing_provider="sendgrid",
        marketing_api_key="SG.secret",
    )
    shown = repr(s) + str(s)
    for secret in ("pg-secret", "re_secret", "SG.secret"):
        assert secret not in shown
    assert "app:***@h" in shown


def test_cli_reports_bad_settings_in_one_line_without_the_secret(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": "mysql://app:hunter2@h/db",
        "HOME": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-m", "worker", "migrate"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: invalid configuration: DATABASE_URL: Value error, "
        "DATABASE_URL must point to PostgreSQL (postgresql+asyncpg://...), not 'mysql'"
    ]
    assert "hunter2" not in done.stdout + done.stderr


# ---- L2: no password of any URL in a repr, str or validation error -----------------------------

DB_PASSWORD, REDIS_PASSWORD, QUERY_PASSWORD = "DbPw-7f3a", "RedisPw-91c2", "QueryPw-55d0"
PASSWORDS = (DB_PASSWORD, REDIS_PASSWORD, QUERY_PASSWORD)


def _error_texts(error: ValidationError) -> str:
    """Everything a log line, a traceback or an error tracker could take from the error."""
    return "\n".join(
        [
            str(error),
            repr(error),
            repr(error.errors()),
            error.json(),
            "".join(traceback.format_exception(error)),
            repr(error.__context__),
            repr(error.__cause__),
        ]
    )


def test_no_url_password_in_the_repr_of_settings_or_the_worker_built_from_them() -> None:
    s = Settings(
        database_url=f"postgresql://app:{DB_PASSWORD}@db:5432/contact360",
        redis_url=f"redis://worker:{REDIS_PASSWORD}@redis:6379/0?password={QUERY_PASSWORD}",
    )
    # What a web app logs, and the arq worker kwargs (ctx included) an error tracker may capture.
    shown = repr(s) + str(s) + repr(s.redis_settings())
    shown += repr(worker_settings("imports", s, jobs=[], crons=[]))
    for password in PASSWORDS:
        assert password not in shown
    assert "redis://worker:***@redis:6379/0?password=***" in repr(s)
    assert "app:***@db" in repr(s)


@pytest.mark.parametrize(
    "overrides",
    [
        {"database_url": f"mysql://app:{DB_PASSWORD}@db/contact360"},
        {"database_url": f"postgresql://app:{DB_PASSWORD}@db:5432/"},
        {"database_url": f"postgresql://app:{DB_PASSWORD}@db:notaport/x"},
        {"redis_url": f"http://:{REDIS_PASSWORD}@redis:6379/0"},
        {"job_timeout_s": f"redis://:{REDIS_PASSWORD}@redis"},
        # A model-level error: pydantic's input there is every value, both URLs included.
        {
            "database_url": f"postgresql://app:{DB_PASSWORD}@db/x",
            "redis_url": f"redis://:{REDIS_PASSWORD}@redis/0",
            "storage_backend": "s3",
        },
    ],
)
def test_validation_errors_never_carry_the_input(
    overrides: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValidationError) as by_keyword:
        Settings(**overrides)
    # The same values from the environment, as a web app's `Settings()` reads them.
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    for name, value in overrides.items():
        monkeypatch.setenv(name.upper(), value)
    with pytest.raises(ValidationError) as from_env:
        Settings()
    for caught in (by_keyword, from_env):
        texts = _error_texts(caught.value)
        for password in PASSWORDS:
            assert password not in texts
        # Still actionable: the error names the setting.
        assert any(name in texts.lower() for name in overrides)


def test_arqs_own_cli_does_not_print_the_password_of_a_bad_url(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "DATABASE_URL": f"mysql://app:{DB_PASSWORD}@db/contact360",
        "REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "arq", "worker.main.ImportsWorker"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "DATABASE_URL must point to PostgreSQL" in done.stderr
    for password in PASSWORDS:
        assert password not in done.stdout + done.stderr


def test_an_empty_api_key_reads_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    # What compose passes for `EMAIL_API_KEY=` left empty in .env.
    monkeypatch.setenv("EMAIL_PROVIDER", "resend")
    monkeypatch.setenv("EMAIL_API_KEY", "  ")
    with pytest.raises(ValidationError, match="EMAIL_PROVIDER=resend needs EMAIL_API_KEY"):
        Settings()


@pytest.mark.parametrize(
    ("provider", "rate_per_s"), [("resend", 5.0), ("sendgrid", 10.0), ("console", 100.0)]
)
def test_the_email_rate_defaults_to_the_providers_documented_figure(
    monkeypatch: pytest.MonkeyPatch, provider: str, rate_per_s: float
) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("EMAIL_PROVIDER", provider)
    monkeypatch.setenv("EMAIL_API_KEY", "re_key")
    monkeypatch.setenv("EMAIL_RATE_LIMIT_PER_S", "")  # compose passes an unset one so
    assert Settings().email_rate_per_s == rate_per_s
    # The marketing limiter has its own figure, whatever the email provider allows.
    assert Settings().marketing_rate_per_s == 10.0
    monkeypatch.setenv("EMAIL_RATE_LIMIT_PER_S", "40")
    monkeypatch.setenv("MARKETING_RATE_LIMIT_PER_S", "3")
    assert (Settings().email_rate_per_s, Settings().marketing_rate_per_s) == (40.0, 3.0)
