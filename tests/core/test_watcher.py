"""Watch mode against real PostgreSQL and Redis: NOTIFY, listener loss, keyspace events, timer-only mode."""

from __future__ import annotations

import json
from collections.abc import Iterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from modcache import engine, keys, modules, pgsource, rediscache, settings, watcher
from modcache.plan import Reason as R
from testkit.observers import Recorder, running
from testkit.servers import private_redis


async def content_of(client: aioredis.Redis, ks: keys.KeySpace, path: str) -> str | None:
    raw = await client.get(ks.content(path))
    return None if raw is None else str(json.loads(raw)["content"])


async def test_committed_change_reaches_the_cache_through_notify(
    live_watcher: watcher.Watcher,
    source: pgsource.PgSource,
    recorder: Recorder,
    redis_client: aioredis.Redis,
    cache: rediscache.RedisCache,
) -> None:
    await source.put_module("shared/tax.py", b"RATE = 1\n")
    await recorder.wait_for(lambda: recorder.synced("shared/tax.py", R.MISSING, watcher.NOTIFY))
    await source.put_module("shared/tax.py", b"RATE = 2\n")
    await recorder.wait_for(lambda: recorder.synced("shared/tax.py", R.STALE, watcher.NOTIFY))
    assert await content_of(redis_client, cache.keyspace, "shared/tax.py") == "RATE = 2\n"
    await source.remove_module("shared/tax.py")
    await recorder.wait_for(lambda: recorder.synced("shared/tax.py", R.ORPHAN, watcher.NOTIFY))
    assert await redis_client.sismember(cache.keyspace.index, "shared/tax.py") == 0


async def test_type_change_and_rename_by_sql_are_followed(
    live_watcher: watcher.Watcher,
    source: pgsource.PgSource,
    database_url: str,
    recorder: Recorder,
    redis_client: aioredis.Redis,
    cache: rediscache.RedisCache,
) -> None:
    await source.put_module("a/old.py", b"A = 1\n")
    await source.put_module("a/flow.py", b"F = 1\n")
    await recorder.wait_for(lambda: recorder.synced("a/flow.py", R.MISSING))
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE workspace_files SET path = 'a/new.py' WHERE path = 'a/old.py'")
        await conn.execute("UPDATE workspace_files SET entity_type = 'workflow' WHERE path = 'a/flow.py'")
    finally:
        await conn.close()
    await recorder.wait_for(lambda: recorder.synced("a/flow.py", R.ORPHAN) and recorder.synced("a/new.py", R.MISSING))
    assert await redis_client.exists(cache.keyspace.content("a/old.py"), cache.keyspace.content("a/flow.py")) == 0
    assert await redis_client.smembers(cache.keyspace.index) == {"a/new.py"}


async def test_expired_content_key_is_restored_from_keyspace_events(
    live_watcher: watcher.Watcher,
    source: pgsource.PgSource,
    recorder: Recorder,
    redis_client: aioredis.Redis,
    cache: rediscache.RedisCache,
) -> None:
    await source.put_module("modules/billing.py", b"X = 1\n")
    await recorder.wait_for(lambda: recorder.synced("modules/billing.py", R.MISSING, watcher.NOTIFY))
    key = cache.keyspace.content("modules/billing.py")
    await redis_client.pexpire(key, 1)  # expires server-side: an "expired" event, index entry kept
    await recorder.wait_for(lambda: recorder.synced("modules/billing.py", R.MISSING, watcher.KEYSPACE))
    assert await content_of(redis_client, cache.keyspace, "modules/billing.py") == "X = 1\n"


async def test_changes_made_while_the_listener_is_down_are_repaired_after_reconnect(
    live_watcher: watcher.Watcher,
    source: pgsource.PgSource,
    database_url: str,
    recorder: Recorder,
    redis_client: aioredis.Redis,
    cache: rediscache.RedisCache,
) -> None:
    dbname = database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(database_url.rsplit("/", 1)[0] + "/postgres")
    writer = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')  # keep the listener out
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND application_name = 'modcache-listener'",
            dbname,
        )
        assert killed == 1
        await recorder.wait_for(lambda: recorder.listener and recorder.listener[-1] is False)
        assert not live_watcher.state.listener_connected
        await writer.execute(
            "INSERT INTO workspace_files (path, content, content_hash, entity_type) VALUES ($1, $2, $3, 'module')",
            "while/down.py",
            "D = 1\n",
            modules.content_hash(b"D = 1\n"),
        )  # its NOTIFY goes nowhere
        await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        await recorder.wait_for(lambda: recorder.synced("while/down.py", R.MISSING, watcher.RECONNECT))
    finally:
        await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        await writer.close()
        await admin.close()
    assert live_watcher.state.listener_connected
    assert await content_of(redis_client, cache.keyspace, "while/down.py") == "D = 1\n"


async def test_bulk_update_in_one_transaction_converges(
    live_watcher: watcher.Watcher,
    database_url: str,
    recorder: Recorder,
    cache: rediscache.RedisCache,
    sync_engine: engine.Engine,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO workspace_files (path, content, content_hash, entity_type) "
            "SELECT 'bulk/m' || g || '.py', 'V = 1', $1, 'module' FROM generate_series(1, 2000) g",
            modules.content_hash(b"V = 1"),
        )
        await recorder.wait_for(lambda: sum(r.applied[R.MISSING] for r, _ in recorder.syncs) >= 2000)
        await conn.execute(
            "UPDATE workspace_files SET content = 'V = 2', content_hash = $1", modules.content_hash(b"V = 2")
        )
        await recorder.wait_for(lambda: sum(r.applied[R.STALE] for r, _ in recorder.syncs) >= 2000)
    finally:
        await conn.close()
    assert not (await sync_engine.full_resync(dry_run=True)).plan


def test_keyspace_flags_are_merged_not_replaced() -> None:
    assert watcher.merged_keyspace_flags("") == "Kg$lshzxet"
    assert watcher.merged_keyspace_flags("El") == "ElKg$shzxet"
    assert watcher.merged_keyspace_flags("AKE") == "AKE"


@pytest.fixture
def locked_redis() -> Iterator[str]:
    """A private redis-server with CONFIG disabled, like a managed Redis that forbids it."""
    with private_redis("--rename-command", "CONFIG", "") as server:
        yield server.url


async def test_without_config_permission_the_watcher_says_so_and_keeps_syncing(
    locked_redis: str,
    source: pgsource.PgSource,
    database_url: str,
    recorder: Recorder,
) -> None:
    await source.put_module("m.py", b"M = 1\n")
    client = aioredis.Redis.from_url(locked_redis, decode_responses=True)
    cache = rediscache.RedisCache(client=client, keyspace=keys.KeySpace())
    w = watcher.Watcher(
        engine=engine.Engine(source=source, cache=cache),
        settings=settings.Settings(resync_interval_s=3600),
        listen_dsn=database_url,
        redis_client=client,
        observer=recorder,
    )
    try:
        async with running(w):
            await recorder.wait_for(lambda: recorder.keyspace and recorder.full_syncs())
        assert recorder.keyspace[-1][0] is False
        assert "timer alone" in recorder.keyspace[-1][1]
        assert await client.exists(keys.KeySpace().content("m.py")) == 1
    finally:
        await client.aclose()
