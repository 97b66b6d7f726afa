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
import random
from collections.abc import AsyncIterator

from modcache import db, engine, errors, pgsource, rediscache, settings, watcher


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
            engine=self.engine, settings=self.settings, listen_dsn=listen, observer=observer, rng=rng
        )


def make_cache(config: settings.Settings) -> rediscache.RedisCache:
    return rediscache.RedisCache.from_url(
        _required(config.redis_url, "redis_url"),
        keyspace=config.keyspace(),
        ttl_s=config.ttl_s,
        ttl_jitter_ratio=config.ttl_jitter_ratio,
        check_batch_size=config.check_batch_size,
    )


def make_source(config: settings.Settings, *, application_name: str = "modcache") -> pgsource.PgSource:
    url = _required(config.database_url, "database_url")
    return pgsource.PgSource(
        engine=db.make_engine(url, application_name=application_name), max_module_bytes=config.max_module_bytes
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
