"""The index or the manifest replaced as a whole by someone else (DEL, UNLINK, RENAME away or onto it, EXPIRE, another
type, a SUNIONSTORE over it), against a running watcher, with plain Redis commands as an attacker would. Each cost a
full resync that rewrote every index member or rebuilt the manifest from the keys' claims then compared every value:
2.2 s and 4.3 s at 100,000 modules (docs/benchmarks.md). The expected copy the watcher keeps beside the key is put
back at once; the full resync that follows finds nothing left to do. A copy the attacker touched first is not
believed: the full resync rebuilds the key as before. Judged by ``testkit.convergence`` (rows and keys compared
directly)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from modcache import keys, pgsource
from testkit import convergence
from testkit.servers import PrivateRedis
from testkit.watching import put_modules, watching_quick

KS = keys.KeySpace()
WITHIN_S = 2.0
Attack = Callable[[aioredis.Redis], Awaitable[object]]


async def _sunionstore(c: aioredis.Redis) -> object:
    await c.sadd("theirs", "ghost/never.py", "modcache:generation")
    return await c.sunionstore(KS.index, ["theirs"])


async def _renamed_onto(c: aioredis.Redis, key: str) -> object:
    await c.hset("theirs", "pkg/m1.py", "99999999999999999:" + "0" * 64 + ":1") if key == KS.manifest else None
    await c.sadd("theirs", "ghost/never.py") if key == KS.index else None
    return await c.rename("theirs", key)


WHOLE_KEY_ATTACKS: dict[str, Attack] = {
    "DEL of the index": lambda c: c.delete(KS.index),
    "UNLINK of the index": lambda c: c.unlink(KS.index),
    "RENAME of the index away": lambda c: c.rename(KS.index, "elsewhere"),
    "RENAME of another set onto the index": lambda c: _renamed_onto(c, KS.index),
    "SUNIONSTORE over the index": _sunionstore,
    "SET of a string at the index": lambda c: c.set(KS.index, "x"),
    "PEXPIRE of the index, expired": lambda c: c.pexpire(KS.index, 1),
    "EXPIRE of the index, not yet expired": lambda c: c.expire(KS.index, 3),
    "DEL of the manifest": lambda c: c.delete(KS.manifest),
    "RENAME of the manifest away": lambda c: c.rename(KS.manifest, "elsewhere"),
    "RENAME of a forged hash onto the manifest": lambda c: _renamed_onto(c, KS.manifest),
    "PEXPIRE of the manifest, expired": lambda c: c.pexpire(KS.manifest, 1),
    "DEL of the index and the manifest together": lambda c: c.delete(KS.index, KS.manifest),
}


@pytest.mark.parametrize("attack", list(WHOLE_KEY_ATTACKS))
async def test_an_index_or_manifest_replaced_by_someone_else_is_put_back_and_the_full_resync_finds_nothing(
    attack: str, server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    await put_modules(source, 40)
    async with watching_quick(source, server.url, KS, database_url) as (w, task, recorder):
        full, restored, before = recorder.full_syncs(), w.state.copies_restored, len(recorder.syncs)
        renamed_away = "away" in attack
        await WHOLE_KEY_ATTACKS[attack](client)
        started = time.perf_counter()
        left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        assert not left, f"{attack}: not repaired in {time.perf_counter() - started:.1f} s: {left}"
        assert w.state.copies_restored > restored, f"{attack}: not put back from the copy"
        await recorder.wait_for(lambda: recorder.full_syncs() > full)  # the full resync that checks what came back
        after = [r for r, _ in recorder.syncs[before:] if r.full]
        assert all(not r.plan for r in after), [r.plan.describe() for r in after]
        assert not any(r.claimed for r in after), f"{attack}: rebuilt from the keys' claims"
        assert await client.ttl(KS.index) == -1
        assert await client.ttl(KS.manifest) == -1
        if renamed_away:  # a key of someone else's is theirs, whatever it holds
            assert await client.exists("elsewhere") == 1
        assert not task.done()


async def test_a_copy_the_attacker_wrote_first_is_not_put_back(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """The attacker forges the expected copy (a member that is no module, a name that is not a path, a module taken
    out), then deletes the index in the same transaction: the copy is not believed, the full resync rebuilds the
    index from the source, and no forged member is ever served."""
    paths = await put_modules(source, 40)
    async with watching_quick(source, server.url, KS, database_url) as (w, task, recorder):
        full, restored = recorder.full_syncs(), w.state.copies_restored
        async with client.pipeline(transaction=True) as pipe:
            pipe.sadd(KS.expected_index, "ghost/never.py", "modcache:generation")
            pipe.srem(KS.expected_index, paths[3])
            pipe.delete(KS.index)
            await pipe.execute()
        left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        assert not left, left
        assert w.state.copies_restored == restored
        assert recorder.full_syncs() > full
        assert await client.exists("modcache:generation") == 0
        assert not task.done()


async def test_a_copy_forged_right_after_the_delete_is_undone_by_the_full_resync(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """The other order, raced: the index deleted, then the copy forged while the watcher is putting it back. Whatever
    the copy held when it was put back, the full resync that follows converges the index to the source, and the
    copies are rebuilt."""
    paths = await put_modules(source, 40)
    async with watching_quick(source, server.url, KS, database_url) as (w, task, recorder):
        full = recorder.full_syncs()
        await client.delete(KS.index)
        await client.sadd(KS.expected_index, "ghost/never.py")
        await client.srem(KS.expected_index, paths[5], paths[6])
        await recorder.wait_for(lambda: recorder.full_syncs() > full)
        left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        assert not left, left
        assert not await client.sismember(KS.index, "ghost/never.py")
        await recorder.wait_for(lambda: not w._expected_doubted)
        assert await client.sdiff(KS.index, KS.expected_index) == set()
        assert await client.sdiff(KS.expected_index, KS.index) == set()
        assert not task.done()


async def test_an_index_deleted_again_and_again_is_put_back_each_time_without_a_loop(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """An attacker deleting the index in a tight loop: each delete is put back, nothing else is written, and when
    the attacker stops the cache is whole and the watcher falls quiet (its own writes cause no repair)."""
    await put_modules(source, 40)
    async with watching_quick(source, server.url, KS, database_url) as (w, task, recorder):
        for _ in range(50):
            await client.delete(KS.index)
            await asyncio.sleep(0)
        left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        assert not left, left
        quiet = False
        for _ in range(5):  # the resyncs the attack owed end; a loop (twenty probe rounds a second) never falls quiet
            before = recorder.full_syncs(), w.state.copies_restored
            await asyncio.sleep(1.0)
            if (recorder.full_syncs(), w.state.copies_restored) == before:
                quiet = True
                break
        assert quiet, "the watcher kept resyncing or restoring: its own writes came back as foreign changes"
        assert not task.done()
