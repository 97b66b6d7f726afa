"""One function from ``Settings`` to the adapters, the engine and what the watcher needs: used by the CLI, the
benchmarks, the operator and the consumer, so a connection option (issue 11: Sentinel, Cluster, TLS, PostgreSQL
multi-host) is added in exactly one place.

    async with wiring.connect(settings, application_name="modcache-operator", prune=spec.prune) as wired:
        await wired.engine.full_resync()
        await wired.watcher(observer=...).run()
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.asyncio.sentinel as aiosentinel
from sqlalchemy.ext.asyncio import AsyncEngine

from modcache import db, endpoints, engine, errors, lineage, pgsource, rediscache, sentinels, settings, watcher

log = logging.getLogger(__name__)

Closer = Callable[[], Awaitable[None]]
Switches = Callable[[], AsyncIterator[str]]


@dataclasses.dataclass(frozen=True)
class Wired:
    """The adapters and the engine built from one Settings, closed together."""

    settings: settings.Settings
    source: pgsource.PgSource
    cache: rediscache.RedisCache
    engine: engine.Engine

    def watcher(self, *, observer: watcher.Observer | None = None, rng: random.Random | None = None) -> watcher.Watcher:
        """A watcher over this wiring (LISTEN on ``listen_database_url`` or else ``database_url``)."""
        listen = self.settings.listen_url()
        if listen is None:
            raise errors.ConfigError("MODCACHE_DATABASE_URL", "not set (set it or pass --database-url)")
        return watcher.Watcher(
            engine=self.engine,
            settings=self.settings,
            listen_dsn=database_dsn(self.settings, listen),
            observer=observer,
            rng=rng,
        )


def make_cache(config: settings.Settings) -> rediscache.RedisCache:
    client, closer, switches = _redis(config)
    return rediscache.RedisCache(
        client=client,
        master_switches=switches,
        keyspace=config.keyspace(),
        ttl_s=config.ttl_s,
        ttl_jitter_ratio=config.ttl_jitter_ratio,
        check_batch_size=config.check_batch_size,
        close=closer,
    )


def make_source(config: settings.Settings, *, application_name: str = "modcache") -> pgsource.PgSource:
    """The source, whose connections (and the watcher's listener) refuse a server of another cluster or on an
    older timeline than the cache was filled from (``lineage``)."""
    checked = lineage.Lineage()
    return pgsource.PgSource(
        engine=make_pg_engine(config, application_name=application_name, lineage=checked),
        max_module_bytes=config.max_module_bytes,
        lineage=checked,
    )


# -- Redis -------------------------------------------------------------------------------------------------------


def make_redis(config: settings.Settings) -> tuple[rediscache.Client, Closer]:
    """The Redis client ``redis_url`` names (one node, the master a Sentinel names, or a Cluster) and what closes
    it. A Sentinel client finds the master again on every new connection, a Cluster client follows ``MOVED``:
    after a failover, commands fail until the topology settles, then reach the new master by themselves."""
    client, closer, _ = _redis(config)
    return client, closer


def _redis(config: settings.Settings) -> tuple[rediscache.Client, Closer, Switches | None]:
    """``make_redis``, and for a Sentinel what announces each new master (``sentinels.Quorum.switches``)."""
    _warn_relaxed_tls(config)
    endpoint = config.redis_endpoint()
    if endpoint is None:
        _required(None, "redis_url")
        raise AssertionError("unreachable")
    options = _redis_options(config, endpoint)
    if endpoint.topology is endpoints.Topology.SENTINEL:
        return _sentinel_client(config, endpoint, options)
    if endpoint.topology is endpoints.Topology.CLUSTER:
        cluster = aiocluster.RedisCluster(
            startup_nodes=[aiocluster.ClusterNode(host, port) for host, port in endpoint.hosts],
            username=endpoint.username,
            password=endpoint.password,
            **options,
        )
        return cluster, cluster.aclose, None
    try:
        client = aioredis.Redis.from_url(endpoint.url, **options)
    except ValueError as e:
        raise errors.ConfigError("MODCACHE_REDIS_URL", "not a valid Redis URL") from e
    return client, client.aclose, None


def _sentinel_client(
    config: settings.Settings, endpoint: endpoints.RedisEndpoint, options: dict[str, Any]
) -> tuple[aioredis.Redis, Closer, Switches]:
    """The master a majority of the sentinels name (``sentinels.Quorum``, not redis-py's first answer)."""
    sentinel_options = {k: v for k, v in options.items() if k.startswith(("ssl", "socket_"))}
    if config.redis_sentinel_password is not None:
        sentinel_options["password"] = config.redis_sentinel_password.get_secret_value()
    sentinel = aiosentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(endpoint.hosts), min_other_sentinels=len(endpoint.hosts) // 2, sentinel_kwargs=sentinel_options
    )
    node = {"username": endpoint.username, "password": endpoint.password, **options}
    quorum = sentinels.Quorum(sentinel, node_options={k: v for k, v in node.items() if k != "health_check_interval"})
    pool = aiosentinel.SentinelConnectionPool(  # type: ignore[no-untyped-call]
        str(endpoint.service),
        quorum,
        is_master=True,
        db=endpoint.db,
        check_connection=True,  # PING each new connection: one to a node that is going away fails at once
        **node,
    )
    master = aioredis.Redis.from_pool(pool)

    async def close() -> None:
        await master.aclose()
        await sentinel.aclose()

    switches = functools.partial(quorum.switches, pool, backoff_max_s=config.listener_backoff_max_s)
    return master, close, switches


def _redis_options(config: settings.Settings, endpoint: endpoints.RedisEndpoint) -> dict[str, Any]:
    """Options every Redis client gets. Replies are decoded with ``surrogateescape`` (see
    ``rediscache.client_from_url``)."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "encoding_errors": "surrogateescape",
        "health_check_interval": 30,
        "socket_connect_timeout": config.redis_connect_timeout_s,
    }
    if endpoint.tls:
        options |= redis_tls_options(config)
        if endpoint.topology is not endpoints.Topology.SINGLE:
            options["ssl"] = True  # rediss:// says so itself
    return options


def redis_tls_options(config: settings.Settings) -> dict[str, Any]:
    """redis-py's TLS options from the settings (files by path)."""
    files = {
        "ssl_ca_certs": config.redis_ssl_ca_file,
        "ssl_certfile": config.redis_ssl_cert_file,
        "ssl_keyfile": config.redis_ssl_key_file,
    }
    options: dict[str, Any] = {k: str(v) for k, v in files.items() if v is not None}
    options["ssl_cert_reqs"] = config.redis_ssl_cert_reqs
    options["ssl_check_hostname"] = config.redis_ssl_check_hostname and config.redis_ssl_cert_reqs != "none"
    return options


# -- PostgreSQL --------------------------------------------------------------------------------------------------


def database_dsn(config: settings.Settings, url: str | None = None) -> str:
    """``url`` (default: ``database_url``) as a libpq/asyncpg DSN with the ``database_ssl_*`` settings added (the
    URL's own parameters win). Multi-host URLs pass unchanged: asyncpg tries the hosts in turn."""
    chosen = url if url is not None else _required(config.database_url, "database_url")
    _warn_relaxed_tls(config)
    return endpoints.with_query(settings.asyncpg_dsn(chosen), config.database_ssl_params())


def make_pg_engine(
    config: settings.Settings,
    *,
    url: str | None = None,
    application_name: str = "modcache",
    pool_size: int = 5,
    lineage: lineage.Lineage | None = None,
    **pool_options: Any,
) -> AsyncEngine:
    """The SQLAlchemy engine for ``url`` (default ``database_url``), TLS settings included."""
    return db.make_engine(
        database_dsn(config, url),
        pool_size=pool_size,
        application_name=application_name,
        lineage=lineage,
        **pool_options,
    )


@contextlib.asynccontextmanager
async def connect(
    config: settings.Settings, *, application_name: str = "modcache", prune: bool = True
) -> AsyncIterator[Wired]:
    """Source, cache and engine for ``config`` (both URLs required), closed when the block ends."""
    cache = make_cache(config)
    try:
        source = make_source(config, application_name=application_name)
        try:
            the_engine = engine.Engine(
                source=source, cache=cache, fetch_batch_size=config.fetch_batch_size, prune=prune
            )
            yield Wired(settings=config, source=source, cache=cache, engine=the_engine)
        finally:
            await source.close()
    finally:
        await cache.close()


def _required(value: object, field: str) -> str:
    secret = getattr(value, "get_secret_value", None)
    if secret is None:
        variable = f"{settings.ENV_PREFIX}{field.upper()}"
        flag = "--" + field.replace("_", "-")
        raise errors.ConfigError(variable, f"not set (set it or pass {flag})")
    return str(secret())


def _warn_relaxed_tls(config: settings.Settings) -> None:
    """A URL that weakens TLS with no TLS setting to contradict is allowed (a test, a trusted network), and said."""
    for message in config.tls_relaxed_by_url():
        _warn_once(message)


@functools.cache
def _warn_once(message: str) -> None:  # once per process: clients are built again on every watcher restart
    log.warning("TLS is weakened by a URL parameter: %s", message)
