"""Faults a keyspace event names only by key, repaired without a full resync (issue 9 item 4): a write to the
probe key alone, and members of the index and the manifest changed by someone else (``SREM``/``SADD`` of index
members, ``HSET``/``HDEL`` of manifest fields). Each is made the way an attacker would, with plain Redis commands
against a running watcher; repair is judged by ``testkit.convergence`` (rows and keys compared directly), and that
no full resync was needed by what the watcher reported (``Recorder``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from modcache import keys, pgsource, plan, rediscache, settings, watcher
from testkit import convergence
from testkit.observers import Recorder
from testkit.polling import eventually
from testkit.servers import PrivateRedis
from testkit.watching import watching_source

KS = keys.KeySpace()
WITHIN_S = 2.0
PROBES = f"{KS.prefix}modcache:probe:*"


async def put_some(source: pgsource.PgSource, n: int) -> list[str]:
    paths = [f"pkg/m{i}.py" for i in range(n)]
    for i, path in enumerate(paths):
        await source.put_module(path, f"N = {i}\n".encode())
    return paths


@contextlib.asynccontextmanager
async def watching(
    source: pgsource.PgSource, redis_url: str, database_url: str
) -> AsyncIterator[tuple[watcher.Watcher, asyncio.Task[None], Recorder]]:
    config = settings.Settings(resync_interval_s=3600, listener_backoff_max_s=0.2, probe_interval_s=0.05)  # type: ignore[call-arg]
    async with watching_source(source, redis_url, KS, database_url, config) as (w, task, recorder):
        await recorder.wait_for(lambda: any(r.deep for r, _ in recorder.syncs))  # the first deep resync is over
        yield w, task, recorder


async def probe_key(client: aioredis.Redis) -> str:
    """The probe key the watcher watches now (not its guard)."""
    found = [k async for k in client.scan_iter(match=PROBES, count=1000) if not k.endswith(":guard")]
    assert len(found) == 1, found
    return found[0]


async def next_armed(events: aioredis.client.PubSub, old: str) -> str:
    """The probe key armed after ``old`` (its ``set`` event)."""
    async with asyncio.timeout(WITHIN_S):
        async for message in events.listen():
            key = str(message["channel"]).split(":", 1)[1]
            if message["data"] == "set" and key != old and not key.endswith(":guard"):
                return key
    raise AssertionError("unreachable")


# -- the probe key -------------------------------------------------------------------------------------------------


async def test_a_del_of_the_probe_key_alone_is_rearmed_without_a_resync_and_a_flushdb_still_refills(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """A DEL of the probe key aborted the probe's EXEC as a FLUSHDB does, and cost a routine resync each time (the
    deep one once per 30 s). The guard key, watched on a connection of its own, tells them apart: a flush touches
    both watches, a DEL of the probe key only one; that one is re-armed under a new name and nothing is resynced."""
    await put_some(source, 50)
    async with watching(source, server.url, database_url) as (w, task, recorder):
        events = client.pubsub(ignore_subscribe_messages=True)
        await events.psubscribe(f"__keyspace@0__:{PROBES}")
        try:
            full = recorder.full_syncs()
            for _ in range(5):
                old = await probe_key(client)
                assert await client.delete(old) == 1
                assert await next_armed(events, old) != old
            # a resync would have been asked for by the round that found the probe's watch touched, before it re-armed:
            # one probe round more and the applier's turn are all it would take to show up
            await asyncio.sleep(0.3)
            assert recorder.full_syncs() == full, [t for r, t in recorder.syncs if r.full][full:]
            assert w.state.replacements_limited == 0
        finally:
            await events.aclose()
        await client.flushdb()
        started = time.perf_counter()
        left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        assert not left, f"a FLUSHDB after the DELs: not refilled in {time.perf_counter() - started:.1f} s: {left}"
        assert recorder.full_syncs() > full
        assert not task.done()


# -- index and manifest members ------------------------------------------------------------------------------------

FORGED_FENCE = "99999999999999999:" + "0" * 64 + ":1"
BELIEVABLE = "{now}:" + "0" * 64 + ":1"  # a generation the fence believes: it would hold the path's updates back


async def believable(client: aioredis.Redis) -> str:
    seconds, micros = await client.time()
    return BELIEVABLE.format(now=int(seconds) * 1_000_000 + int(micros) + 3_600_000_000)


MEMBER_ATTACKS = {
    "SREM of an index member": lambda c, p: c.srem(KS.index, p),
    "SREM of many index members": lambda c, p: c.srem(KS.index, p, "pkg/m1.py", "pkg/m2.py", "pkg/m3.py"),
    "SPOP of index members": lambda c, p: c.spop(KS.index, 3),
    "SADD of a path that is no module": lambda c, p: c.sadd(KS.index, "ghost/never.py"),
    "SADD of a name that is not a path": lambda c, p: c.sadd(KS.index, "modcache:generation"),
    "SADD of a name that is not UTF-8": lambda c, p: c.sadd(KS.index, b"bad\xff.py"),
    "SMOVE of a member into another set": lambda c, p: c.smove(KS.index, "elsewhere", p),
    "HSET of a field, an unbelievable fence": lambda c, p: c.hset(KS.manifest, p, FORGED_FENCE),
    "HSET of a field, a believable fence": lambda c, p: _believable_hset(c, p),
    "HSET of a new field that is not a path": lambda c, p: c.hset(KS.manifest, "index", FORGED_FENCE),
    "HDEL of a field": lambda c, p: c.hdel(KS.manifest, p),
    "HINCRBY of a field that is a number": lambda c, p: c.hincrby(KS.manifest, "pkg/none.py", 5),
    "SREM and HDEL of one path together": lambda c, p: _both(c, p),
}


async def _believable_hset(client: aioredis.Redis, path: str) -> object:
    return await client.hset(KS.manifest, path, await believable(client))


async def _both(client: aioredis.Redis, path: str) -> object:
    async with client.pipeline(transaction=True) as pipe:
        pipe.srem(KS.index, path)
        pipe.hdel(KS.manifest, path)
        return await pipe.execute()


@pytest.mark.parametrize("attack", list(MEMBER_ATTACKS))
async def test_an_index_or_manifest_member_changed_by_someone_else_is_repaired_without_a_full_resync(
    attack: str, server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """A keyspace event names the index or the manifest, not the member: each of these waited for a full resync
    (about 1-2 s at 100,000 modules). The watcher now finds the members that differ from the expected copies it
    keeps beside them (written by the same scripts) and converges just those; the manifest, which Redis cannot
    diff in C, is put back from its copy instead (a COPY in C), forged fences and all."""
    paths = await put_some(source, 30)
    async with watching(source, server.url, database_url) as (w, task, recorder):
        full, before = recorder.full_syncs(), len(recorder.syncs)
        checks, put_back = w.state.member_checks, w.state.manifest_put_back
        await MEMBER_ATTACKS[attack](client, paths[7])
        started = time.perf_counter()
        left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        took = time.perf_counter() - started
        assert not left, f"{attack}: not repaired in {took:.1f} s: {left}"
        assert await client.type("elsewhere") in ("set", "none")  # a key of someone else's is theirs
        assert recorder.full_syncs() == full, f"{attack}: repaired by a full resync"
        updates = [r for r, _ in recorder.syncs[before:] if not r.full and (r.repaired or r.plan.repairs)]
        assert updates, f"{attack}: no update repaired it"
        if attack.startswith(("S", "SREM and HDEL")):  # index members: found by difference, converged one by one
            assert w.state.member_checks > checks
        if "HDEL" in attack or attack.startswith("H"):
            assert w.state.manifest_put_back > put_back
            assert any(p.role == "manifest" for r in updates for p in r.plan.repairs), f"{attack}: not reported"
        assert await client.sdiff(KS.index, KS.expected_index) == set()
        assert await client.hgetall(KS.manifest) == await client.hgetall(KS.expected_manifest)
        assert not task.done()


async def test_the_expected_copies_written_by_someone_else_are_not_believed_but_rebuilt(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """Whoever can write the index can write its expected copy: a member removed from both is then no difference.
    A foreign write to a copy makes the next member event a full resync, after which the copies are rebuilt from
    the repaired index and manifest, and member checks are believed again."""
    paths = await put_some(source, 30)
    async with watching(source, server.url, database_url) as (w, task, recorder):
        full = recorder.full_syncs()
        async with client.pipeline(transaction=True) as pipe:  # the attacker covers their tracks first
            pipe.srem(KS.expected_index, paths[3])
            pipe.srem(KS.index, paths[3])
            await pipe.execute()
        left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        assert not left, left
        # the copy was not believed: only a full resync repairs (its report comes after its writes)
        await recorder.wait_for(lambda: recorder.full_syncs() > full)
        await eventually(lambda: not w._expected_doubted, WITHIN_S)
        assert await client.sismember(KS.expected_index, paths[3])
        full = recorder.full_syncs()
        await client.srem(KS.index, paths[4])
        assert not await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        assert recorder.full_syncs() == full
        assert not task.done()


async def test_a_cache_without_expected_copies_gets_them_from_its_first_resync(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """A cache filled by a modcache that kept no copies (or whose copies were evicted): the member check cannot
    tell, so a full resync repairs (as before) and leaves copies that agree; the next fault needs none."""
    paths = await put_some(source, 30)
    async with watching(source, server.url, database_url) as (w, task, recorder):
        await client.delete(*KS.expected())
        full = recorder.full_syncs()
        await client.srem(KS.index, paths[5])
        assert not await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        await recorder.wait_for(lambda: recorder.full_syncs() > full)
        await eventually(lambda: not w._expected_doubted, WITHIN_S)
        put_back, seen = w.state.manifest_put_back, len(recorder.syncs)
        await client.hdel(KS.manifest, paths[6])
        assert not await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        # a full resync the earlier burst still had queued may run meanwhile; none may be what repaired the fault
        repaired_in_full = [r for r, _ in recorder.syncs[seen:] if r.full and r.plan.items]
        assert not repaired_in_full, repaired_in_full[0].plan.describe()
        assert w.state.manifest_put_back > put_back
        assert not task.done()


async def test_two_watchers_on_one_cache_repair_a_member_fault_and_do_not_resync_each_other_for_ever(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """Two watchers of one cache (an operator replica beside a CLI one): each one's repairs write the expected copies,
    which the other cannot tell from an attacker's writes (it does not know the nonce): it resyncs in full, compares
    the copies in full and rewrites nothing that agrees, so the other hears nothing back. A member fault is repaired,
    and both then fall quiet."""
    paths = await put_some(source, 30)
    config = settings.Settings(resync_interval_s=3600, listener_backoff_max_s=0.2, probe_interval_s=0.05)  # type: ignore[call-arg]
    async with (
        watching(source, server.url, database_url) as (a, task_a, recorder_a),
        watching_source(source, server.url, KS, database_url, config) as (b, task_b, recorder_b),
    ):
        await recorder_b.wait_for(lambda: any(r.deep for r, _ in recorder_b.syncs))
        await client.srem(KS.index, paths[9])
        assert not await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        # the repair's writes are the other watcher's foreign change: it resyncs once (or twice, both having
        # repaired), then both fall quiet; a loop shows as resyncs in every window (165-252 in one second, once)
        # (a doubt heard within DOUBT_WINDOW_S of the last one has its resync at the window's end)
        started = recorder_a.full_syncs() + recorder_b.full_syncs()
        await asyncio.sleep(1.0 + watcher.DOUBT_WINDOW_S)
        full = recorder_a.full_syncs() + recorder_b.full_syncs()
        assert full - started <= 4, f"{full - started} full resyncs in the seconds after one repair"
        await asyncio.sleep(1.0 + watcher.DOUBT_WINDOW_S)  # dozens of probe rounds
        assert recorder_a.full_syncs() + recorder_b.full_syncs() == full, "the two watchers keep resyncing"
        assert a.state.member_checks + b.state.member_checks >= 1
        assert await client.sdiff(KS.index, KS.expected_index) == set()
        assert await client.hgetall(KS.manifest) == await client.hgetall(KS.expected_manifest)
        assert not task_a.done()
        assert not task_b.done()


async def test_another_writers_changes_cost_a_full_resync_and_the_copies_are_believed_again_after_it(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """A write through ``APPLY`` by another process changes the copies too: it is believed no more than an attacker's
    (a full resync, as every index change cost before); after it the copies agree and are not rewritten, and the
    next member fault is a member check again."""
    paths = await put_some(source, 30)
    async with watching(source, server.url, database_url) as (w, task, recorder):
        other = rediscache.RedisCache.from_url(server.url, keyspace=KS)
        try:
            full = recorder.full_syncs()
            rewritten = [
                rediscache.Write(
                    plan.Item(plan.Operation.REINDEX, p, plan.Reason.INDEX, None, (await source.fetch([p]))[0][p].hash),
                    length=await client.strlen(KS.content(p)),
                )
                for p in paths[:3]
            ]
            applied = await other.apply(rewritten, fence=await other.generation())
            assert len(applied.applied) == 3  # three manifest entries rewritten at a new generation (and copies)
            await recorder.wait_for(lambda: recorder.full_syncs() > full)
            await eventually(lambda: not w._expected_doubted, WITHIN_S)
            full, put_back = recorder.full_syncs(), w.state.manifest_put_back
            await client.hdel(KS.manifest, paths[9])
            assert not await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
            assert recorder.full_syncs() == full
            assert w.state.manifest_put_back > put_back
        finally:
            await other.close()
        assert not task.done()


async def test_a_forged_spare_copy_never_reaches_the_manifest_through_later_put_backs(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """A manifest whose fields someone else changed gets its copy back by RENAME, and the copy is made again from a
    spare one. An attacker who forges the spare first (a fence over one path, an entry for a path that is no module,
    one entry dropped) and then keeps forging manifest fields must never see the spare's forgeries served: the forged
    spare is doubted like a copy, compared field by field after the full resync, and what the put-backs bring back
    is what modcache wrote."""
    paths = await put_some(source, 30)
    async with watching(source, server.url, database_url) as (w, task, recorder):
        full = recorder.full_syncs()
        async with client.pipeline(transaction=True) as pipe:
            pipe.hset(KS.spare_manifest, mapping={paths[2]: FORGED_FENCE, "ghost/never.py": FORGED_FENCE})
            pipe.hdel(KS.spare_manifest, paths[3])  # as many entries as the copy: its size alone tells nothing
            await pipe.execute()
        await recorder.wait_for(lambda: recorder.full_syncs() > full)
        await eventually(lambda: not w._expected_doubted and not w._settling, WITHIN_S)
        for path in paths[5:10]:
            await client.hset(KS.manifest, path, FORGED_FENCE)
            left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
            assert not left, left
        manifest = await client.hgetall(KS.manifest)
        assert FORGED_FENCE not in manifest.values()
        assert "ghost/never.py" not in manifest
        assert manifest == await client.hgetall(KS.expected_manifest) == await client.hgetall(KS.spare_manifest)
        assert not task.done()
