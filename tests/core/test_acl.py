"""The Redis ACL users documented in docs/integrity.md, created on a private redis-server exactly as documented:
the writer can run a full sync, watch mode and its repairs with only those permissions (with and without CONFIG),
and the read-only reader can import through Bifrost's layout but write nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from modcache import engine, keys, pgsource, rediscache, settings, watcher
from testkit import acl, convergence
from testkit.acl import create_documented_users, documented_users
from testkit.observers import Recorder, running
from testkit.servers import PrivateRedis

KS = keys.KeySpace()
WITHIN_S = 5.0


@pytest.fixture
async def admin(server: PrivateRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    await create_documented_users(client)
    yield client
    await client.aclose()


def url_of(server: PrivateRedis, user: str) -> str:
    return acl.url_of(server.port, user)


async def fill(source: pgsource.PgSource, n: int = 5) -> list[str]:
    paths = [f"pkg/m{i}.py" for i in range(n)]
    for i, path in enumerate(paths):
        await source.put_module(path, f"N = {i}\n".encode())
    return paths


def test_the_doc_names_a_writer_and_a_reader() -> None:
    users = documented_users()
    assert set(users) == {"modcache", "worker", "consumer"}
    assert "+config|set" in users["modcache"]


@pytest.mark.parametrize("config", [True, False], ids=["CONFIG permitted", "CONFIG denied"])
async def test_the_documented_writer_syncs_watches_and_repairs(
    config: bool, server: PrivateRedis, admin: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    if not config:  # the optional part taken away: the admin configures the events instead
        await admin.execute_command("ACL", "SETUSER", "modcache", "-config|get", "-config|set")
        await admin.config_set("notify-keyspace-events", "KEA")
    paths = await fill(source)
    cache = rediscache.RedisCache.from_url(url_of(server, "modcache"), keyspace=KS)
    recorder = Recorder()
    w = watcher.Watcher(
        engine=engine.Engine(source=source, cache=cache),
        settings=settings.Settings(resync_interval_s=3600, listener_backoff_max_s=0.2),
        listen_dsn=database_url,
        observer=recorder,
    )
    try:
        report = await w.engine.full_resync(deep=True)
        assert report.applied[report.plan.items[0].reason] == len(paths)
        async with running(w):
            await recorder.wait_for(lambda: recorder.full_syncs() and w.state.keyspace_active)
            detail = recorder.keyspace[-1][1]
            assert ("configured by the admin (CONFIG not permitted" in detail) is not config, detail
            await admin.delete(KS.content(paths[0]))
            await admin.set(KS.content(paths[1]), "garbage")
            await admin.srem(KS.index, paths[2])
            await admin.flushdb()
            assert await convergence.converged(database_url, admin, KS.prefix, within_s=WITHIN_S) == []
            # every other kind of fault, each repaired by its own path (a command that path needs and the ACL
            # lacks shows in the ACL log, even where a script's pcall would hide it)
            await admin.hset(KS.manifest, paths[3], "99999999999999999:" + "0" * 64 + ":1")
            await admin.hdel(KS.manifest, paths[4])
            await admin.setrange(KS.content(paths[0]), 5, "#")
            await admin.rename(KS.content(paths[1]), KS.content(paths[2]))
            await admin.set(KS.generation, "abc")
            await admin.delete(KS.index)
            assert await convergence.converged(database_url, admin, KS.prefix, within_s=WITHIN_S) == []
            await admin.delete(*KS.expected(), KS.manifest)  # no copy to put back: rebuilt from the keys' claims
            assert await convergence.converged(database_url, admin, KS.prefix, within_s=WITHIN_S) == []
        assert not recorder.failures, recorder.failures
        refused = {entry["object"] for entry in await admin.acl_log()}
        assert refused == (set() if config else {"config|get"})  # nothing else the writer tried was refused
    finally:
        await cache.close()


async def test_the_documented_reader_reads_bifrosts_layout_and_cannot_write(
    server: PrivateRedis, admin: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    paths = await fill(source)
    cache = rediscache.RedisCache.from_url(url_of(server, "modcache"), keyspace=KS)
    try:
        await engine.Engine(source=source, cache=cache).full_resync()
    finally:
        await cache.close()
    reader = aioredis.Redis.from_url(url_of(server, "worker"), decode_responses=True)
    try:
        members = await reader.smembers(KS.index)  # what a Bifrost worker does: the index, then each module
        assert members == set(paths)
        values = await reader.mget([KS.content(p) for p in sorted(members)])
        assert [json.loads(v)["path"] for v in values] == sorted(members)
        assert await reader.hmget(KS.manifest, paths[:2]) != [None, None]
        for attempt in (
            reader.set(KS.content(paths[0]), "x"),
            reader.delete(KS.content(paths[0])),
            reader.sadd(KS.index, "evil.py"),
            reader.get("other:key"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                await attempt
    finally:
        await reader.aclose()
