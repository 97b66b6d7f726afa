"""The full resync plans only the paths the cache does not already serve exactly; its plan must be the one the
pure planner computes over both complete views, whatever mix of drift the cache has."""

from __future__ import annotations

import random

import asyncpg
import pytest
import redis.asyncio as aioredis

from modcache import engine, modules, pgsource, plan, rediscache


async def test_plan_of_the_full_resync_equals_the_plan_over_complete_views(
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    cache: rediscache.RedisCache,
    database_url: str,
) -> None:
    for n in range(60):
        await source.put_module(f"pkg/m{n}.py", f"X = {n}\n".encode())
    await sync_engine.full_resync()
    ks, rng = cache.keyspace, random.Random(7)
    paths = [f"pkg/m{n}.py" for n in range(60)]
    rng.shuffle(paths)
    await redis_client.delete(*(ks.content(p) for p in paths[0:5]))  # missing, index kept
    for p in paths[5:10]:  # another writer's older content
        await redis_client.set(ks.content(p), modules.encode_cached(p, "OLD\n", modules.content_hash(b"OLD\n")))
    await redis_client.srem(ks.index, *paths[10:14])  # unindexed but present
    await redis_client.hdel(ks.manifest, *paths[14:18])  # manifest lost its entry
    await redis_client.sadd(ks.index, "gone/only_indexed.py")  # index lists an absent key
    await redis_client.set(ks.content("gone/orphan.py"), modules.encode_cached("gone/orphan.py", "Y\n", "h"))
    await redis_client.sadd(ks.index, "gone/orphan.py")
    for p in paths[18:22]:  # source moved on while nobody listened
        await source.put_module(p, b"NEW = 1\n")
    conn = await asyncpg.connect(database_url)
    try:  # a row that cannot be served: rejected, and its cached copy is left alone
        await conn.execute("UPDATE workspace_files SET content = NULL WHERE path = $1", paths[22])
    finally:
        await conn.close()

    _, source_view, cache_view = await sync_engine.observe()
    expected = plan.compute(source_view, cache_view)
    report = await sync_engine.full_resync(dry_run=True)

    assert report.plan.items == expected.items
    assert [r.path for r in report.plan.rejected] == [paths[22]]
    assert {r.value: n for r, n in report.plan.counts().items() if n} == {
        "missing": 5,
        "stale": 9,  # 5 older content + 4 newer source
        "orphan": 1,
        "index": 9,  # 4 unindexed + 4 without manifest entry + 1 indexed absent key
    }
    await sync_engine.full_resync()
    assert not (await sync_engine.full_resync(dry_run=True)).plan


@pytest.mark.parametrize("whole_read", [rediscache.WHOLE_READ, 100], ids=["read whole", "read in pages"])
async def test_unindexed_modules_are_found_when_nothing_else_drifted(
    whole_read: int,
    monkeypatch: pytest.MonkeyPatch,
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    cache: rediscache.RedisCache,
) -> None:
    """Content and manifest agree with the source; only the index lost entries (failure mode 1's mirror image)."""
    monkeypatch.setattr(rediscache, "WHOLE_READ", whole_read)
    for n in range(300):  # enough for hashtable-encoded keys: SSCAN pages through the index when not read whole
        await source.put_module(f"lib/m{n}.py", f"Y = {n}\n".encode())
    await sync_engine.full_resync()
    lost = ["lib/m7.py", "lib/m150.py", "lib/m299.py"]
    await redis_client.srem(cache.keyspace.index, *lost)

    report = await sync_engine.full_resync()

    assert sorted((i.reason, i.path) for i in report.plan.items) == [(plan.Reason.INDEX, p) for p in sorted(lost)]
    assert await redis_client.smismember(cache.keyspace.index, lost) == [1, 1, 1]


async def test_modules_missing_from_the_manifest_are_found_when_nothing_else_drifted(
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    cache: rediscache.RedisCache,
) -> None:
    """Content and index are right; the manifest (modcache's own bookkeeping) lost entries."""
    for n in range(300):
        await source.put_module(f"lib/m{n}.py", f"Y = {n}\n".encode())
    await sync_engine.full_resync()
    lost = ["lib/m3.py", "lib/m201.py"]
    await redis_client.hdel(cache.keyspace.manifest, *lost)

    report = await sync_engine.full_resync()

    assert sorted((i.reason, i.path) for i in report.plan.items) == [(plan.Reason.INDEX, p) for p in sorted(lost)]
    assert all(await redis_client.hmget(cache.keyspace.manifest, lost))
