"""The engine against real PostgreSQL and Redis: the failure modes of bifrost-contract.md and the repairs."""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from modcache import engine, errors, keys, modules, pgsource, rediscache
from modcache.plan import Operation as Op
from modcache.plan import Reason as R
from testkit.servers import private_redis


async def put(source: pgsource.PgSource, path: str, text: str) -> str:
    await source.put_module(path, text.encode())
    return modules.content_hash(text.encode())


async def test_cold_cache_is_filled_in_the_bifrost_layout(
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    cache: rediscache.RedisCache,
) -> None:
    digest = await put(source, "shared/halopsa/__init__.py", "X = 1\n")
    report = await sync_engine.full_resync()
    assert report.applied[R.MISSING] == 1
    ks = cache.keyspace
    assert json.loads(await redis_client.get(ks.content("shared/halopsa/__init__.py"))) == {
        "content": "X = 1\n",
        "path": "shared/halopsa/__init__.py",
        "hash": digest,
    }
    assert await redis_client.smembers(ks.index) == {"shared/halopsa/__init__.py"}
    assert await redis_client.ttl(ks.content("shared/halopsa/__init__.py")) == -1  # no TTL by default


async def test_partial_expiry_is_repaired(
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    cache: rediscache.RedisCache,
) -> None:
    """Failure mode 1: content key gone while the index survives -> the old SCARD check did nothing."""
    await put(source, "modules/billing.py", "RATE = 3\n")
    await put(source, "modules/other.py", "pass\n")
    await sync_engine.full_resync()
    await redis_client.delete(cache.keyspace.content("modules/billing.py"))
    assert await redis_client.scard(cache.keyspace.index) == 2  # what the old check looked at
    report = await sync_engine.full_resync()
    assert [(i.reason, i.path) for i in report.plan.items] == [(R.MISSING, "modules/billing.py")]
    assert json.loads(await redis_client.get(cache.keyspace.content("modules/billing.py")))["content"] == "RATE = 3\n"


async def test_second_sync_plans_and_writes_nothing(
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    cache: rediscache.RedisCache,
) -> None:
    for n in range(20):
        await put(source, f"m/mod{n}.py", f"N = {n}\n")
    await sync_engine.full_resync()
    generation = await cache.generation()
    report = await sync_engine.full_resync(deep=True)
    assert not report.plan
    assert report.repaired == 0
    assert await cache.generation() == generation


async def test_stale_content_is_rewritten(
    source: pgsource.PgSource, sync_engine: engine.Engine, redis_client: aioredis.Redis, cache: rediscache.RedisCache
) -> None:
    """Failure mode 3a: old code left in the cache (hash differs) is replaced, not just missing keys filled."""
    await put(source, "m/tax.py", "RATE = 2\n")
    old = modules.encode_cached("m/tax.py", "RATE = 1\n", modules.content_hash(b"RATE = 1\n"))
    await redis_client.set(cache.keyspace.content("m/tax.py"), old)  # e.g. written by the old system
    await redis_client.sadd(cache.keyspace.index, "m/tax.py")
    report = await sync_engine.full_resync()
    assert [(i.reason, i.path) for i in report.plan.items] == [(R.STALE, "m/tax.py")]
    assert json.loads(await redis_client.get(cache.keyspace.content("m/tax.py")))["content"] == "RATE = 2\n"


async def test_soft_deleted_hard_deleted_and_retyped_modules_leave_the_cache(
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    cache: rediscache.RedisCache,
    database_url: str,
) -> None:
    """Failure mode 3b/3c: deleted modules were never removed; a module that became a workflow stayed importable."""
    for name in ("soft", "hard", "retyped", "kept"):
        await put(source, f"m/{name}.py", f"NAME = {name!r}\n")
    await sync_engine.full_resync()
    await source.remove_module("m/soft.py")
    await source.remove_module("m/hard.py", hard=True)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE workspace_files SET entity_type = 'workflow' WHERE path = 'm/retyped.py'")
    finally:
        await conn.close()
    report = await sync_engine.full_resync()
    assert sorted((i.reason, i.path) for i in report.plan.items) == [
        (R.ORPHAN, "m/hard.py"),
        (R.ORPHAN, "m/retyped.py"),
        (R.ORPHAN, "m/soft.py"),
    ]
    ks = cache.keyspace
    assert await redis_client.smembers(ks.index) == {"m/kept.py"}
    gone = [ks.content(f"m/{n}.py") for n in ("soft", "hard", "retyped")]
    assert await redis_client.exists(*gone) == 0
    assert await redis_client.hkeys(ks.manifest) == ["m/kept.py"]


