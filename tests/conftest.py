"""Fixtures shared by every test: the real services, isolated per test.

* PostgreSQL: one migrated template database per session; each test gets its own copy (so NOTIFY channels,
  triggers and rows never cross tests).
* Redis: each test gets its own key prefix, removed afterwards.
* RabbitMQ: each test that asks gets its own vhost (see tests/consumer/conftest.py).

Service URLs come from ``MODCACHE_TEST_*`` variables (defaults: this machine's services); ``modcache.embedded``
starts what is missing, or says exactly what to install.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping

import pytest
import redis.asyncio as aioredis

from modcache import db, embedded, engine, keys, pgsource, rediscache
from testkit import databases
from testkit.servers import PrivateRedis, private_redis


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mapping[str, str]]:
    """URLs of PostgreSQL (admin database), Redis and RabbitMQ; starts embedded servers for what is down."""
    with embedded.test_services(tmp_path_factory.mktemp("services")) as urls:
        yield urls


@pytest.fixture(scope="session")
def pg_template(services: Mapping[str, str]) -> Iterator[str]:
    """A database migrated once per session, copied for each test."""
    name = f"modcache_tpl_{uuid.uuid4().hex[:8]}"
    admin = services["postgres"]

    async def create() -> None:
        await databases.execute(admin, f'CREATE DATABASE "{name}"')
        await db.upgrade(databases.with_db(admin, name))

    asyncio.run(create())
    yield name
    asyncio.run(databases.drop(admin, name))


@pytest.fixture
async def database_url(services: Mapping[str, str], pg_template: str) -> AsyncIterator[str]:
    """A fresh, migrated database of this test's own (URL without driver suffix)."""
    async with databases.copy_of(services["postgres"], pg_template) as url:
        yield url


@pytest.fixture
def redis_url(services: Mapping[str, str]) -> str:
    return services["redis"]


@pytest.fixture
async def keyspace(redis_url: str) -> AsyncIterator[keys.KeySpace]:
    """A key prefix of this test's own, shaped like Bifrost's; its keys are deleted afterwards."""
    scope = f"t{uuid.uuid4().hex[:10]}:"
    yield keys.KeySpace(f"{scope}{keys.DEFAULT_PREFIX}")
    client = aioredis.Redis.from_url(redis_url)
    try:
        doomed = [k async for k in client.scan_iter(match=f"{scope}*", count=10_000)]
        if doomed:
            await client.delete(*doomed)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def source(database_url: str) -> AsyncIterator[pgsource.PgSource]:
    src = pgsource.PgSource(engine=db.make_engine(database_url), max_module_bytes=64 * 1024)
    yield src
    await src.close()


@pytest.fixture
async def cache(redis_url: str, keyspace: keys.KeySpace) -> AsyncIterator[rediscache.RedisCache]:
    c = rediscache.RedisCache.from_url(redis_url, keyspace=keyspace, check_batch_size=100)
    yield c
    await c.close()


@pytest.fixture
def sync_engine(source: pgsource.PgSource, cache: rediscache.RedisCache) -> engine.Engine:
    return engine.Engine(source=source, cache=cache, fetch_batch_size=7)


@pytest.fixture(autouse=True)
async def _no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running behind it."""
    yield
    current = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    for _ in range(3):  # give cancelled tasks a few loop turns to finish
        if not leaked:
            break
        await asyncio.sleep(0)
        leaked = [t for t in leaked if not t.done()]
    assert not leaked, f"tasks left running: {leaked}"


@pytest.fixture
def server() -> Iterator[PrivateRedis]:
    """A private redis-server of the test's own (fault tests FLUSHDB, CONFIG SET and kill it; never the shared one)."""
    with private_redis() as redis_server:
        yield redis_server


@pytest.fixture
async def client(server: PrivateRedis) -> AsyncIterator[aioredis.Redis]:
    """A plain client of ``server`` (the attacker's, or the judge's)."""
    c = aioredis.Redis.from_url(server.url, decode_responses=True)
    yield c
    await c.aclose()
