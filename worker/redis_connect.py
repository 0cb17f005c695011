"""Every Redis connection of the app, from settings: straight to REDIS_URL or through Sentinel.

    pool = await arq_pool(settings)        # arq's ArqRedis: workers, JobsClient, the console
    pool = sentinel_arq_pool(settings)     # the same, unconnected: arq's CLI (worker/main.py)
    client = redis_client(settings)        # plain redis.asyncio: the CLI's status and health

With `REDIS_SENTINELS` set, both ask the Sentinels for the master of `REDIS_SENTINEL_MASTER`
(redis-py's `SentinelConnectionPool`) each time they open a connection; `REDIS_URL` gives the
database number, the password and TLS (`rediss://`). After a failover:

- a connection to the dead master fails (`ConnectionError`), and the next one is opened to the
  master the Sentinels name then; a connection to a master demoted to replica answers writes with
  READONLY, which redis-py turns into a `ConnectionError` and a reconnect (asyncio/sentinel.py);
- arq's poll loop does not survive a failed command, so a worker exits and its supervisor
  (`python -m worker run`, or compose's restart policy) starts a fresh one, whose `arq_pool`
  waits for the new master (worker/cli/run.py);
- what the old master had not replicated comes back from PostgreSQL (worker/reconcile.py).

arq's own Sentinel branch (`create_pool` with `RedisSettings(sentinel=True)`) sets no timeouts,
so a master that vanished from the network (rather than refusing connections) would hold every
connect for the kernel's ~2 minutes, and it sends no password to the Sentinels; ours bound each
connect and each Sentinel query, and authenticate with REDIS_SENTINEL_PASSWORD. A planned
failover (`SENTINEL FAILOVER`) drops the old master's clients; an idle pooled connection found
closed is replaced at checkout, so workers move over without exiting.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import default_queue_name as arq_default_queue_name
from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import RedisError

from worker.serialization import deserialize, serialize
from worker.settings import Settings

log = logging.getLogger(__name__)

# As arq's RedisSettings defaults (conn_timeout, conn_retries, conn_retry_delay), so both
# modes wait the same for a Redis that is starting, or for the master a failover elects.
CONNECT_TIMEOUT_S = 1.0
CONNECT_RETRIES = 5
CONNECT_RETRY_DELAY_S = 1.0
# One Sentinel that does not answer in time is skipped for the next one in the list.
SENTINEL_TIMEOUT_S = 1.0


def describe(settings: Settings) -> str:
    """Where Redis is, for messages: `host:port`, or the master's name and its Sentinels."""
    if settings.redis_sentinels:
        return f"master {settings.redis_sentinel_master!r} via Sentinels {settings.redis_sentinels}"
    parsed = RedisSettings.from_dsn(settings.redis_url)
    return parsed.unix_socket_path or f"{parsed.host}:{parsed.port}"


class _SentinelPool(SentinelConnectionPool):
    """redis-py's pool of master connections, which also closes its Sentinel clients.

    Closing a client made by `Sentinel.master_for` disconnects only the master connections;
    the Sentinel clients' connections stay open (and warn when collected). A full disconnect
    (`inuse_connections=True`: the client's `aclose`) closes them too. The pool calls
    `disconnect(inuse_connections=False)` itself when the master moves: that one keeps them.
    """

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.aclose()


def _sentinel(settings: Settings, **connection: Any) -> Sentinel:
    """A Sentinel client; `connection` are keyword arguments for connections to the master."""
    url = RedisSettings.from_dsn(settings.redis_url)
    password = settings.redis_sentinel_password
    to_sentinels: dict[str, Any] = {
        "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        "socket_timeout": SENTINEL_TIMEOUT_S,
        # TLS to the master means TLS to the Sentinels too (their `tls-port`).
        "ssl": url.ssl,
        "password": password.get_secret_value() if password is not None else None,
    }
    # redis-py's Sentinel is not annotated.
    return Sentinel(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_addresses,
        sentinel_kwargs=to_sentinels,
        db=url.database,
        username=url.username or None,
        password=url.password,
        ssl=url.ssl,
        **{"socket_connect_timeout": CONNECT_TIMEOUT_S, **connection},
    )


def redis_client(settings: Settings, *, timeout_s: float | None = None) -> Redis:
    """A plain client of the master (bytes replies); `timeout_s` bounds every command too.

    Opens nothing until its first command; close it with `await client.aclose()`.
    """
    if not settings.redis_sentinels:
        direct: Redis = Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=timeout_s or CONNECT_TIMEOUT_S,
            socket_timeout=timeout_s,
        )
        return direct
    sentinel = _sentinel(settings, socket_timeout=timeout_s)
    return cast(
        Redis,
        sentinel.master_for(
            settings.redis_sentinel_master, redis_class=Redis, connection_pool_class=_SentinelPool
        ),
    )


def sentinel_arq_pool(settings: Settings, *, queue: str = arq_default_queue_name) -> ArqRedis:
    """An arq pool of the master the Sentinels name, not connected yet (nothing is opened).

    For arq's own CLI too (worker/main.py), whose Sentinel branch has no timeouts and cannot
    authenticate to the Sentinels.
    """
    pool = cast(
        ArqRedis,
        _sentinel(settings).master_for(
            settings.redis_sentinel_master,
            redis_class=ArqRedis,
            connection_pool_class=_SentinelPool,
        ),
    )
    # What arq's create_pool sets on the pools it makes.
    pool.job_serializer, pool.job_deserializer = serialize, deserialize
    pool.default_queue_name = queue
    return pool


async def arq_pool(settings: Settings, *, queue: str = arq_default_queue_name) -> ArqRedis:
    """An arq pool with our JSON serializer, once the master answers a PING.

    `queue`: where `enqueue_job` puts a job that names none (arq's `default_queue_name`).

    Retries `CONNECT_RETRIES` times, `CONNECT_RETRY_DELAY_S` apart (a failover in progress
    has no master to name for a few seconds), then raises the last `RedisError`/`OSError`.
    """
    if not settings.redis_sentinels:
        direct = await create_pool(
            settings.redis_settings(), job_serializer=serialize, job_deserializer=deserialize
        )
        direct.default_queue_name = queue
        return direct
    for attempt in range(CONNECT_RETRIES + 1):
        pool = sentinel_arq_pool(settings, queue=queue)
        try:
            await pool.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            await pool.aclose()
            if attempt == CONNECT_RETRIES:
                raise
            log.warning(
                "no Redis master yet (%s: %s): %s; %d retries left",
                describe(settings),
                type(exc).__name__,
                exc,
                CONNECT_RETRIES - attempt,
            )
            await asyncio.sleep(CONNECT_RETRY_DELAY_S)
        else:
            return pool
    raise AssertionError("unreachable: the last attempt returns or raises")
