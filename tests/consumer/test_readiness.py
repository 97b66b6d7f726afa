"""The consumer's cache-readiness check against a generation key another Redis writer has tampered with.

The generation is a positive integer modcache writes; anything else there (text, a float, digits that are not
ASCII, a negative number, a number far above the server clock) must read as "not converged" and be repaired by
a full sync before the execution runs -- never raise out of the check and fail every message while the key
stays bad, never be pinned.
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from modcache import keys
from modcache_consumer import readiness


@pytest.mark.parametrize("garbage", ["abc", "12.5", "-3", "²", "", "9" * 400, "99999999999999999"])
async def test_a_garbage_generation_is_repaired_before_running(harness, redis_client: aioredis.Redis, garbage) -> None:
    await harness.module("modules/billing.py", "RATE = 1\n")
    await harness.converge()
    await redis_client.set(harness.keyspace.generation, garbage)
    guard = readiness.CacheGuard(engine=harness.sync_engine, cache=harness.sync_engine.cache)
    try:
        generation = await guard.check()
    finally:
        await guard.close()
    raw = await redis_client.get(harness.keyspace.generation)
    seconds, micros = await redis_client.time()
    assert keys.generation_problem(raw, clock_us=seconds * 1_000_000 + micros) is None, raw
    assert generation == keys.parse_generation(raw)
    assert await redis_client.exists(harness.keyspace.content("modules/billing.py"))
