"""docker-compose.yml is safe by default (C1), runnable, and consistent with the settings.

No engine runs here: the file is read as YAML with the operator's variables substituted the way
compose does, and Debian's `docker-compose config` validates it offline where installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from worker.main import QUEUE_CONFIGS
from worker.recycle import job_limit
from worker.routes import QUEUES
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
AWS_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
# What an operator writes to .env (see .env.example): the variables compose must require.
REQUIRED = {
    "POSTGRES_PASSWORD": "pg-Xq81vT",
    "REDIS_PASSWORD": "redis-Lm27pZ",
    "S3_ACCESS_KEY": "minio-root-Hk4",
    "S3_SECRET_KEY": "minio-secret-Wd93",
    "EMAIL_PROVIDER": "resend",
    "CONSOLE_PASSWORD": "console-Pw73",
}
SECRETS = {
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "S3_ACCESS_KEY",
    "S3_SECRET_KEY",
    "EMAIL_API_KEY",
    "MARKETING_API_KEY",
    "CONSOLE_PASSWORD",
    "METRICS_TOKEN",
}
# Values that were once defaults in this file and must never come back.
OLD_DEFAULTS = ("contact360-secret", "POSTGRES_PASSWORD:-", "S3_ACCESS_KEY:-", "S3_SECRET_KEY:-")
REFERENCE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def substitute(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation: `${V}`, `${V:-default}`, `${V:?error}`, and `$$` for `$`."""

    def one(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        if env.get(name):
            return env[name]
        if operator and operator.endswith("?"):
            raise LookupError(f"{name}: {argument}")
        return argument if operator else ""

    return REFERENCE.sub(one, value.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def text() -> str:
    return (ROOT / "docker-compose.yml").read_text()


@pytest.fixture(scope="module")
def compose(text: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


def default_services(compose: dict[str, Any]) -> dict[str, Any]:
    """The services `docker compose up` starts: those in no profile."""
    return {name: s for name, s in compose["services"].items() if not s.get("profiles")}


def test_the_expected_services_exist(compose: dict[str, Any]) -> None:
    services = default_services(compose)
    workers = {f"worker-{queue}" for queue in QUEUES}
    assert {"postgres", "redis", "s3", "s3-bucket", "migrate", "console"} | workers == set(services)
    services = compose["services"]
    assert "--appendonly yes" in " ".join(services["redis"]["command"])
    for name in ("postgres", "redis", "s3"):
        assert services[name]["healthcheck"]["test"], name
    assert services["migrate"]["command"] == ["python", "-m", "worker", "migrate"]
    assert services["migrate"]["restart"] == "no"


def test_each_queue_has_a_restarting_healthchecked_worker(compose: dict[str, Any]) -> None:
    for queue in QUEUES:
        service = compose["services"][f"worker-{queue}"]
        # The supervisor, not a bare worker: a recycling worker's replacement starts as its
        # drain begins (worker/cli/run.py), so the queue is served while its long jobs finish.
        assert service["command"] == ["python", "-m", "worker", "run", "--queue", queue]
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


def test_no_port_is_published_beyond_loopback(compose: dict[str, Any]) -> None:
    published = {}
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):  # the long syntax
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                assert str(port).startswith("127.0.0.1:"), (name, port)
            published[name] = port
    # Only what make run and local tools use; MinIO (every tenant's exports) publishes nothing.
    assert set(published) <= {"postgres", "redis", "console"}, published


def test_every_secret_is_required_and_none_has_a_default(
    text: str, compose: dict[str, Any]
) -> None:
    for old in OLD_DEFAULTS:
        assert old not in text
    references = [m.groups() for m in REFERENCE.finditer(text)]
    for name, operator, argument in references:
        if name in SECRETS:
            # Required, with a message saying what to do.
            assert operator == ":?", (name, operator, argument)
            assert ".env" in argument, (name, argument)
    for name in REQUIRED:
        assert any(ref[0] == name and ref[1] == ":?" for ref in references), name
    # Optional keys are passed through from the environment only when set: no value here.
    env = compose["x-worker"]["environment"]
    assert env["EMAIL_API_KEY"] is None and env["MARKETING_API_KEY"] is None


def test_the_console_requires_its_password_and_is_valid_settings(
    compose: dict[str, Any],
) -> None:
    service = compose["services"]["console"]
    assert service["command"][:4] == ["python", "-m", "worker", "console"]
    assert service["ports"] == ["127.0.0.1:8000:8000"]
    raw = service["environment"]
    assert raw["CONSOLE_PASSWORD"].startswith("${CONSOLE_PASSWORD:?")
    assert raw["METRICS_TOKEN"] is None  # optional: passed through only when set
    env = {k: substitute(str(v), REQUIRED) for k, v in raw.items() if v is not None}
    setting_names = {name.upper() for name in Settings.model_fields}
    # Strings, as the environment holds them: Settings parses each into its field's type.
    values: dict[str, Any] = {k.lower(): v for k, v in env.items() if k in setting_names}
    settings = Settings(**values, email_api_key="re_from_the_environment")
    assert settings.console_password is not None
    assert settings.console_password.get_secret_value() == REQUIRED["CONSOLE_PASSWORD"]
    assert settings.console_user == "admin"


def test_redis_requires_the_password_and_its_healthcheck_authenticates(
    compose: dict[str, Any],
) -> None:
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert '--requirepass "$$REDIS_PASSWORD"' in command
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    # redis-cli reads REDISCLI_AUTH; its exit code is 0 even for a NOAUTH reply.
    assert redis["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    assert redis["healthcheck"]["test"] == ["CMD-SHELL", "redis-cli ping | grep -q PONG"]


def test_worker_environment_is_valid_settings_carrying_the_operators_secrets(
    compose: dict[str, Any],
) -> None:
    raw = compose["x-worker"]["environment"]
    env = {k: substitute(str(v), REQUIRED) for k, v in raw.items() if v is not None}
    setting_names = {name.upper() for name in Settings.model_fields}
    assert set(env) - AWS_VARIABLES <= setting_names, set(env) - AWS_VARIABLES - setting_names
    # Strings, as the environment holds them: Settings parses each into its field's type.
    values: dict[str, Any] = {k.lower(): v for k, v in env.items() if k in setting_names}
    settings = Settings(**values, email_api_key="re_from_the_environment")
    services = compose["services"]
    database = make_url(settings.database_url)
    assert (database.host, database.port) == ("postgres", 5432)
    assert database.password == REQUIRED["POSTGRES_PASSWORD"]
    postgres_env = services["postgres"]["environment"]
    assert substitute(postgres_env["POSTGRES_PASSWORD"], REQUIRED) == database.password
    assert database.database == postgres_env["POSTGRES_DB"]
    assert settings.redis_url == f"redis://:{REQUIRED['REDIS_PASSWORD']}@redis:6379/0"
    assert settings.redis_settings().password == REQUIRED["REDIS_PASSWORD"]
    assert settings.email_provider == "resend"
    assert settings.storage_backend == "s3" and settings.s3_endpoint_url == "http://s3:9000"
    bucket_env = services["s3-bucket"]["environment"]
    assert settings.s3_bucket == substitute(bucket_env["S3_BUCKET"], REQUIRED)
    for service in ("s3", "s3-bucket"):
        minio = services[service]["environment"]
        assert substitute(minio["MINIO_ROOT_USER"], REQUIRED) == env["AWS_ACCESS_KEY_ID"]
        assert substitute(minio["MINIO_ROOT_PASSWORD"], REQUIRED) == env["AWS_SECRET_ACCESS_KEY"]
    migrate_env = services["migrate"]["environment"]
    assert substitute(migrate_env["DATABASE_URL"], REQUIRED) == env["DATABASE_URL"]
    # Left unset in .env, the recycling count is the per-slot default, not a per-process 1000.
    assert "worker_max_jobs_per_process" not in settings.model_fields_set
    assert job_limit(settings, QUEUE_CONFIGS["default"].max_jobs) == 200_000


HA_SERVICES = {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
HA_SENTINELS = "sentinel-1:26379,sentinel-2:26379,sentinel-3:26379"


def test_profile_ha_is_a_replica_and_three_password_protected_sentinels(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    in_ha = {name for name, s in services.items() if "ha" in s.get("profiles", [])}
    assert in_ha == HA_SERVICES
    primary = " ".join(services["redis"]["command"])
    replica = " ".join(services["redis-replica"]["command"])
    for command in (primary, replica):  # either may be the master after a failover
        assert '--requirepass "$$REDIS_PASSWORD"' in command
        assert '--masterauth "$$REDIS_PASSWORD"' in command
    assert "--replicaof redis 6379" in replica
    for name in sorted(HA_SERVICES):
        service = services[name]
        assert "ports" not in service, name  # reached inside compose's network only
        assert service["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?"), name
        assert service["healthcheck"]["test"][0] == "CMD-SHELL", name
    monitors = set()
    for index in (1, 2, 3):
        sentinel = services[f"sentinel-{index}"]
        config = " ".join(sentinel["command"])
        assert sentinel["environment"]["SENTINEL_NAME"] == f"sentinel-{index}"
        assert sentinel["volumes"] == [f"sentinel-{index}:/data"]  # its learned state
        for line in ("requirepass $$REDIS_PASSWORD", "sentinel auth-pass mymaster $$REDIS_PASSWORD",
                     "sentinel sentinel-pass $$REDIS_PASSWORD", "port 26379"):  # fmt: skip
            assert f'"{line}"' in config, (index, line)
        monitor = re.search(r'"sentinel monitor (\S+) (\S+) (\d+) (\d+)"', config)
        assert monitor is not None, index
        monitors.add(monitor.groups())
    # One master name, the settings' default; a quorum that two of the three Sentinels make.
    assert monitors == {(Settings().redis_sentinel_master, "redis", "6379", "2")}


def test_worker_environment_with_sentinels_set_is_valid_sentinel_settings(
    compose: dict[str, Any],
) -> None:
    raw = compose["x-worker"]["environment"]
    operator = {**REQUIRED, "REDIS_SENTINELS": HA_SENTINELS}
    values: dict[str, Any] = {
        k.lower(): substitute(str(v), operator)
        for k, v in raw.items()
        if v is not None and k not in AWS_VARIABLES
    }
    settings = Settings(**values, email_api_key="re_from_the_environment")
    assert settings.redis_sentinel_addresses == [(f"sentinel-{n}", 26379) for n in (1, 2, 3)]
    assert settings.redis_sentinel_password is not None
    assert settings.redis_sentinel_password.get_secret_value() == REQUIRED["REDIS_PASSWORD"]
    assert settings.redis_settings().password == REQUIRED["REDIS_PASSWORD"]
    # Without REDIS_SENTINELS in .env the same file reaches `redis` directly.
    direct: dict[str, Any] = {
        k.lower(): substitute(str(v), REQUIRED)
        for k, v in raw.items()
        if v is not None and k not in AWS_VARIABLES
    }
    assert Settings(**direct, email_api_key="re_x").redis_sentinel_addresses == []


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_a_missing_secret_stops_substitution_with_its_name(
    compose: dict[str, Any], text: str, missing: str
) -> None:
    env = {k: v for k, v in REQUIRED.items() if k != missing}
    with pytest.raises(LookupError, match=rf"^{missing}: set .*\.env"):
        substitute(text, env)


def test_env_example_names_every_required_variable_and_holds_no_secret() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    values = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert set(REQUIRED) | {"EMAIL_API_KEY", "METRICS_TOKEN"} <= set(values)
    for name in SECRETS & set(values):
        assert values[name] == "", name  # the operator fills them in
    assert values["EMAIL_PROVIDER"] == ""


docker_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="Debian's docker-compose not installed"
)


def docker_compose_config(
    env: dict[str, str], tmp_path: Path, *profiles: str, quiet: bool = True
) -> subprocess.CompletedProcess[str]:
    empty_env_file = tmp_path / "empty.env"  # never read a developer's own .env
    empty_env_file.write_text("")
    chosen = [arg for profile in profiles for arg in ("--profile", profile)]
    return subprocess.run(
        ["docker-compose", "--env-file", str(empty_env_file), *chosen, "config"]
        + (["-q"] if quiet else []),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "COMPOSE_PROJECT_NAME": "c360test", **env},
    )


@docker_compose
@pytest.mark.parametrize("profiles", [(), ("ha",)])
def test_docker_compose_validates_the_file_offline(tmp_path: Path, profiles: tuple[str]) -> None:
    done = docker_compose_config(REQUIRED, tmp_path, *profiles)
    assert done.returncode == 0, done.stderr


@docker_compose
@pytest.mark.parametrize("operator_count", [None, "1000"])
def test_docker_compose_worker_environment_recycles_per_slot_unless_the_operator_sets_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operator_count: str | None
) -> None:
    operator = REQUIRED | (
        {"WORKER_MAX_JOBS_PER_PROCESS": operator_count} if operator_count else {}
    )
    done = docker_compose_config(operator, tmp_path, quiet=False)
    assert done.returncode == 0, done.stderr
    rendered = yaml.safe_load(done.stdout)["services"]
    for queue in QUEUES:
        service = rendered[f"worker-{queue}"]
        assert service["command"] == ["python", "-m", "worker", "run", "--queue", queue]
        # The worker's environment exactly as compose hands it over: None is not passed at all.
        for name in Settings.model_fields:
            monkeypatch.delenv(name.upper(), raising=False)
        for name, value in service["environment"].items():
            if value is not None:
                monkeypatch.setenv(name, str(value))
        monkeypatch.setenv("EMAIL_API_KEY", "re_from_the_environment")
        concurrency = QUEUE_CONFIGS[queue].max_jobs
        expected = 1000 if operator_count else 1000 * concurrency
        assert job_limit(Settings(), concurrency) == expected, queue


@docker_compose
@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_docker_compose_refuses_a_missing_secret_naming_it(tmp_path: Path, missing: str) -> None:
    done = docker_compose_config({k: v for k, v in REQUIRED.items() if k != missing}, tmp_path)
    assert done.returncode != 0
    assert missing in done.stderr and ".env" in done.stderr, done.stderr


def test_the_pooler_profile_puts_pgbouncer_in_transaction_mode_in_front_of_postgres(
    compose: dict[str, Any],
) -> None:
    bouncer = compose["services"]["pgbouncer"]
    assert bouncer["profiles"] == ["pooler"] and "ports" not in bouncer
    env = {k: substitute(str(v), REQUIRED) for k, v in bouncer["environment"].items()}
    assert (env["POOL_MODE"], env["DB_HOST"], env["DB_PORT"]) == ("transaction", "postgres", "5432")
    assert env["DB_PASSWORD"] == REQUIRED["POSTGRES_PASSWORD"]
    # The workers' settings with the variables README "PgBouncer" names.
    raw = compose["x-worker"]["environment"]
    pooled = {**REQUIRED, "DATABASE_HOST": "pgbouncer", "DATABASE_PORT": env["LISTEN_PORT"]}
    pooled["DATABASE_POOLER"] = "pgbouncer"
    settings = Settings(
        database_url=substitute(raw["DATABASE_URL"], pooled),
        database_pooler=substitute(raw["DATABASE_POOLER"], pooled),
    )
    database = make_url(settings.database_url)
    assert (database.host, database.port, settings.database_pooler) == (
        "pgbouncer",
        6432,
        "pgbouncer",
    )
    # Migrations go straight to PostgreSQL whatever the workers use.
    migrate = make_url(
        substitute(compose["services"]["migrate"]["environment"]["DATABASE_URL"], pooled)
    )
    assert (migrate.host, migrate.port) == ("postgres", 5432)
