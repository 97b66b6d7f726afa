"""The findings of attack 9 still open after the second pass, each attacked the way an attacker would: a storm of
writes to the probe key (F6), ``notify-keyspace-events`` cut at runtime down to the class the probe hears (F3), a
TTL'd cache whose own EXPIREs and status writes came back as foreign changes (F13), a row whose content changed under
an unchanged ``content_hash`` (F9); and a resync that finds nothing to do writes nothing at all. Outcomes are judged
by ``testkit.convergence`` (rows and keys compared directly) or Redis's own command counts, never by the plan."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import asyncpg
import redis.asyncio as aioredis

from modcache import engine, keys, modules, pgsource, plan, rediscache, settings, watcher
from testkit import convergence
from testkit.observers import Recorder
from testkit.servers import PrivateRedis
from testkit.watching import watching_source

KS = keys.KeySpace()
WITHIN_S = 2.0


async def put_some(source: pgsource.PgSource, n: int) -> list[str]:
    paths = [f"pkg/m{i}.py" for i in range(n)]
    for i, path in enumerate(paths):
        await source.put_module(path, f"N = {i}\n".encode())
    return paths


@contextlib.asynccontextmanager
async def watching(
    source: pgsource.PgSource, redis_url: str, database_url: str, *, ttl_s: int | None = None
) -> AsyncIterator[tuple[watcher.Watcher, asyncio.Task[None], Recorder]]:
    config = settings.Settings(resync_interval_s=3600, listener_backoff_max_s=0.2, probe_interval_s=0.05)  # type: ignore[call-arg]
    async with watching_source(source, redis_url, KS, database_url, config, ttl_s=ttl_s) as (w, task, recorder):
        await recorder.wait_for(lambda: any(r.deep for r, _ in recorder.syncs))  # the first deep resync is over
        yield w, task, recorder


def forged(value: str) -> str:
    data = json.loads(value)
    data["content"] = ("Z" if data["content"][0] != "Z" else "Y") + data["content"][1:]
    return json.dumps(data)


# -- a resync that finds nothing writes nothing --------------------------------------------------------------------


async def test_a_resync_that_finds_nothing_to_do_writes_nothing(
    server: PrivateRedis, source: pgsource.PgSource
) -> None:
    """The status record was deleted and written again (``del`` + ``hset``) by every resync, changing nothing but
    its time: a no-drift resync must leave Redis's write counters at zero, and a resync that finds drift still
    records it."""
    paths = await put_some(source, 30)
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    cache = rediscache.RedisCache(client=client, keyspace=KS)
    try:
        e = engine.Engine(source=source, cache=cache)
        await e.full_resync()  # the cold fill: its record says 30 missing
        await e.full_resync()  # news: nothing was missing this time (the record says so)
        await client.config_resetstat()
        report = await e.full_resync()
        table = await client.command()
        stats = await client.info("commandstats")
        writes = {
            name: v["calls"]
            for name, v in stats.items()
            if "write" in table.get(name.removeprefix("cmdstat_").split("|")[0], {}).get("flags", [])
        }
        assert not report.plan
        assert writes == {}, f"a no-drift resync wrote: {writes}"
        await client.delete(KS.content(paths[3]))
        report = await e.full_resync()
        assert report.repaired == 1
        assert json.loads(await client.hget(KS.status, "last_drift") or "{}") == {"missing": 1}
    finally:
        await client.aclose()


# -- F13: our own EXPIREs and status writes are our own ------------------------------------------------------------


async def test_a_ttl_cache_does_not_take_its_own_expires_and_status_writes_for_foreign_changes(
    server: PrivateRedis, source: pgsource.PgSource, database_url: str
) -> None:
    """With a TTL every full resync refreshes every key's TTL (TOUCH) and writes the status record; those writes
    carried no markers, so each came back as a foreign change: an update per content key (each a whole-value
    comparison against PostgreSQL) and a check of the status record, after every resync."""
    await put_some(source, 200)
    async with watching(source, server.url, database_url, ttl_s=3600) as (w, task, recorder):
        before = len(recorder.syncs)
        for _ in range(3):
            done = recorder.full_syncs()
            w.request_resync()
            await recorder.wait_for(lambda done=done: recorder.full_syncs() > done)  # type: ignore[misc]
        await asyncio.sleep(0.5)  # events of our own would have arrived by now: the outcome is their absence
        updates = [t for r, t in recorder.syncs[before:] if not r.full]
        assert updates == [], f"updates after our own resyncs: {updates}"
        assert recorder.full_syncs() - 1 <= 3 + 1, "our own writes asked for more resyncs"
        assert not task.done()


# -- F6: a storm of writes to the probe key -----------------------------------------------------------------------


async def test_a_storm_of_writes_to_the_probe_key_costs_a_bounded_number_of_resyncs(
    server: PrivateRedis, source: pgsource.PgSource, database_url: str
) -> None:
    """Anyone who can write under the prefix finds the probe key with SCAN; each write to it read as a flush: a
    routine and a deep resync (every module read from PostgreSQL), as often as the attacker writes. Now the first
    costs that, the rest of a 30 s window one of each at its end; a real FLUSHDB is still refilled at once."""
    await put_some(source, 100)
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        async with watching(source, server.url, database_url) as (w, task, recorder):
            before = len(recorder.syncs)
            written = 0
            ends = time.monotonic() + 2.0
            while time.monotonic() < ends:  # the attacker's loop: find the probe key, touch it
                async for key in client.scan_iter(match=f"{KS.prefix}modcache:probe:*", count=1000):
                    await client.set(key, "x")
                    written += 1
                await asyncio.sleep(0.02)
            storm = recorder.syncs[before:]
            deep = sum(1 for r, _ in storm if r.deep)
            full = sum(1 for r, _ in storm if r.full)
            assert written >= 20, f"the attack touched the probe key only {written} times"
            assert full <= 3, f"{written} probe writes cost {full} full resyncs"
            assert deep <= 1, f"{written} probe writes cost {deep} deep resyncs"
            assert w.state.replacements_limited >= 5, "the storm was not seen as one"
            await client.flushdb()
            started = time.perf_counter()
            left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
            assert not left, f"a FLUSHDB after the storm: not refilled in {time.perf_counter() - started:.1f} s"
            assert not task.done()
    finally:
        await client.aclose()


async def test_a_storm_of_deletes_of_the_probe_key_costs_no_deep_resync_each(
    server: PrivateRedis, source: pgsource.PgSource, database_url: str
) -> None:
    """A DEL of the probe key looks like a flush (the key is gone, as after FLUSHDB): each is refilled at once (a
    routine resync that finds nothing), but the deep resync -- every module read from PostgreSQL -- runs once per
    window, not once per DEL."""
    await put_some(source, 100)
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        async with watching(source, server.url, database_url) as (_, task, recorder):
            before = len(recorder.syncs)
            deleted = 0
            ends = time.monotonic() + 2.0
            while time.monotonic() < ends:
                async for key in client.scan_iter(match=f"{KS.prefix}modcache:probe:*", count=1000):
                    deleted += await client.delete(key)
                await asyncio.sleep(0.02)
            deep = sum(1 for r, _ in recorder.syncs[before:] if r.deep)
            assert deleted >= 10, f"the attack deleted the probe key only {deleted} times"
            assert deep <= 1, f"{deleted} deletes of the probe key cost {deep} deep resyncs"
            assert not await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
            assert not task.done()
    finally:
        await client.aclose()


# -- F3: notify-keyspace-events cut at runtime ---------------------------------------------------------------------


async def test_keyspace_event_classes_dropped_at_runtime_are_noticed_and_restored(
    server: PrivateRedis, source: pgsource.PgSource, database_url: str
) -> None:
    """``CONFIG SET notify-keyspace-events Kg``: the probe's PEXPIRE is a ``g`` event, so it still heard itself and
    believed the events, while no SET, SADD or HSET was heard any more (a forged value stayed until the periodic
    resync). Now the watcher reads the flags, subscribes again (which merges them back) and the forgery goes."""
    paths = await put_some(source, 50)
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        async with watching(source, server.url, database_url) as (w, task, recorder):
            await client.config_set("notify-keyspace-events", "Kg")
            await recorder.wait_for(lambda: any(not active for active, _ in recorder.keyspace), timeout_s=5.0)
            await recorder.wait_for(lambda: w.state.keyspace_active, timeout_s=5.0)
            flags = (await client.config_get("notify-keyspace-events"))["notify-keyspace-events"]
            assert set("K$sh") <= set(flags), flags
            victim = paths[5]
            await client.set(KS.content(victim), forged(str(await client.get(KS.content(victim)))))
            left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
            assert not left, left[:3]
            assert not task.done()
    finally:
        await client.aclose()


async def test_keyspace_event_classes_dropped_again_and_again_are_reported_not_fought(
    server: PrivateRedis, source: pgsource.PgSource, database_url: str
) -> None:
    """An attacker (or another application) who keeps cutting the flags down: the watcher must not re-subscribe
    (and resync deeply) in a loop; it says once which classes are missing (``State.keyspace_missing``, keyspace
    events off) and relies on the probe and the periodic resyncs."""
    await put_some(source, 20)
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        async with watching(source, server.url, database_url) as (w, task, recorder):
            before = len(recorder.syncs)
            ends = time.monotonic() + 4.0
            while time.monotonic() < ends and not w.state.keyspace_missing:
                await client.config_set("notify-keyspace-events", "Kg")
                await asyncio.sleep(0.001)  # cut again before a re-subscription's canary (a SET) can be heard
            assert w.state.keyspace_missing, "dropped classes were never reported"
            assert set(w.state.keyspace_missing) >= set("$sh")
            assert w.state.keyspace_active is False
            assert sum(1 for r, _ in recorder.syncs[before:] if r.deep) <= 2
            assert not task.done()
    finally:
        await client.aclose()


# -- F9: content changed under an unchanged content_hash ----------------------------------------------------------


async def test_content_changed_under_an_unchanged_hash_is_reported_by_a_deep_resync(
    server: PrivateRedis, source: pgsource.PgSource, database_url: str
) -> None:
    """An UPDATE of ``content`` that forgot ``content_hash``: the listing (no content) shows the row unchanged and
    the deep resync, which reads the content, dropped the rejection it found: nobody was told that workers run a
    version the source no longer has. It is reported, by its own reason, and the cached version is kept."""
    paths = await put_some(source, 10)
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    cache = rediscache.RedisCache(client=client, keyspace=KS)
    try:
        e = engine.Engine(source=source, cache=cache)
        await e.full_resync()
        kept = await client.get(KS.content(paths[2]))
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("UPDATE workspace_files SET content = 'N = 999' WHERE path = $1", paths[2])
        finally:
            await conn.close()
        routine = await e.full_resync()
        deep = await e.full_resync(deep=True)
        found = {r.path: r for r in deep.plan.rejected}
        assert paths[2] in found, deep.plan.rejected
        assert found[paths[2]].reason is modules.Rejection.CONTENT_CHANGED
        assert not routine.plan.items
        assert not deep.plan.items
        assert await client.get(KS.content(paths[2])) == kept
        assert json.loads(str(kept))["hash"] == modules.content_hash(b"N = 2\n")
        assert plan.Reason.STALE not in {i.reason for i in deep.plan.items}
    finally:
        await client.aclose()


# -- a watcher's routine resync leaves the content keys' lengths to the keyspace events ----------------------------


async def test_a_watchers_routine_resync_leaves_lengths_to_the_events_it_hears(
    server: PrivateRedis, source: pgsource.PgSource, database_url: str
) -> None:
    """While every class of keyspace event is on (this watcher set them), every write to a content key is heard and
    compared by whole value on its event, so the routine resync does not ``STRLEN`` every key (the largest part of
    its Redis time); once the events cannot be trusted (here: cut to ``Kg`` for good), it checks lengths again."""
    paths = await put_some(source, 100)
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        async with watching(source, server.url, database_url) as (w, task, recorder):

            async def strlen_calls_in_one_routine_resync() -> int:
                await client.config_resetstat()
                done = recorder.full_syncs()
                w.request_resync()
                await recorder.wait_for(lambda: recorder.full_syncs() > done)
                stats = await client.info("commandstats")
                return int(stats.get("cmdstat_strlen", {}).get("calls", 0))

            assert await strlen_calls_in_one_routine_resync() == 0
            victim = paths[9]
            await client.append(KS.content(victim), " ")  # another length: heard, repaired on its event
            left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
            assert not left, left[:3]
            ends = time.monotonic() + 4.0
            while time.monotonic() < ends and not w.state.keyspace_missing:
                await client.config_set("notify-keyspace-events", "Kg")
                await asyncio.sleep(0.001)
            assert w.state.keyspace_missing
            assert await strlen_calls_in_one_routine_resync() >= 100
            assert not task.done()
    finally:
        await client.aclose()
