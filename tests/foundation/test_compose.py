"""docker-compose.yml stays runnable and consistent with the settings (no engine runs here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from worker.main import QUEUES
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
AWS_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def _with_defaults(value: str) -> str:
    """What compose substitutes when the operator sets none of the variables."""
    return DEFAULTED.sub(lambda m: m.group(2), value)


def test_the_expected_services_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    workers = {f"worker-{queue}" for queue in QUEUES}
    assert {"postgres", "redis", "s3", "s3-bucket", "migrate"} | workers == set(services)
    assert "--appendonly" in services["redis"]["command"]
    assert (
        services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1]
        == "yes"
    )
    for name in ("postgres", "redis", "s3"):
        assert services[name]["healthcheck"]["test"], name
    assert services["migrate"]["command"] == ["python", "-m", "worker", "migrate"]
    assert services["migrate"]["restart"] == "no"


def test_each_queue_has_a_restarting_healthchecked_worker(compose: dict[str, Any]) -> None:
    for queue in QUEUES:
        service = compose["services"][f"worker-{queue}"]
        assert service["command"] == ["python", "-m", "worker", "work", queue]
        assert service["restart"] in ("always", "unless-stopped")
        assert service["healthcheck"]["test"] == [
            "CMD",
            "python",
            "-m",
            "worker",
            "health",
            "--queue",
            queue,
        ]
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_worker_environment_is_valid_settings_pointing_at_the_services(
    compose: dict[str, Any],
) -> None:
    env = {k: _with_defaults(str(v)) for k, v in compose["x-worker"]["environment"].items()}
    setting_names = {name.upper() for name in Settings.model_fields}
    assert set(env) - AWS_VARIABLES <= setting_names, set(env) - AWS_VARIABLES - setting_names
    settings = Settings(**{k.lower(): v for k, v in env.items() if k.upper() in setting_names})
    services = compose["services"]
    database = make_url(settings.database_url)
    assert database.host == "postgres"
    assert f"{database.port}:{database.port}" in services["postgres"]["ports"]
    assert database.password == _with_defaults(
        services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    )
    assert database.database == services["postgres"]["environment"]["POSTGRES_DB"]
    assert settings.redis_url.startswith("redis://redis:6379/")
    assert "6379:6379" in services["redis"]["ports"]
    assert settings.storage_backend == "s3" and settings.s3_endpoint_url == "http://s3:9000"
    assert settings.s3_bucket == _with_defaults(services["s3-bucket"]["environment"]["S3_BUCKET"])
    assert env["AWS_ACCESS_KEY_ID"] == _with_defaults(
        services["s3"]["environment"]["MINIO_ROOT_USER"]
    )


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="Debian's docker-compose not installed"
)
def test_docker_compose_validates_the_file_offline() -> None:
    done = subprocess.run(
        ["docker-compose", "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COMPOSE_PROJECT_NAME": "c360test"},
    )
    assert done.returncode == 0, done.stderr
