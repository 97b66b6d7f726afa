"""attack-10: the manifest put-back (RENAME of the expected copy, RESPARE from the spare).

Each test failed on the code it was written against (7ae3c17) if the attack worked; the "held" ones passed there.
Left, documented in docs/integrity.md: forged notifications on the copies' channels cost a full resync each (E6,
older than the put-back), and PUBLISHes over the pub/sub output-buffer limit drop every subscriber (each reconnect
a deep resync)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from modcache import keys, pgsource
from modcache import watcher as watcher_module
from testkit import convergence
from testkit.polling import eventually
from testkit.servers import PrivateRedis
from testkit.watching import forged_put_back, put_modules, watching_quick

KS = keys.KeySpace()
WITHIN_S = 2.0
MANIFEST_CHANNEL = f"__keyspace@0__:{KS.manifest}"


def forged(value: str) -> str:
    """The same entry with another content hash (a generation and length modcache could have written)."""
    gen, _, rest = value.partition(":")
    _, _, length = rest.partition(":")
    return f"{gen}:{'f' * 64}:{length}"


async def _fill(source: pgsource.PgSource, server: PrivateRedis, database_url: str, n: int = 30) -> list[str]:
    paths = await put_modules(source, n)
    async with watching_quick(source, server.url, KS, database_url):
        pass
    return paths


# -- E1: a copy forged while nobody listened is put into the manifest --------------------------------------------


@pytest.mark.parametrize("copy", ["expected", "spare"])
async def test_a_copy_forged_while_no_watcher_listened_never_reaches_the_manifest(
    copy: str, server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """The copies are forged (same size: one entry's hash changed) while no watcher runs (a restart, a rollout).
    The new watcher's first (deep) resync settles the copies by size only, so the forgery stays; then a forged
    ``hset`` notification (plain PUBLISH) makes the watcher put the forged copy in the manifest's place."""
    paths = await _fill(source, server, database_url)
    key = KS.expected_manifest if copy == "expected" else KS.spare_manifest
    target = paths[4]
    await client.hset(key, target, forged(await client.hget(key, target)))
    async with watching_quick(source, server.url, KS, database_url) as (w, task, _recorder):
        assert not await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        # forged member events (nothing in the manifest changes): one puts a forged expected copy in the manifest,
        # two a forged spare (the first makes the copy again from it)
        for _ in range(1 if copy == "expected" else 2):
            await forged_put_back(w, client, MANIFEST_CHANNEL)
            await asyncio.sleep(0.1)
        started = time.perf_counter()
        left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        assert not left, f"forged {copy} copy served {time.perf_counter() - started:.1f}s later: {left}"
        assert not task.done()


# -- E2: a copy forged during a gap in the subscription (one oversized PUBLISH drops it) ---------------------------


async def test_a_copy_forged_while_the_subscription_was_dropped_never_reaches_the_manifest(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """One PUBLISH of more than client-output-buffer-limit pubsub (32 MB hard) on the writes channel (the consumer's
    ACL allows it) disconnects every subscriber, the watcher's key events with it. The copy is forged in the gap;
    the reconnect's deep resync settles it by size only, and the next (forged) ``hset`` puts it in the manifest."""
    paths = await put_modules(source, 30)
    async with watching_quick(source, server.url, KS, database_url) as (w, task, recorder):
        target = paths[4]
        entry = await client.hget(KS.expected_manifest, target)
        deep = sum(1 for r, _ in recorder.syncs if r.deep)
        async with client.pipeline(transaction=False) as pipe:
            pipe.publish(KS.writes_channel, "x" * (33 * 1024 * 1024))
            pipe.hset(KS.expected_manifest, target, forged(entry))
            pipe.hset(KS.spare_manifest, target, forged(entry))
            await pipe.execute()
        await recorder.wait_for(lambda: sum(1 for r, _ in recorder.syncs if r.deep) > deep, timeout_s=10)
        await eventually(lambda: not w._expected_doubted and not w._settling, WITHIN_S)
        for _ in range(2):
            await forged_put_back(w, client, MANIFEST_CHANNEL)
        started = time.perf_counter()
        left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        assert not left, f"copy forged in the gap served {time.perf_counter() - started:.1f}s later: {left}"
        assert not task.done()


# -- E4: a TTL on the spare reaches the expected copy and then the manifest ----------------------------------------


async def test_a_ttl_put_on_the_spare_never_reaches_the_manifest(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """PEXPIRE on the spare is heard (a doubt, a full resync), but the settle compares types, sizes and fields, not
    TTLs; RESPARE's COPY carries the TTL into the expected copy, and the next put-back's RENAME into the manifest:
    manifest, copy and spare then expire together (nothing left to put back)."""
    await put_modules(source, 30)
    async with watching_quick(source, server.url, KS, database_url) as (w, task, recorder):
        full = recorder.full_syncs()
        await client.pexpire(KS.spare_manifest, 600_000)
        await recorder.wait_for(lambda: recorder.full_syncs() > full)
        await eventually(lambda: not w._expected_doubted and not w._settling, WITHIN_S)
        for _ in range(2):
            await forged_put_back(w, client, MANIFEST_CHANNEL)
        ttls = {k: await client.pttl(k) for k in (KS.manifest, KS.expected_manifest, KS.spare_manifest)}
        assert await client.pttl(KS.manifest) == -1, f"the TTL reached the manifest: {ttls}"
        assert not task.done()


# -- E5: two watchers and forged hset notifications: every put-back is the other's full resync ---------------------


async def test_forged_hset_notifications_cost_two_watchers_a_bounded_number_of_full_resyncs(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """A put-back writes (UNLINK, RENAME, COPY) whatever it finds, even when nothing changed (a forged ``hset``); a
    second watcher of the cache cannot tell those writes from an attacker's: its copies are doubted and it resyncs in
    full. 30 forged notifications cost 64-66 full resyncs; put-backs are now a burst per window (then member checks,
    which write nothing when nothing differs), so a flood costs a bounded number."""
    await put_modules(source, 30)
    async with (
        watching_quick(source, server.url, KS, database_url) as (a, task_a, rec_a),
        watching_quick(source, server.url, KS, database_url) as (b, task_b, rec_b),
    ):
        await asyncio.sleep(1.0)
        full = rec_a.full_syncs() + rec_b.full_syncs()
        puts_before = a.state.manifest_put_back + b.state.manifest_put_back
        ends = time.monotonic() + 3.0
        sent = 0
        while time.monotonic() < ends:
            await client.publish(MANIFEST_CHANNEL, "hset")
            sent += 1
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        storm = rec_a.full_syncs() + rec_b.full_syncs() - full
        puts = a.state.manifest_put_back + b.state.manifest_put_back - puts_before
        # a put-back writes: the other watcher doubts its copies (a full resync or three: the writes come in two
        # scripts); beyond the burst each watcher answers with member checks, which write nothing here
        assert puts <= 2 * watcher_module.PUT_BACK_BURST, f"{sent} forged hset notifications: {puts} put-backs"
        assert storm <= 3 * puts + 2, f"{sent} forged hset notifications: {storm} full resyncs, {puts} put-backs"
        assert not task_a.done()
        assert not task_b.done()


async def test_a_ttl_put_on_the_spare_does_not_take_manifest_and_copies_at_once(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """E3 carried to its end: the TTL expires and takes the manifest with both copies (nothing to put back): the
    manifest is rebuilt from the keys' claims by a full resync, then a deep one."""
    await put_modules(source, 300)
    async with watching_quick(source, server.url, KS, database_url) as (w, task, recorder):
        full = recorder.full_syncs()
        await client.pexpire(KS.spare_manifest, 3_000)
        await recorder.wait_for(lambda: recorder.full_syncs() > full)
        await eventually(lambda: not w._expected_doubted and not w._settling, WITHIN_S)
        for _ in range(2):
            await forged_put_back(w, client, MANIFEST_CHANNEL)
        restored = w.state.copies_restored
        gone_at = None
        for _ in range(400):
            if not await client.exists(KS.manifest):
                gone_at = time.perf_counter()
                break
            await asyncio.sleep(0.01)
        types = [await client.type(k) for k in (KS.manifest, KS.expected_manifest, KS.spare_manifest)]
        left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        back_s = time.perf_counter() - (gone_at or 0)
        assert gone_at is None, (
            f"manifest expired with its copies ({types}; restored from a copy: {w.state.copies_restored - restored});"
            f" converged {back_s:.2f}s later: {not left}; claims rebuild + deep: {recorder.full_syncs() - full} fulls"
        )
        assert not task.done()


async def test_held_one_forged_hset_with_two_watchers_settles(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """E4 with a single forged notification: how many full resyncs and put-backs, and quiet afterwards?"""
    await put_modules(source, 30)
    async with (
        watching_quick(source, server.url, KS, database_url) as (a, task_a, rec_a),
        watching_quick(source, server.url, KS, database_url) as (b, task_b, rec_b),
    ):
        await asyncio.sleep(1.0)
        full = rec_a.full_syncs() + rec_b.full_syncs()
        puts = a.state.manifest_put_back + b.state.manifest_put_back
        await client.publish(MANIFEST_CHANNEL, "hset")
        await asyncio.sleep(1.5 + watcher_module.DOUBT_WINDOW_S)  # a doubt's resync may be owed to the window's end
        mid = rec_a.full_syncs() + rec_b.full_syncs()
        await asyncio.sleep(1.5 + watcher_module.DOUBT_WINDOW_S)
        end = rec_a.full_syncs() + rec_b.full_syncs()
        p = a.state.manifest_put_back + b.state.manifest_put_back - puts
        assert end == mid, f"one forged hset: {mid - full} fulls, then {end - mid}; {p} put-backs"
        assert not task_a.done()
        assert not task_b.done()


class _OldKeySpace(keys.KeySpace):
    """What a modcache from before the spare writes: its APPLY names no spare (here: a key nobody reads)."""

    @property
    def spare_manifest(self) -> str:
        return f"{self.prefix}modcache:old-version-wrote-no-spare"


async def test_a_spare_left_stale_by_a_rollback_never_reaches_the_manifest(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """No attacker: this version ran (the spare exists), was rolled back to one that keeps no spare (its APPLYs update
    manifest and expected copy, the spare keeps the old entries: same size), then rolled forward again. The new
    watcher's first resync settles the copies by size only; the first two manifest member events (a forged PUBLISH
    here, any foreign HSET/HDEL in practice) put the stale entries in the manifest: the consumer then refuses those
    modules (the entry no longer names the value's hash)."""
    from modcache import engine, rediscache

    paths = await _fill(source, server, database_url)
    for path in paths[:5]:
        await source.put_module(path, b"CHANGED = 1\n")
    old = rediscache.RedisCache.from_url(server.url, keyspace=_OldKeySpace())
    try:
        report = await engine.Engine(source=source, cache=old).full_resync()
        assert len(report.plan.items) >= 5
    finally:
        await old.close()
    assert not await convergence.converged(database_url, client, KS.prefix, within_s=0.2)
    async with watching_quick(source, server.url, KS, database_url) as (w, task, _recorder):
        assert not await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        for _ in range(2):
            await forged_put_back(w, client, MANIFEST_CHANNEL)
        left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        assert not left, f"stale spare served: {left}"
        assert not task.done()


async def test_held_updates_racing_put_backs_are_not_lost(
    server: PrivateRedis,
    client: aioredis.Redis,
    source: pgsource.PgSource,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """APPLYs (module updates through NOTIFY) racing put-backs (a flood of forged hset) and RENAME/RESPARE windows:
    nothing modcache wrote is lost, and the copies end equal to the manifest (put-backs unbounded here, to race)."""
    monkeypatch.setattr(watcher_module, "PUT_BACK_BURST", 1_000_000)
    paths = await put_modules(source, 60)
    async with watching_quick(source, server.url, KS, database_url) as (w, task, _recorder):
        stop = time.monotonic() + 3.0

        async def flood() -> None:
            while time.monotonic() < stop:
                await client.publish(MANIFEST_CHANNEL, "hset")
                await asyncio.sleep(0.003)

        put_back = w.state.manifest_put_back
        flooding = asyncio.create_task(flood())
        n = 0
        while time.monotonic() < stop:
            n += 1
            await source.put_module(paths[n % len(paths)], f"V = {n}\n".encode())
            await asyncio.sleep(0.01)
        await flooding
        left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        put_backs = w.state.manifest_put_back - put_back
        assert put_backs > 20, put_backs
        assert not left, f"{n} updates, {put_backs} put-backs: {left}"
        manifest = await client.hgetall(KS.manifest)
        assert manifest == await client.hgetall(KS.expected_manifest) == await client.hgetall(KS.spare_manifest)
        assert not task.done()
