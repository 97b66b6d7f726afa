"""Failure mode 4 (check-then-write race) and overlapping writers: an older read never overwrites a newer write."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import redis.asyncio as aioredis

from modcache import engine, modules, pgsource, plan, rediscache


async def cached_content(client: aioredis.Redis, cache: rediscache.RedisCache, path: str) -> str:
    return str(json.loads(await client.get(cache.keyspace.content(path)))["content"])


async def test_stale_write_from_an_older_read_is_fenced_out(
    source: pgsource.PgSource, cache: rediscache.RedisCache, sync_engine: engine.Engine, redis_client: aioredis.Redis
) -> None:
    """The exact race: read v1, meanwhile v2 is committed and written, then the v1 write arrives."""
    await source.put_module("r.py", b"V = 1\n")
    fence = await cache.generation()  # a sync starts: fence first, then the source read
    found, _ = await source.fetch(["r.py"])
    v1 = found["r.py"]
    await source.put_module("r.py", b"V = 2\n")  # committed while the sync runs...
    await sync_engine.apply_paths(["r.py"])  # ...and applied by the NOTIFY path
    stale = plan.Item(plan.Operation.PUT, "r.py", plan.Reason.MISSING, None, v1.hash)
    result = await cache.apply(
        [rediscache.Write(stale, modules.encode_cached("r.py", v1.content, v1.hash))], fence=fence
    )
    assert result.conflicted == (stale,)
    assert await cached_content(redis_client, cache, "r.py") == "V = 2\n"


class PausingCache(rediscache.RedisCache):
    """Our own seam: the first apply waits until the test has raced a newer write in."""

    def __init__(self, *, inner: rediscache.RedisCache, race: asyncio.Event, go: asyncio.Event) -> None:
        super().__init__(client=inner.client, keyspace=inner.keyspace)
        self.race, self.go = race, go

    async def apply(self, writes: Sequence[rediscache.Write], *, fence: int) -> rediscache.Applied:
        if not self.go.is_set():
            self.race.set()
            await self.go.wait()
        return await super().apply(writes, fence=fence)


async def test_full_resync_never_overwrites_a_change_committed_while_it_ran(
    source: pgsource.PgSource, cache: rediscache.RedisCache, redis_client: aioredis.Redis
) -> None:
    await source.put_module("r.py", b"V = 1\n")
    race, go = asyncio.Event(), asyncio.Event()
    slow = engine.Engine(source=source, cache=PausingCache(inner=cache, race=race, go=go))
    resync = asyncio.create_task(slow.full_resync())
    await race.wait()  # the resync has planned and read v1 and is about to write it
    await source.put_module("r.py", b"V = 2\n")
    await engine.Engine(source=source, cache=cache).apply_paths(["r.py"])
    go.set()
    report = await resync
    assert report.superseded == 1
    assert await cached_content(redis_client, cache, "r.py") == "V = 2\n"


async def test_two_overlapping_writers_converge_to_the_last_commit(
    source: pgsource.PgSource, cache: rediscache.RedisCache, redis_client: aioredis.Redis
) -> None:
    """Two replicas' engines resyncing at once while the source keeps changing (the operator's HA case)."""
    paths = [f"hot/m{n}.py" for n in range(30)]
    a = engine.Engine(source=source, cache=cache, fetch_batch_size=4)
    b = engine.Engine(source=source, cache=cache, fetch_batch_size=5)

    async def writer() -> None:
        for version in range(1, 16):
            for path in paths:
                await source.put_module(path, f"V = {version}\n".encode())
            await asyncio.sleep(0)

    async def syncer(e: engine.Engine) -> None:
        for _ in range(15):
            await e.full_resync()
            await e.apply_paths(paths)

    await asyncio.gather(writer(), syncer(a), syncer(b))
    await a.apply_paths(paths)  # what the writer's last NOTIFYs would trigger
    assert not (await b.full_resync(dry_run=True)).plan
    assert {await cached_content(redis_client, cache, p) for p in paths} == {"V = 15\n"}
