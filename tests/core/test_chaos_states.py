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
from typing import Any

import pytest
import redis.asyncio as aioredis

from modcache import engine, keyevents, keys, pgsource, rediscache, settings, watcher
from testkit import convergence
from testkit.observers import Recorder, running
from testkit.servers import PrivateRedis, private_redis

KS = keys.KeySpace()
GHOST = "ghost/never.py"


@pytest.fixture
def volatile_server() -> AsyncIterator[PrivateRedis]:  # type: ignore[misc]
    """Evicting only keys with a TTL, nearest expiry first: the probe key (modcache's own keys carry none)."""
    with private_redis("--maxmemory-policy", "volatile-ttl") as redis_server:
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


async def test_a_flush_while_the_probe_watches_a_new_key_after_an_eviction_is_refilled(
    volatile_server: PrivateRedis, source: pgsource.PgSource, database_url: str
) -> None:
    """Seed 9, round 125 (a content forge, then ``FLUSHDB``, two rounds after an eviction that took the probe key): the
    probe reported the eviction, the eviction's resync ran and found the cache intact, and the flush landed before
    the probe's next round watched a key again, so no ``EXEC`` aborted; the forge's repair, in flight across the
    flush, wrote the generation again (from the server clock, so not "gone back" either), and nothing refilled the
    cache until the periodic resync. The touch is now reported only once a new key is watched. Here that arming is
    held until the flush and the repair are done."""
    for i in range(40):
        await source.put_module(f"pkg{i % 8}/m{i}.py", f"V = {i}\n".encode())
    client = aioredis.Redis.from_url(volatile_server.url, decode_responses=True)
    cache = rediscache.RedisCache(client=client, keyspace=KS)
    recorder = Recorder()
    w = watcher.Watcher(
        engine=engine.Engine(source=source, cache=cache),
        settings=settings.Settings(resync_interval_s=3600, probe_interval_s=0.05, listener_backoff_max_s=0.2),
        listen_dsn=database_url,
        observer=recorder,
        rng=random.Random(9),
    )
    arming, release = asyncio.Event(), asyncio.Event()
    open_node_connection = cache.open_node_connection

    async def held_open_node_connection() -> Any:  # the probe arming a new key after its old one was evicted
        arming.set()
        await release.wait()
        return await open_node_connection()

    try:
        async with running(w):
            await recorder.wait_for(lambda: recorder.full_syncs() and w.state.keyspace_active)
            assert not await convergence.converged(database_url, client, KS.prefix, within_s=5.0)
            cache.open_node_connection = held_open_node_connection  # type: ignore[method-assign]
            await evict_volatile_keys(client)
            await asyncio.wait_for(arming.wait(), 10.0)  # the probe's EXEC aborted: its key was evicted
            manual = recorder.full_syncs(watcher.MANUAL)
            w.request_resync()  # whatever the eviction asked for has run (this follows it) and found the cache intact
            await recorder.wait_for(lambda: recorder.full_syncs(watcher.MANUAL) > manual)
            await client.flushdb()
            syncs = len(recorder.syncs)
            await client.set(KS.content("pkg0/m0.py"), "garbage")  # the forge, repaired after the flush
            await recorder.wait_for(lambda: any(r.repaired for r, _ in recorder.syncs[syncs:]))
            assert await client.exists(KS.generation), "the repair wrote the generation again"
            release.set()
            left = await convergence.converged(database_url, client, KS.prefix, within_s=2.0)
            assert not left, f"the flush was not refilled: {left[:3]}"
    finally:
        release.set()
        await client.aclose()


async def evict_volatile_keys(client: aioredis.Redis) -> None:
    """What the chaos test's eviction does (``maxmemory`` just below what is used, restored by the next command of
    the same pipeline); under ``volatile-ttl`` only keys with a TTL go, the probe key first."""
    used = int((await client.info("memory"))["used_memory"])
    async with client.pipeline(transaction=False) as pipe:
        pipe.config_set("maxmemory", str(used - 4096))
        pipe.set("chaos:evict", "x")
        pipe.config_set("maxmemory", "0")
        await pipe.execute(raise_on_error=False)  # the SET is refused (OOM): too little can be evicted
