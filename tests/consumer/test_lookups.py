"""Workflow and config lookups with and without a caller's session; the Redis config cache with TTL, org
override, invalidation, secrets encrypted at rest, and no cache fill from a rolled-back transaction."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.asyncio.retry
import redis.backoff
import sqlalchemy as sa
from cryptography import fernet

from modcache import errors, keys
from modcache_consumer import configs, crypto, database, serving, workflows

KEY = fernet.Fernet.generate_key().decode()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[database.Database]:
    the_db = database.Database(url=database_url, pool_size=3, application_name="t-lookups")
    yield the_db
    await the_db.close()


@pytest.fixture
def namespace(keyspace: keys.KeySpace) -> str:
    return keyspace.prefix.removesuffix(keys.DEFAULT_PREFIX)


@pytest.fixture
def resolver(db: database.Database, redis_client: aioredis.Redis, namespace: str) -> configs.ConfigResolver:
    return configs.ConfigResolver(
        database=db, client=redis_client, secrets=crypto.Secrets([KEY]), ttl_s=60, namespace=namespace
    )


async def sql(database_url: str, query: str, *args: object) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(query, *args)
    finally:
        await conn.close()


# -- get_workflow_for_execution ----------------------------------------------------------------------------


async def test_workflow_lookup_uses_the_given_session_and_opens_its_own_without(db: database.Database) -> None:
    store = workflows.Workflows(database=db)
    async with db.session() as session:
        insert = sa.text(
            "INSERT INTO workflows (name, function_name, code) VALUES ('draft', 'run', 'def run(): pass') RETURNING id"
        )
        workflow_id = (await session.execute(insert)).scalar_one()
        found = await store.get_workflow_for_execution(workflow_id, db=session)  # sees its own uncommitted row
        assert (found.name, found.function_name, found.timeout_seconds) == ("draft", "run", 1800)
        with pytest.raises(workflows.WorkflowNotFound):  # its own session cannot see it yet
            await store.get_workflow_for_execution(workflow_id)
    assert (await store.get_workflow_for_execution(str(workflow_id))).id == workflow_id


async def test_inactive_unknown_and_malformed_workflows_are_not_found(db: database.Database, database_url: str) -> None:
    store = workflows.Workflows(database=db)
    workflow_id = await store.put("old", "def run(): pass", function_name="run")
    await sql(database_url, "UPDATE workflows SET is_active = false WHERE id = $1", workflow_id)
    for missing in (workflow_id, uuid.uuid4(), "not-a-uuid"):
        with pytest.raises(workflows.WorkflowNotFound):
            await store.get_workflow_for_execution(missing)


async def test_putting_a_workflow_again_updates_it_in_place(db: database.Database) -> None:
    store = workflows.Workflows(database=db)
    first = await store.put("billing", "def run(): return 1", function_name="run")
    second = await store.put("billing", "def main(): return 2", function_name="main", timeout_seconds=5)
    assert first == second
    found = await store.get_workflow_for_execution(first)
    assert (found.code, found.function_name, found.timeout_seconds) == ("def main(): return 2", "main", 5)
    assert [w.name for w in await store.list()] == ["billing"]


# -- get_organization ---------------------------------------------------------------------------------------


async def test_organization_lookup_with_and_without_a_session_then_from_the_cache(
    db: database.Database, resolver: configs.ConfigResolver, redis_client: aioredis.Redis, namespace: str
) -> None:
    async with db.session() as session:
        insert = sa.text("INSERT INTO organizations (name, domain) VALUES ('Acme', 'acme.test') RETURNING id")
        org_id = (await session.execute(insert)).scalar_one()
        assert (await resolver.get_organization(f"ORG:{org_id}", db=session)).name == "Acme"
        assert await resolver.get_organization(org_id) is None  # own session: not committed yet
    cache_key = keys.org_cache_key(str(org_id), namespace)
    assert json.loads(await redis_client.get(cache_key))["name"] == "Acme"  # filled after the commit
    assert 0 < await redis_client.ttl(cache_key) <= 60
    await redis_client.set(cache_key, json.dumps({"id": str(org_id), "name": "Cached", "is_active": True}))
    assert (await resolver.get_organization(str(org_id))).name == "Cached"  # a hit never asks PostgreSQL
    assert await resolver.get_organization("ORG:not-a-uuid") is None
    await redis_client.set(cache_key, '{"id": "not a uuid"}')  # unreadable entry: a miss, never an error
    assert (await resolver.get_organization(str(org_id))).name == "Acme"


# -- load_config_for_scope --------------------------------------------------------------------------------


async def test_org_configs_override_global_ones(resolver: configs.ConfigResolver) -> None:
    org = await resolver.put_organization("Acme")
    other = await resolver.put_organization("Other")
    await resolver.set_config("region", "eu", organization_id=None)
    await resolver.set_config("retries", 3, config_type="int")
    await resolver.set_config("region", "us", organization_id=org)
    assert await resolver.load_config_for_scope(f"ORG:{org}") == {
        "region": {"value": "us", "type": "string"},
        "retries": {"value": 3, "type": "int"},
    }
    assert (await resolver.load_config_for_scope(str(other)))["region"]["value"] == "eu"
    assert (await resolver.load_config_for_scope("GLOBAL"))["region"]["value"] == "eu"


async def test_config_cache_hit_miss_and_invalidation(
    resolver: configs.ConfigResolver, redis_client: aioredis.Redis, database_url: str, namespace: str
) -> None:
    await resolver.set_config("region", "eu")
    assert (await resolver.load_config_for_scope("GLOBAL"))["region"]["value"] == "eu"  # miss: filled
    cache_key = keys.config_cache_key("GLOBAL", namespace)
    assert 0 < await redis_client.ttl(cache_key) <= 60
    await sql(database_url, """UPDATE configs SET value = '{"value": "behind-the-back"}'""")
    assert (await resolver.load_config_for_scope("GLOBAL"))["region"]["value"] == "eu"  # hit: from Redis
    await redis_client.delete(cache_key)  # as if the TTL ran out
    assert (await resolver.load_config_for_scope("GLOBAL"))["region"]["value"] == "behind-the-back"
    await resolver.set_config("region", "ap")  # a write through the resolver invalidates at once
    assert (await resolver.load_config_for_scope("GLOBAL"))["region"]["value"] == "ap"


async def test_a_rolled_back_read_never_fills_the_cache(
    db: database.Database, resolver: configs.ConfigResolver, redis_client: aioredis.Redis, namespace: str
) -> None:
    seen: dict[str, configs.RawConfigValue] = {}

    async def abandoned_unit() -> None:
        async with db.session() as session:
            await resolver.set_config("draft", "uncommitted", db=session)
            seen.update(await resolver.load_config_for_scope("GLOBAL", db=session))
            raise LookupError("roll back")

    with pytest.raises(LookupError):
        await abandoned_unit()
    assert "draft" in seen  # the session saw its own write...
    assert await redis_client.get(keys.config_cache_key("GLOBAL", namespace)) is None  # ...the cache never did
    assert await resolver.load_config_for_scope("GLOBAL") == {}


async def test_secret_configs_are_encrypted_in_the_database_and_the_cache(
    resolver: configs.ConfigResolver, redis_client: aioredis.Redis, database_url: str, namespace: str
) -> None:
    await resolver.set_config("api_key", "hunter2", config_type="secret")
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval("SELECT value::text FROM configs WHERE key = 'api_key'")
    finally:
        await conn.close()
    assert "hunter2" not in stored
    loaded = await resolver.load_config_for_scope("GLOBAL")
    assert loaded["api_key"]["type"] == "secret"
    assert "hunter2" not in loaded["api_key"]["value"]
    assert "hunter2" not in await redis_client.get(keys.config_cache_key("GLOBAL", namespace))
    withheld = serving.withhold_secrets(loaded)  # what an execution receives in its job
    assert withheld["api_key"] == {"type": "secret"}
    cache = serving.ModuleServer(client=redis_client, keyspace=keys.KeySpace("unused:"), repair=_no_repair)
    session = serving.Session(modules=cache, config=loaded, secrets=crypto.Secrets([KEY]))
    assert await session.answer({"op": "secret", "key": "api_key"}) == {"op": "answer", "value": "hunter2"}
    wrong = serving.Session(
        modules=cache, config=loaded, secrets=crypto.Secrets([fernet.Fernet.generate_key().decode()])
    )
    answer = await wrong.answer({"op": "secret", "key": "api_key"})
    assert answer["error"] == "cannot decrypt config 'api_key': wrong or retired key"
    assert (await session.answer({"op": "secret", "key": "region"}))["error"] == (
        "no such secret config for this execution"
    )


async def _no_repair(paths: list[str]) -> None:
    raise AssertionError(paths)


async def test_secrets_need_a_key(db: database.Database, redis_client: aioredis.Redis) -> None:
    keyless = configs.ConfigResolver(database=db, client=redis_client, secrets=crypto.Secrets([]))
    with pytest.raises(errors.ConfigError, match="MODCACHE_SECRETS_KEY: not set"):
        await keyless.set_config("api_key", "hunter2", config_type="secret")


async def test_a_redis_outage_falls_back_to_the_database(
    db: database.Database, resolver: configs.ConfigResolver
) -> None:
    await resolver.set_config("region", "eu")
    no_retries = redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0)
    unreachable = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=no_retries)
    try:
        degraded = configs.ConfigResolver(database=db, client=unreachable, secrets=crypto.Secrets([KEY]))
        assert (await degraded.load_config_for_scope("GLOBAL"))["region"]["value"] == "eu"
    finally:
        await unreachable.aclose()