async def test_index_drift_both_ways_is_repaired(
    source: pgsource.PgSource, sync_engine: engine.Engine, redis_client: aioredis.Redis, cache: rediscache.RedisCache
) -> None:
    await put(source, "m/a.py", "A = 1\n")
    await sync_engine.full_resync()
    await redis_client.srem(cache.keyspace.index, "m/a.py")  # index lacks a present key
    await redis_client.sadd(cache.keyspace.index, "m/ghost.py")  # index lists an absent key
    report = await sync_engine.full_resync()
    assert sorted((i.operation, i.reason, i.path) for i in report.plan.items) == [
        (Op.DELETE, R.INDEX, "m/ghost.py"),
        (Op.REINDEX, R.INDEX, "m/a.py"),
    ]
    assert await redis_client.smembers(cache.keyspace.index) == {"m/a.py"}


async def test_no_drift_verification_reads_no_content_and_makes_no_per_module_round_trips(
    source: pgsource.PgSource,
    database_url: str,
) -> None:
    """Failure mode 2: the original plan's fix did one EXISTS round trip per module per message."""
    for n in range(300):
        await put(source, f"m/mod{n}.py", f"N = {n}\n")
    with private_redis() as server:
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        cache = rediscache.RedisCache(client=client, keyspace=keys.KeySpace(), check_batch_size=100)
        e = engine.Engine(source=source, cache=cache)
        try:
            await e.full_resync()
            async with client.monitor() as monitor:
                commands = asyncio.create_task(_collect(monitor))
                report = await e.full_resync()
                await client.set("monitor:end", "1")
                sent = await asyncio.wait_for(commands, 10)
        finally:
            await client.aclose()
    assert not report.plan
    assert report.repaired == 0
    assert not any(c.split()[0].upper() in ("SET", "GET", "EXISTS") for c in sent), sent
    # a constant number: status, generation, the index's size and then the index read whole, the manifest, one
    # length check per 100 modules (``check_batch_size``), a script load, the status record
    assert len(sent) <= 12, f"{len(sent)} round trips for 300 modules: {sent}"


async def _collect(monitor: Any) -> list[str]:
    """Commands our client sent (not those a Lua script ran), until the end marker."""
    sent = []
    async for event in monitor.listen():
        command = str(event["command"])
        if "monitor:end" in command:
            return sent
        handshake = command.split()[0].upper() in ("HELLO", "CLIENT", "AUTH", "SELECT")  # a new pool connection
        if event.get("client_type") != "lua" and "lua" not in str(event.get("client_address", "")) and not handshake:
            sent.append(command)
    return sent


async def test_ttl_is_jittered_per_key_and_refreshed_by_resyncs(
    source: pgsource.PgSource, redis_client: aioredis.Redis, keyspace: keys.KeySpace
) -> None:
    """Bifrost set one 24 h TTL on every key at once, so all expired at the same second."""
    cache = rediscache.RedisCache(client=redis_client, keyspace=keyspace, ttl_s=1000, ttl_jitter_ratio=0.5)
    e = engine.Engine(source=source, cache=cache)
    for n in range(40):
        await put(source, f"m/t{n}.py", f"T = {n}\n")
    await e.full_resync()
    ttls = [await redis_client.ttl(keyspace.content(f"m/t{n}.py")) for n in range(40)]
    assert all(1000 - 2 <= t <= 1500 for t in ttls), ttls
    assert len(set(ttls)) > 10  # spread, not one expiry second for all
    await redis_client.expire(keyspace.content("m/t0.py"), 5)
    await e.full_resync()
    assert await redis_client.ttl(keyspace.content("m/t0.py")) >= 998


