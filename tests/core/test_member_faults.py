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

from modcache import keys, pgsource, settings, watcher
from testkit import convergence
from testkit.observers import Recorder
from testkit.servers import PrivateRedis, private_redis
from testkit.watching import watching_source

KS = keys.KeySpace()
WITHIN_S = 2.0
PROBES = f"{KS.prefix}modcache:probe:*"


@pytest.fixture
def server() -> AsyncIterator[PrivateRedis]:  # type: ignore[misc]
    with private_redis() as redis_server:
        yield redis_server


@pytest.fixture
async def client(server: PrivateRedis) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(server.url, decode_responses=True)
    yield c
    await c.aclose()


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
