"""A resync that finds nothing to do writes nothing: Redis's own write counters stay at zero (the status record is
rewritten only when what it says changes). Judged by Redis's command counts, not by the plan."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from modcache import engine, keys, pgsource, rediscache
from testkit.servers import PrivateRedis, private_redis

KS = keys.KeySpace()


@pytest.fixture
def server() -> AsyncIterator[PrivateRedis]:  # type: ignore[misc]
    with private_redis() as redis_server:
        yield redis_server


async def put_some(source: pgsource.PgSource, n: int) -> list[str]:
    paths = [f"pkg/m{i}.py" for i in range(n)]
    for i, path in enumerate(paths):
        await source.put_module(path, f"N = {i}\n".encode())
    return paths


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
