"""States the chaos test (``test_chaos.py``) reaches, reproduced directly.

Seed 9, round 55 (``SADD index ghost/never.py`` with the 10,000 bulk modules cached): the index event asked for a
routine resync while the deep one that an earlier round's manifest fault had asked for was comparing every value
(several seconds at 10,000 modules on a loaded machine). That deep resync had read the index before the SADD, so it
reported "in sync" with the ghost still listed, and the routine resync waited behind it past the bound. A routine
resync now runs while a deep one is still comparing values."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Mapping

import pytest
import redis.asyncio as aioredis

from modcache import engine, keyevents, keys, pgsource, rediscache, settings, watcher
from testkit import convergence
from testkit.observers import Recorder, running
from testkit.servers import PrivateRedis, private_redis

KS = keys.KeySpace()
GHOST = "ghost/never.py"


@pytest.fixture
def server() -> AsyncIterator[PrivateRedis]:  # type: ignore[misc]
    with private_redis() as redis_server:
        yield redis_server


async def test_an_index_fault_is_repaired_while_a_deep_resync_is_still_comparing_values(
    server: PrivateRedis, source: pgsource.PgSource, database_url: str
) -> None:
    for i in range(40):
        await source.put_module(f"pkg{i % 8}/m{i}.py", f"V = {i}\n".encode())
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    cache = rediscache.RedisCache(client=client, keyspace=KS)
    comparing, release = asyncio.Event(), asyncio.Event()
    check_values = cache.check_values

    async def slow_check_values(expected: Mapping[str, tuple[str, str]]) -> dict[str, str]:
        comparing.set()
        await release.wait()  # every value of 10,000 modules being compared: held until the test is done
        return await check_values(expected)

    recorder = Recorder()
    w = watcher.Watcher(
        engine=engine.Engine(source=source, cache=cache),
        settings=settings.Settings(resync_interval_s=3600, probe_interval_s=0.05, listener_backoff_max_s=0.2),
        listen_dsn=database_url,
        observer=recorder,
        rng=random.Random(9),
    )
    try:
        async with running(w):
            await recorder.wait_for(lambda: recorder.full_syncs() and w.state.keyspace_active)
            assert not await convergence.converged(database_url, client, KS.prefix, within_s=5.0)
            cache.check_values = slow_check_values  # type: ignore[method-assign]
            w.request_resync(deep=True)  # what a manifest fault's claims rebuild asks for
            await asyncio.wait_for(comparing.wait(), 10.0)
            await client.sadd(KS.index, GHOST)
            left = await convergence.converged(database_url, client, KS.prefix, within_s=2.0)
            assert not left, f"not repaired while the deep resync runs: {left[:3]}"
            release.set()
            await recorder.wait_for(lambda: any(r.deep for r, _ in recorder.syncs[1:]))
            assert not await convergence.differences(database_url, client, KS.prefix)
    finally:
        release.set()
        await client.aclose()


async def test_an_evicted_manifest_is_rebuilt_from_the_keys_claims(
    server: PrivateRedis, source: pgsource.PgSource, database_url: str
) -> None:
    """Seed 9, round 58 (an eviction burst that took the manifest hash itself, 10,000 bulk modules cached): the held
    resync rebuilt the manifest by comparing every value with PostgreSQL (seconds), where a deleted manifest is
    rebuilt from the keys' claims. An evicted one now is too (a deep resync follows, as after a DEL)."""
    for i in range(40):
        await source.put_module(f"pkg/m{i}.py", f"V = {i}\n".encode())
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    cache = rediscache.RedisCache(client=client, keyspace=KS)
    recorder = Recorder()
    w = watcher.Watcher(
        engine=engine.Engine(source=source, cache=cache),
        settings=settings.Settings(resync_interval_s=3600, probe_interval_s=0.05, listener_backoff_max_s=0.2),
        listen_dsn=database_url,
        observer=recorder,
        rng=random.Random(9),
    )
    try:
        async with running(w):
            await recorder.wait_for(lambda: recorder.full_syncs() and w.state.keyspace_active)
            for _ in range(watcher.EVICTIONS_PER_S):  # a burst of evictions heard (Redis evicting under maxmemory)
                w._evicted(0)
            # the event Redis sends for an evicted manifest (a DEL would send ``del``, which asks for claims anyway)
            await w._on_key_event(keyevents.Changed(role="manifest", event="evicted"))
            assert w._claims_wanted, "the held resync would compare every value to rebuild the manifest"
            assert not await convergence.converged(database_url, client, KS.prefix, within_s=2.0)
    finally:
        await client.aclose()