async def test_unreachable_redis_is_a_transient_error_without_the_password(source: pgsource.PgSource) -> None:
    with private_redis("--requirepass", "s3cret-pw") as server:
        url = f"redis://:s3cret-pw@127.0.0.1:{server.port}/0"
        cache = rediscache.RedisCache.from_url(url, keyspace=keys.KeySpace())
    try:
        with pytest.raises(errors.CacheUnavailable) as caught:
            await engine.Engine(source=source, cache=cache).full_resync()
    finally:
        await cache.close()
    assert "s3cret-pw" not in str(caught.value)
    assert "unreachable" in str(caught.value)


async def test_rolled_back_change_never_reaches_the_cache(
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    database_url: str,
    redis_client: aioredis.Redis,
    cache: rediscache.RedisCache,
) -> None:
    """Failure mode 6: Bifrost wrote Redis inside the request's transaction; a rollback left its code cached."""
    await put(source, "m/r.py", "GOOD = 1\n")
    await sync_engine.full_resync()
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute(
                "UPDATE workspace_files SET content = 'BAD = 1', content_hash = $1 WHERE path = 'm/r.py'",
                modules.content_hash(b"BAD = 1"),
            )
            mid = await sync_engine.apply_paths(["m/r.py"])  # a sync while the change is uncommitted
            raise _Rollback
    except _Rollback:
        pass
    finally:
        await conn.close()
    assert not mid.plan
    assert not (await sync_engine.full_resync()).plan
    assert json.loads(await redis_client.get(cache.keyspace.content("m/r.py")))["content"] == "GOOD = 1\n"


class _Rollback(Exception):
    pass


async def test_an_absent_path_added_to_the_index_alone_is_removed(
    source: pgsource.PgSource, sync_engine: engine.Engine, redis_client: aioredis.Redis, cache: rediscache.RedisCache
) -> None:
    """A foreign SADD of a path no module has, with nothing else wrong (the chaos test's ``sadd-valid``)."""
    for n in range(30):
        await put(source, f"m/{n}.py", f"N = {n}\n")
    await sync_engine.full_resync()
    await redis_client.sadd(cache.keyspace.index, "ghost/never.py")
    report = await sync_engine.full_resync()
    assert [(i.operation, i.reason, i.path) for i in report.plan.items] == [(Op.DELETE, R.INDEX, "ghost/never.py")]
    assert not await redis_client.sismember(cache.keyspace.index, "ghost/never.py")


async def test_a_path_holding_the_listing_separator_is_served_like_any_other(
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    cache: rediscache.RedisCache,
) -> None:
    """A UTF8 database is listed as text joined by a separator any path may hold: such a listing is read again as
    stored bytes, and every row is listed exactly once."""
    odd = f"odd{pgsource.LIST_SEPARATOR}name.py"
    await put(source, odd, "A = 1\n")
    await put(source, "plain.py", "B = 2\n")
    listed = await source.list_modules()
    assert sorted(listed.live) == sorted([odd, "plain.py"])
    report = await sync_engine.full_resync()
    assert report.applied[R.MISSING] == 2
    assert json.loads(await redis_client.get(cache.keyspace.content(odd)))["content"] == "A = 1\n"
    assert not (await sync_engine.full_resync()).plan


async def test_no_full_garbage_collection_runs_inside_a_full_resync_and_the_collector_resumes_after(
    source: pgsource.PgSource, sync_engine: engine.Engine
) -> None:
    """At 1,000,000 modules every full collection walked the resync's whole working set again, so the collector's
    share grew faster than the cache (17.0 s with it, 14.4 s without). Two resyncs overlap here, as the operator's
    engines do: no collection of the oldest generation runs until both are over, and the collector is back after."""
    for i in range(300):
        await source.put_module(f"gc/m{i}.py", f"N = {i}\n".encode())
    await sync_engine.full_resync()
    collections: list[int] = []

    def counted(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            collections.append(1)

    async def resync_with_garbage() -> None:
        resync = asyncio.create_task(sync_engine.full_resync())
        await asyncio.sleep(0)  # the resync has begun (up to its first read)
        while not resync.done():
            _ = [[[] for _ in range(100)] for _ in range(100)]  # what a resync's working set makes the collector do
            await asyncio.sleep(0)
        await resync

    gc.callbacks.append(counted)
    try:
        assert gc.isenabled()
        await asyncio.gather(resync_with_garbage(), resync_with_garbage())
        assert collections == []
        assert gc.isenabled()
    finally:
        gc.callbacks.remove(counted)
