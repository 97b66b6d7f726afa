"""Findings of attack 9d (a hostile co-tenant with write access to the Redis database and CONNECT to PostgreSQL),
each performed the way the attacker did it against a running watcher. Outcomes are judged by ``testkit.convergence``
(rows and keys compared directly)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import asyncpg
import pytest
import redis.asyncio as aioredis

from modcache import db, engine, keys, modules, pgsource, rediscache
from testkit import convergence
from testkit.servers import PrivateRedis
from testkit.watching import put_modules, redis_cpu_s, watching_quick

KS = keys.KeySpace()
WITHIN_S = 2.0
PROBES = f"{KS.prefix}modcache:probe:*"


async def _probe_keys(client: aioredis.Redis) -> list[str]:
    return [k async for k in client.scan_iter(match=PROBES, count=1000)]


# -- F2: a FLUSHDB hidden behind the replaced-cache rate limit -----------------------------------------------------


DISGUISES = ["probe and generation", "and the bookkeeping restored", "and a content key for the watcher to repair"]


@pytest.mark.parametrize("disguise", DISGUISES)
async def test_a_flushdb_disguised_as_a_write_to_the_probe_key_is_refilled_at_once(
    disguise: str, server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """Reports of a replaced cache are rate-limited (one routine and one deep resync per 30 s window) unless the
    cache looks flushed. The attacker opens a window by writing the probe key and its guard (SCAN finds both), then
    flushes and at once sets the probe key it SCANned and a believable, higher generation: the cache looked intact,
    and stayed empty for the 27 s left of the window, every window. Now the index, the manifest and their copies
    must be there too: the flush is refilled at once. Putting back the index, the manifest and their copies from
    DUMPs in the same pipeline (attack-9e E5) leaves the content keys gone, which a sample of them shows. A content
    key written with the flush is repaired before the probe reports, and that repair makes index, manifest and copies
    again, naming that one module, whose content key is there: the index's size, against the last full resync's,
    tells (the chaos test's seed 9, round 125: the repairs of its round's keys did the same)."""
    restored, planted = disguise == DISGUISES[1], disguise == DISGUISES[2]
    paths = await put_modules(source, 40)
    raw = aioredis.Redis.from_url(server.url)  # DUMPs are bytes
    async with watching_quick(source, server.url, KS, database_url) as (w, task, recorder):
        for key in await _probe_keys(client):
            await client.set(key, "touched", px=60_000)
        assert not await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        await recorder.wait_for(lambda: w._replaced.started_at is not None)  # the report that opens the window
        await recorder.wait_for(lambda: w.state.keyspace_active and not w._resync_wanted.is_set())
        for _ in range(2):  # twice within the window
            probes = [k for k in await _probe_keys(client) if not k.endswith(":guard")]
            generation = int(await client.get(KS.generation) or 0)
            bookkeeping = [KS.index, KS.manifest, *KS.expected()]
            dumps = [await raw.dump(key) for key in bookkeeping] if restored else []
            async with client.pipeline(transaction=False) as pipe:
                pipe.flushdb()
                for key in probes:
                    pipe.set(key, "1", px=60_000)
                if planted:
                    pipe.set(KS.content(paths[0]), "garbage")  # repaired by the watcher at once
                else:
                    pipe.set(KS.generation, str(generation + 1000))
                for key, dumped in zip(bookkeeping, dumps, strict=False):
                    pipe.restore(key, 0, dumped)
                await pipe.execute()
            started = time.perf_counter()
            left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
            assert not left, f"a disguised FLUSHDB: not refilled in {time.perf_counter() - started:.1f} s: {left[:3]}"
        assert w.state.replacements_limited >= 1, "the attack did not reach the rate limit"
        assert not task.done()
    await raw.aclose()


# -- F1: the lineage in the status record taken as authority --------------------------------------------------------

FORGED_LINEAGE = {
    "a timeline above every server": ("source_timeline", "99"),
    "a WAL position": ("source_lsn", "FFFFFFFF/FFFFFFFF"),
}


@pytest.mark.parametrize("forgery", list(FORGED_LINEAGE))
async def test_a_forged_lineage_in_the_status_record_stops_neither_the_watcher_nor_a_restarted_modcache(
    forgery: str, server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """The status record says which PostgreSQL cluster, timeline and WAL position the cache was filled from, and a
    server behind that is refused (a stale former primary). It is a key under the prefix: one HSET raising the
    timeline or the position made every later sync refuse every server, for ever (the bar only goes up, and a
    restarted modcache learnt it again), and the cache was no longer maintained. Now the record is sealed with a
    key kept in PostgreSQL: a forged one is not believed, and the next full resync replaces it."""
    field, value = FORGED_LINEAGE[forgery]
    paths = await put_modules(source, 40)
    async with watching_quick(source, server.url, KS, database_url) as (_, task, recorder):
        assert (await client.hgetall(KS.status))["source_seal"]
        await client.hset(KS.status, field, value)
        full = recorder.full_syncs()
        await client.delete(KS.index)  # any fault that asks for a full resync
        await source.put_module(paths[3], b"N = 'changed'\n")
        await recorder.wait_for(lambda: recorder.full_syncs() > full)
        left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        assert not left, left
        await client.delete(KS.content(paths[5]))
        assert not await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        assert not [e for e, _ in recorder.failures], recorder.failures
        assert (await client.hgetall(KS.status))[field] != value, "the forged record was not replaced"
        assert not task.done()
    await client.hset(KS.status, field, value)  # again, for a modcache that starts now (nothing in memory)
    fresh = pgsource.PgSource(engine=db.make_engine(database_url))
    cache = rediscache.RedisCache.from_url(server.url, keyspace=KS)
    try:
        report = await engine.Engine(source=fresh, cache=cache).full_resync()
    finally:
        await fresh.close()
        await cache.close()
    assert report.source_count == 40


# -- F3: spoofed ``evicted`` notifications ---------------------------------------------------------------------------


@pytest.mark.parametrize("near_limit", [False, True], ids=["no memory limit", "within 10% of maxmemory"])
async def test_a_swapped_in_forged_database_is_not_taken_for_an_eviction_by_spoofed_notifications(
    near_limit: bool, server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """Anyone may PUBLISH on a keyspace channel. The attacker copies the cache into database 1, forges one module
    there (same length, its ``hash`` field kept: what a routine resync accepts), floods ``evicted`` notifications
    for the probe's keys and swaps the databases: the probe took the swap for an eviction, no deep resync ran, and
    workers were served the forged code until the hourly deep check. Redis was nowhere near a memory limit, so the
    notifications are not believed now: the swap is a replaced database, and the deep resync repairs the forgery.
    A Redis used as an LRU cache sits near its limit all the time (attack-9e E4): the probe's keys, still there
    after the swap, were not evicted either."""
    paths = await put_modules(source, 40)
    async with watching_quick(source, server.url, KS, database_url) as (_, task, recorder):
        victim = KS.content(paths[7])
        async for key in client.scan_iter(match=f"{KS.prefix}*", count=1000):
            await client.copy(key, key, destination_db=1)
        other = aioredis.Redis.from_url(server.url, db=1, decode_responses=True)
        try:
            value = json.loads(str(await other.get(victim)))
            value["content"] = "Z" * len(value["content"])  # same length, same hash field
            await other.set(victim, json.dumps(value))
        finally:
            await other.aclose()
        if near_limit:  # an LRU cache near its limit (20 MB of someone else's data, 8 % free): nothing is evicted
            await client.set("theirs:filler", "x" * 20_000_000)
            used = int((await client.info("memory"))["used_memory"])
            await client.config_set("maxmemory-policy", "allkeys-lru")
            await client.config_set("maxmemory", str(int(used * 1.08)))
        stop, flowing = asyncio.Event(), asyncio.Event()
        spoofing = asyncio.create_task(_spoof_evictions(client, stop, flowing))
        await flowing.wait()  # the forged notifications flow before the swap
        try:
            deep = sum(1 for r, _ in recorder.syncs if r.deep)
            await client.swapdb(0, 1)
            await recorder.wait_for(lambda: sum(1 for r, _ in recorder.syncs if r.deep) > deep)
        finally:
            stop.set()
            await spoofing
        left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        assert not left, left
        assert not task.done()


async def _spoof_evictions(client: aioredis.Redis, stop: asyncio.Event, flowing: asyncio.Event) -> None:
    while not stop.is_set():
        async for key in client.scan_iter(match=PROBES, count=1000):
            await client.publish(f"__keyspace@0__:{key}", "evicted")
        flowing.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.01)


# -- F4: an empty string at a content key; F5: a forged manifest length ---------------------------------------------


async def test_content_keys_holding_the_empty_string_are_removed_like_any_other_stray(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """A key of the empty string reads as length 0, which the length checks took for a key that does not exist: an
    orphan holding ``""`` stayed for ever (watch mode, full and deep resyncs), and a worker probing for that module
    found a non-JSON value for a module that does not exist."""
    await put_modules(source, 20)
    async with watching_quick(source, server.url, KS, database_url) as (_, task, _recorder):
        await client.set(KS.content("ghost/empty.py"), "")
        await client.sadd(KS.index, "ghost/indexed_empty.py")
        await client.set(KS.content("ghost/indexed_empty.py"), "")
        left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        assert not left, left
        assert not task.done()
    await client.set(KS.content("ghost/unwatched.py"), "")  # nobody heard it: the deep resync's SCAN finds it
    cache = rediscache.RedisCache.from_url(server.url, keyspace=KS)
    try:
        report = await engine.Engine(source=source, cache=cache).full_resync(deep=True)
    finally:
        await cache.close()
    assert [i.path for i in report.plan.items] == ["ghost/unwatched.py"]
    assert await client.exists(KS.content("ghost/unwatched.py")) == 0


async def test_a_forged_manifest_length_is_put_right_in_watch_mode(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """The manifest's length of a value is what resyncs that check lengths trust. One forged (generation and hash
    kept) was looked at by the member check and left: only the value and the hash were compared."""
    paths = await put_modules(source, 20)
    async with watching_quick(source, server.url, KS, database_url) as (_, task, _recorder):
        generation, digest, length = str(await client.hget(KS.manifest, paths[4])).split(":")
        await client.hset(KS.manifest, paths[4], f"{generation}:{digest}:{int(length) + 1}")
        left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        assert not left, left
        assert not task.done()


# -- F6: forged keyspace notifications as free amplification -------------------------------------------------------

FLOOD_MODULES = 20_000


async def test_a_flood_of_forged_manifest_notifications_does_not_monopolise_redis(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """Anyone may PUBLISH ``hset`` on the manifest's keyspace channel, and each makes the watcher walk the whole
    manifest in Lua, holding Redis for every Bifrost worker: 200 a second kept Redis ~70 % busy at 10,000 modules.
    The checks are paced now (and are a COPY of the expected manifest in C since); a flood costs Redis a bounded
    share (here: under half of one core, measured by Redis's own CPU counters), and a real fault during the flood is
    still repaired."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO workspace_files (path, content, content_hash, entity_type) "
            "SELECT 'flood/m' || g || '.py', $1, $2, 'module' FROM generate_series(1, $3::int) g",
            "F = 1\n",
            modules.content_hash(b"F = 1\n"),
            FLOOD_MODULES,
        )
    finally:
        await conn.close()
    async with watching_quick(source, server.url, KS, database_url) as (w, task, _recorder):
        put_back = w.state.manifest_put_back
        flooding = asyncio.create_task(_flood(client, f"__keyspace@0__:{KS.manifest}", "hset", seconds=2.0))
        before, started = await redis_cpu_s(client), time.perf_counter()
        await client.hdel(KS.manifest, "flood/m7.py")  # a real fault among the forged ones
        await flooding
        share = (await redis_cpu_s(client) - before) / (time.perf_counter() - started)
        left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        assert not left, left
        assert w.state.manifest_put_back > put_back
        assert share < 0.5, f"Redis was {share:.0%} busy during the flood"
        assert not task.done()


async def _flood(client: aioredis.Redis, channel: str, event: str, *, seconds: float) -> None:
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        await client.publish(channel, event)
        await asyncio.sleep(0.005)


async def test_forged_del_notifications_of_the_index_neither_rewrite_it_nor_resync(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """A forged ``del`` on the index's keyspace channel (plain PUBLISH) made the watcher put the copy back (a DEL and a
    COPY of the whole index in Redis) and resync in full, once per message: 1,588 of each in 10 s (attack-9e E3). The
    index is intact to look at, so its members are compared with the copy instead (paced), and nothing is written."""
    await put_modules(source, 40)
    async with watching_quick(source, server.url, KS, database_url) as (w, task, recorder):
        full, restored = recorder.full_syncs(), w.state.copies_restored
        await client.config_resetstat()
        await _flood(client, f"__keyspace@0__:{KS.index}", "del", seconds=1.0)
        stats = await client.info("commandstats")
        assert "cmdstat_copy" not in stats, stats.get("cmdstat_copy")
        assert w.state.copies_restored == restored
        assert recorder.full_syncs() == full
        assert not await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        assert not task.done()
