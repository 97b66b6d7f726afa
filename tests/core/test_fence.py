"""The generation fence of ``RedisCache.apply`` (regression: manifest generations were written as 1.79e+15)."""

from __future__ import annotations

import redis.asyncio as aioredis

from modcache import plan, rediscache


def put(path: str, digest: str) -> rediscache.Write:
    return rediscache.Write(plan.Item(plan.Operation.PUT, path, plan.Reason.MISSING, None, digest), "{}")


async def test_manifest_generations_are_exact_integers(
    cache: rediscache.RedisCache, redis_client: aioredis.Redis
) -> None:
    fence = await cache.generation()
    await cache.apply([put("a.py", "1" * 64)], fence=fence)
    held = await redis_client.hget(cache.keyspace.manifest, "a.py")
    assert held == f"{fence + 1}:{'1' * 64}:2"  # the length of the value written, "{}"


async def test_a_write_fenced_by_an_older_read_is_reported_conflicted(cache: rediscache.RedisCache) -> None:
    stale_fence = await cache.generation()
    fresh = await cache.apply([put("a.py", "2" * 64)], fence=await cache.generation())
    late = await cache.apply([put("a.py", "1" * 64)], fence=stale_fence)
    assert [i.path for i in fresh.applied] == ["a.py"]
    assert [i.path for i in late.conflicted] == ["a.py"]
