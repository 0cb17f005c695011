"""REDIS_SENTINELS, REDIS_SENTINEL_MASTER, REDIS_SENTINEL_PASSWORD: parsed, or refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from worker.cli import UserError, load_settings
from worker.main import worker_settings
from worker.redis_connect import describe
from worker.settings import Settings

SENTINEL_PASSWORD = "sentinel-secret-Yt3"
REDIS_PASSWORD = "redis-secret-Qp8"


def test_sentinels_are_parsed_in_order_and_shown_normalised() -> None:
    s = Settings(
        redis_url=f"rediss://:{REDIS_PASSWORD}@ignored:6379/4",
        redis_sentinels=" 10.0.0.5:26379 ,sentinel-b.internal:26380,[fd00::7]:26381",
        redis_sentinel_master="orders-redis",
    )
    assert s.redis_sentinel_addresses == [
        ("10.0.0.5", 26379),
        ("sentinel-b.internal", 26380),
        ("fd00::7", 26381),
    ]
    assert s.redis_sentinels == "10.0.0.5:26379,sentinel-b.internal:26380,[fd00::7]:26381"
    arq = s.redis_settings()  # what arq's own CLI connects with
    assert (arq.sentinel, arq.sentinel_master, arq.host) == (
        True,
        "orders-redis",
        s.redis_sentinel_addresses,
    )
    assert (arq.database, arq.password, arq.ssl) == (4, REDIS_PASSWORD, True)
    assert describe(s) == (
        "master 'orders-redis' via Sentinels "
        "10.0.0.5:26379,sentinel-b.internal:26380,[fd00::7]:26381"
    )


def test_empty_means_redis_url_directly() -> None:
    s = Settings(redis_url="redis://cache.internal:6390/2", redis_sentinels="  ")
    assert s.redis_sentinel_addresses == []
    assert s.redis_settings().sentinel is False
    assert describe(s) == "cache.internal:6390"
    assert s.redis_sentinel_master == "mymaster"  # the default: Sentinel's own example name


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("sentinel-a", "entry 1 of 1 is not host:port"),
        ("a:26379,,b:26379", "entry 2 of 3 is not host:port"),
        ("a:26379,", "entry 2 of 2 is not host:port"),
        ("a:0", "entry 1 of 1 is not host:port"),
        ("a:65536", "entry 1 of 1 is not host:port"),
        ("a:port", "entry 1 of 1 is not host:port"),
        ("redis://a:26379", "entry 1 of 1 is not a host name"),
        (f"admin:{SENTINEL_PASSWORD}@a:26379", "entry 1 of 1 is not a host name"),
        ("a b:26379", "entry 1 of 1 is not a host name"),
        ("a:26379;b:26379", "entry 1 of 1 is not a host name"),
        ("[a:b:z]:26379", "entry 1 of 1 is not a host name"),
        ("a:26379,a:26379", "entry 2 of 2 repeats an earlier one"),
    ],
)
def test_bad_sentinel_lists_are_refused_naming_the_entry_not_its_text(
    value: str, expected: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(redis_sentinels=value)
    message = str(raised.value)
    assert f"REDIS_SENTINELS {expected}" in message
    assert SENTINEL_PASSWORD not in message + repr(raised.value.errors())


@pytest.mark.parametrize("name", ["", "my master", "a/b", "x" * 65])
def test_a_bad_master_name_is_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="REDIS_SENTINEL_MASTER must be the name"):
        Settings(redis_sentinels="a:26379", redis_sentinel_master=name)


def test_a_unix_socket_url_cannot_go_through_sentinel() -> None:
    with pytest.raises(ValidationError, match="REDIS_SENTINELS needs a redis:// or rediss://"):
        Settings(redis_url="unix:///run/redis.sock", redis_sentinels="a:26379")


def test_from_the_environment_a_mistake_is_one_line_and_the_password_stays_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_SENTINELS", "a:26379;b:26379")
    with pytest.raises(UserError, match="REDIS_SENTINELS: Value error, REDIS_SENTINELS entry 1"):
        load_settings()
    monkeypatch.setenv("REDIS_SENTINELS", "a:26379,b:26379")
    monkeypatch.setenv("REDIS_SENTINEL_PASSWORD", SENTINEL_PASSWORD)
    monkeypatch.setenv("REDIS_URL", f"redis://:{REDIS_PASSWORD}@x/0")
    s = load_settings()
    assert s.redis_sentinel_password is not None
    assert s.redis_sentinel_password.get_secret_value() == SENTINEL_PASSWORD
    shown = repr(s) + str(s) + repr(s.redis_settings())
    shown += repr(worker_settings("imports", s, jobs=[], crons=[]))
    assert SENTINEL_PASSWORD not in shown and REDIS_PASSWORD not in shown
    monkeypatch.setenv("REDIS_SENTINEL_PASSWORD", " ")
    assert load_settings().redis_sentinel_password is None  # an empty .env line is unset
