"""The consumer under the Redis ACL user docs/integrity.md documents for it (created exactly as written): every
Redis path the consumer takes before and during an execution -- the readiness check that converges an empty cache,
module lookups, a namespace package, a repair of a deleted module, the organization and config cache -- works, and
Redis refused nothing it tried (its ACL log stays empty). Neither of the other two users let it run (attack-9d F9)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from modcache import engine, keys, pgsource, rediscache
from modcache_consumer import configs, crypto, database, readiness, serving
from testkit import acl
from testkit.servers import PrivateRedis

KS = keys.KeySpace()


@pytest.fixture
async def admin(server: PrivateRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    await acl.create_documented_users(client)
    yield client
    await client.aclose()


async def test_the_documented_consumer_user_runs_every_redis_path_of_the_consumer(
    server: PrivateRedis, admin: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    await source.put_module("pkg/sub/a.py", b"A = 1\n")
    await source.put_module("pkg/b.py", b"B = 2\n")
    cache = rediscache.RedisCache.from_url(acl.url_of(server.port, "consumer"), keyspace=KS)
    guard = readiness.CacheGuard(engine=engine.Engine(source=source, cache=cache), cache=cache)
    db = database.Database(url=database_url, pool_size=2, application_name="modcache-test")
    try:
        generation = await guard.check()  # an empty cache: converged first, as before an execution
        modules = serving.ModuleServer(client=cache.client, keyspace=KS, repair=guard.repair)
        _, entries = await modules.lookup(["pkg/sub/a.py", "pkg/b.py"])
        assert [e["content"] for e in entries] == ["A = 1\n", "B = 2\n"]
        assert await modules.is_directory("pkg/sub", generation)  # a namespace package
        await admin.delete(KS.content("pkg/b.py"))
        await modules.repair(["pkg/b.py"])
        _, entries = await modules.lookup(["pkg/b.py"])
        assert entries[0]["content"] == "B = 2\n"
        resolver = configs.ConfigResolver(database=db, client=cache.client, secrets=crypto.Secrets([]))
        for _ in range(2):  # read through the cache, filled after the first
            assert await resolver.load_config_for_scope(configs.GLOBAL) == {}
        await guard.check_with(resolver.cache_keys(configs.GLOBAL, None))
    finally:
        await guard.close()
        await db.close()
        await cache.close()
    refused = [(e["object"], e["reason"]) for e in await admin.acl_log()]
    assert refused == [], refused
