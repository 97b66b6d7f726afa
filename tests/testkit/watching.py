"""Watch mode over any topology, built the production way (``wiring.connect``), for topology tests."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import asyncpg
import redis.asyncio as aioredis

from modcache import engine, keys, modules, pgsource, rediscache, settings, watcher, wiring
from testkit.observers import Recorder, running
from testkit.polling import eventually

UPSERT = (
    "INSERT INTO workspace_files (path, content, content_hash, entity_type, is_deleted) "
    "VALUES ($1, $2, $3, 'module', false) ON CONFLICT (path) DO UPDATE SET content = EXCLUDED.content, "
    "content_hash = EXCLUDED.content_hash, entity_type = 'module', is_deleted = false"
)


def watch_settings(**fields: object) -> settings.Settings:
    """Settings for a watcher that reconnects quickly (tests), plus ``fields``."""
    defaults: dict[str, object] = {
        "resync_interval_s": 3600,
        "listener_backoff_max_s": 0.5,
        "listener_keepalive_s": 1.0,
        "probe_interval_s": 0.1,
    }
    return settings.Settings(**(defaults | fields))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def watching(
    config: settings.Settings, recorder: Recorder
) -> AsyncIterator[tuple[wiring.Wired, watcher.Watcher]]:
    """A watcher over ``config`` running in the background, after its first full resync with key events on."""
    async with wiring.connect(config, application_name="modcache-test") as wired:
        w = wired.watcher(observer=recorder, rng=random.Random(11))
        async with running(w):
            await recorder.wait_for(lambda: recorder.full_syncs() and w.state.keyspace_active, timeout_s=30)
            yield wired, w


@contextlib.asynccontextmanager
async def watching_source(
    source: pgsource.PgSource,
    redis_url: str,
    keyspace: keys.KeySpace,
    database_url: str,
    config: settings.Settings,
    *,
    ttl_s: int | None = None,
) -> AsyncIterator[tuple[watcher.Watcher, asyncio.Task[None], Recorder]]:
    """A watcher over a test's own source and one Redis URL, run as a task the test can check is still alive
    (an attack must not make it exit), after its first full resync with key events on."""
    cache = rediscache.RedisCache.from_url(redis_url, keyspace=keyspace, ttl_s=ttl_s)
    recorder = Recorder()
    w = watcher.Watcher(
        engine=engine.Engine(source=source, cache=cache), settings=config, listen_dsn=database_url, observer=recorder
    )
    task = asyncio.create_task(w.run())
    try:
        await recorder.wait_for(lambda: recorder.full_syncs() and w.state.keyspace_active)
        yield w, task, recorder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await cache.close()


@contextlib.asynccontextmanager
async def watching_quick(
    source: pgsource.PgSource, redis_url: str, keyspace: keys.KeySpace, database_url: str
) -> AsyncIterator[tuple[watcher.Watcher, asyncio.Task[None], Recorder]]:
    """``watching_source`` with a probe every 50 ms and no periodic resync, after its first deep resync: what an
    attack on a running watcher starts from."""
    config = watch_settings(listener_backoff_max_s=0.2, probe_interval_s=0.05)
    async with watching_source(source, redis_url, keyspace, database_url, config) as (w, task, recorder):
        await recorder.wait_for(lambda: any(r.deep for r, _ in recorder.syncs))
        yield w, task, recorder


async def put_modules(source: pgsource.PgSource, n: int) -> list[str]:
    """``pkg/m{i}.py`` for i < n, each ``N = i``, through the source."""
    paths = [f"pkg/m{i}.py" for i in range(n)]
    for i, path in enumerate(paths):
        await source.put_module(path, f"N = {i}\n".encode())
    return paths


async def upsert(dsn: str, rows: dict[str, str]) -> None:
    """Commit ``rows`` (path -> content) in one transaction through asyncpg (a multi-host DSN works)."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            for path, text in rows.items():
                await conn.execute(UPSERT, path, text, modules.content_hash(text.encode()))
    finally:
        await conn.close()


async def forged_put_back(w: watcher.Watcher, client: aioredis.Redis, channel: str) -> None:
    """One forged ``hset`` notification of the manifest (plain PUBLISH on its keyspace ``channel``), until the watcher
    has put its copy back."""
    before = w.state.manifest_put_back
    await client.publish(channel, "hset")
    await eventually(lambda: w.state.manifest_put_back > before, 2.0)


async def redis_cpu_s(client: aioredis.Redis) -> float:
    """Redis's own CPU time so far (user + system, from ``INFO cpu``)."""
    cpu = await client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
