"""The engine against real PostgreSQL and Redis: the failure modes of bifrost-contract.md and the repairs."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from modcache import engine, modules, pgsource, rediscache
from modcache.plan import Reason as R


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
