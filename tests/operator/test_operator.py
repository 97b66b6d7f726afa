"""The operator end to end: kopf against kmock's emulator over HTTP, with real PostgreSQL and Redis.

Each test creates Secrets and ModuleCaches through the emulated API, changes the real source or cache, and
waits for what a user would see: the cache repaired, the status and events, the finalizer gone. Waits are
awaited conditions: the emulator re-checks after each request, Redis after each change of the test's keys,
PostgreSQL backends by their process exit.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from modcache import db, keys, modules, pgsource
from modcache_operator import names
from operatorkit import backends
from operatorkit.cluster import NAMESPACE, Cluster, cache_spec
from operatorkit.keychanges import KeyChanges, key_changes
from testkit.servers import PrivateRedis, private_redis

C = names.ConditionType
R = names.Reason


def _spec(prefix: str, *, secret: str = "urls", **extra: Any) -> dict[str, Any]:
    return cache_spec(prefix, secret=secret, resyncInterval="1h", **extra)


async def _load(source: pgsource.PgSource, count: int, prefix: str = "pkg") -> dict[str, str]:
    contents = {f"{prefix}/mod_{n}.py": f"VALUE = {n}\n" for n in range(count)}
    for path, text in contents.items():
        await source.put_module(path, text.encode())
    return contents


async def _cached(client: aioredis.Redis, keyspace: keys.KeySpace, path: str) -> str | None:
    value = await client.get(keyspace.content(path))
    return None if value is None else modules.decode_cached(value)["content"]


async def _sql(database_url: str, statement: str, *args: object) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(statement, *args)
    finally:
        await conn.close()


async def _set_content(database_url: str, path: str, text: str) -> None:
    raw = text.encode()
    await _sql(
        database_url,
        "UPDATE workspace_files SET content = $2, content_hash = $3, size_bytes = $4 WHERE path = $1",
        path, text, modules.content_hash(raw), len(raw),
    )  # fmt: skip


@pytest.fixture
async def ready_cache(
    cluster: Cluster, source: pgsource.PgSource, database_url: str, redis_url: str, keyspace: keys.KeySpace
) -> AsyncIterator[dict[str, str]]:
    """A ModuleCache "main" over 5 modules, Ready; yields the modules' contents."""
    contents = await _load(source, 5)
    await cluster.apply_secret("urls", {"database": database_url, "redis": redis_url})
    await cluster.create_cache("main", _spec(keyspace.prefix))
    await cluster.wait_for(lambda: cluster.ready("main"), "Ready True")
    return contents


async def test_a_new_cache_becomes_ready_with_counts(
    cluster: Cluster, ready_cache: dict[str, str], keyspace: keys.KeySpace, redis_client: aioredis.Redis
) -> None:
    status = cluster.status("main")
    assert (status["sourceModules"], status["cachedModules"], status["rejectedModules"]) == (5, 5, 0)
    assert status["observedGeneration"] == 1
    assert status["sourceDigest"].startswith("sha256:")
    assert cluster.condition("main", C.READY)[1] == R.IN_SYNC
    assert status["message"] == "5 of 5 modules cached"
    for kind in (C.SOURCE_REACHABLE, C.CACHE_REACHABLE, C.LISTENER_CONNECTED):
        assert cluster.condition("main", kind)[0] == "True"
    assert cluster.condition("main", C.STALLED)[0] == cluster.condition("main", C.RECONCILING)[0] == "False"
    assert cluster.body("main")["metadata"]["finalizers"] == [names.FINALIZER]  # type: ignore[index]
    for path, text in ready_cache.items():
        assert await _cached(redis_client, keyspace, path) == text
    await cluster.wait_for(
        lambda: ("Normal", R.DRIFT_CORRECTED, "corrected 5 cache entries (5 missing)") in cluster.events("main"),
        "the first fill announced",
    )


async def test_a_partial_expiry_is_repaired_with_an_event(
    cluster: Cluster, ready_cache: dict[str, str], keyspace: keys.KeySpace, redis_client: aioredis.Redis
) -> None:
    path = "pkg/mod_3.py"
    await redis_client.delete(keyspace.content(path))  # the index entry stays: the original bug
    assert await redis_client.sismember(keyspace.index, path)

    await cluster.wait_for(lambda: cluster.status("main").get("totalRepairs") == 6, "the repair in status")
    assert await _cached(redis_client, keyspace, path) == ready_cache[path]
    drift = cluster.status("main")["lastDrift"]
    assert (drift["missing"], drift["total"], drift["trigger"]) == (1, 1, "keyspace")
    assert cluster.status("main")["cachedModules"] == 5
    await cluster.wait_for(
        lambda: ("Normal", R.DRIFT_CORRECTED, "corrected 1 cache entries (1 missing)") in cluster.events("main"),
        "a DriftCorrected event with the count",
    )


async def test_a_module_changed_with_sql_reaches_the_cache_within_a_second(
    cluster: Cluster,
    ready_cache: dict[str, str],
    database_url: str,
    keyspace: keys.KeySpace,
    redis_client: aioredis.Redis,
    changes: KeyChanges,
) -> None:
    started = time.monotonic()
    await _set_content(database_url, "pkg/mod_1.py", "VALUE = 'changed'\n")
    await changes.until(lambda: _is(redis_client, keyspace, "pkg/mod_1.py", "VALUE = 'changed'\n"), "the cache updated")
    assert time.monotonic() - started < 1.0

    await _sql(database_url, "UPDATE workspace_files SET is_deleted = true WHERE path = 'pkg/mod_2.py'")
    await cluster.wait_for(lambda: cluster.status("main").get("sourceModules") == 4, "the deletion counted")
    assert await redis_client.get(keyspace.content("pkg/mod_2.py")) is None
    assert cluster.status("main")["totalRepairs"] == 5, "propagating a source change is not drift"


async def _is(client: aioredis.Redis, keyspace: keys.KeySpace, path: str, text: str) -> bool:
    return await _cached(client, keyspace, path) == text


async def test_suspend_stops_writes_and_resume_catches_up(
    cluster: Cluster,
    ready_cache: dict[str, str],
    database_url: str,
    keyspace: keys.KeySpace,
    redis_client: aioredis.Redis,
) -> None:
    listening = await backends.listener_pids(database_url)
    assert len(listening) == 1
    await cluster.patch_cache("main", {"spec": {"suspend": True}})
    await cluster.wait_for(lambda: cluster.condition("main", C.READY)[1] == R.SUSPENDED, "Ready False Suspended")
    await backends.exited(listening)  # the LISTEN connection closed
    generation = await redis_client.get(keyspace.generation)

    await _set_content(database_url, "pkg/mod_0.py", "VALUE = 'while suspended'\n")
    await redis_client.delete(keyspace.content("pkg/mod_4.py"))
    await asyncio.sleep(1.0)  # nothing can be awaited to prove an absence: give a writer ample time
    assert await redis_client.get(keyspace.generation) == generation, "the cache was written while suspended"
    assert await _cached(redis_client, keyspace, "pkg/mod_0.py") == ready_cache["pkg/mod_0.py"]
    assert ("Normal", R.SUSPENDED) in [e[:2] for e in cluster.events("main")]

    await cluster.patch_cache("main", {"spec": {"suspend": False}})
    await cluster.wait_for(lambda: cluster.ready("main"), "Ready again")
    assert await _cached(redis_client, keyspace, "pkg/mod_0.py") == "VALUE = 'while suspended'\n"
    assert await _cached(redis_client, keyspace, "pkg/mod_4.py") == ready_cache["pkg/mod_4.py"]
    assert cluster.status("main")["observedGeneration"] == 3


async def test_the_resync_annotation_runs_a_full_resync_and_is_echoed(
    cluster: Cluster, ready_cache: dict[str, str], keyspace: keys.KeySpace, redis_client: aioredis.Redis
) -> None:
    path = "pkg/mod_2.py"
    stale = modules.encode_cached(path, "VALUE = 'stale'\n", modules.content_hash(b"VALUE = 'stale'\n"))
    await redis_client.set(keyspace.content(path), stale)  # an overwrite: its keyspace event or the resync repairs it

    token = "2025-06-01T10:00:00Z"
    await cluster.patch_cache("main", {"metadata": {"annotations": {names.RESYNC_ANNOTATION: token}}})
    await cluster.wait_for(lambda: cluster.status("main").get("lastHandledReconcileAt") == token, "the token echoed")
    assert await _cached(redis_client, keyspace, path) == ready_cache[path]
    drift = cluster.status("main")["lastDrift"]
    assert drift["stale"] == 1
    assert drift["trigger"] in ("keyspace", "manual")  # the key event usually wins the race (issue 9)


async def test_redis_down_then_back_recovers_without_help(
    cluster: Cluster, source: pgsource.PgSource, database_url: str, keyspace: keys.KeySpace
) -> None:
    contents = await _load(source, 3)
    with private_redis() as server:
        await cluster.apply_secret("urls", {"database": database_url, "redis": server.url})
        await cluster.create_cache("main", _spec(keyspace.prefix))
        await cluster.wait_for(lambda: cluster.ready("main"), "Ready True")

        server.stop()
        await cluster.wait_for(lambda: cluster.condition("main", C.CACHE_REACHABLE)[0] == "False", "Cache down")
        ready, reason, message = cluster.condition("main", C.READY)
        assert (ready, reason) == ("False", R.CACHE_UNAVAILABLE)
        assert str(server.port) in message
        assert cluster.condition("main", C.SOURCE_REACHABLE)[0] == "True"

        server.start()  # empty: a cold cache
        await cluster.wait_for(lambda: cluster.ready("main"), "Ready True again, with no manual step")
        assert cluster.condition("main", C.CACHE_REACHABLE)[0] == "True"
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        try:
            for path, text in contents.items():
                assert await _cached(client, keyspace, path) == text
        finally:
            await client.aclose()
    await cluster.told("main", "Normal", R.RECOVERED)
    told = [e[:2] for e in cluster.events("main")]
    assert ("Warning", R.CACHE_UNAVAILABLE) in told
    assert told.index(("Warning", R.CACHE_UNAVAILABLE)) < told.index(("Normal", R.RECOVERED))


@pytest.fixture
async def listener_role(database_url: str) -> AsyncIterator[str]:
    """A login role of the test's own for the LISTEN connection, so the test can lock it out and back in."""
    role = f"modcache_listen_{uuid.uuid4().hex[:8]}"
    database = database_url.rsplit("/", 1)[1]
    await _sql(database_url, f'CREATE ROLE "{role}" LOGIN')
    await _sql(database_url, f'GRANT CONNECT ON DATABASE "{database}" TO "{role}"')
    yield database_url.replace("postgres@", f"{role}@", 1)
    await _sql(database_url, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
    await _sql(database_url, f'REVOKE CONNECT ON DATABASE "{database}" FROM "{role}"')
    await _sql(database_url, f'DROP ROLE "{role}"')


async def test_a_terminated_listener_flips_and_recovers_and_changes_meanwhile_are_repaired(
    cluster: Cluster,
    source: pgsource.PgSource,
    database_url: str,
    redis_url: str,
    keyspace: keys.KeySpace,
    redis_client: aioredis.Redis,
    listener_role: str,
    changes: KeyChanges,
) -> None:
    await _load(source, 3)
    await cluster.apply_secret("urls", {"database": database_url, "redis": redis_url, "listen": listener_role})
    spec = _spec(keyspace.prefix)
    spec["source"]["listenDatabaseUrlSecretRef"] = {"name": "urls", "key": "listen"}
    await cluster.create_cache("main", spec)
    await cluster.wait_for(lambda: cluster.ready("main"), "Ready True")
    role = listener_role.split("://", 1)[1].split("@", 1)[0]

    await _sql(database_url, f'ALTER ROLE "{role}" NOLOGIN')  # reconnects fail until it may log in again
    await _sql(database_url, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
    await cluster.wait_for(lambda: cluster.condition("main", C.LISTENER_CONNECTED)[0] == "False", "Listener down")
    assert cluster.condition("main", C.READY)[:2] == ("True", R.LISTENER_DOWN)
    await _set_content(database_url, "pkg/mod_1.py", "VALUE = 'missed'\n")  # its NOTIFY reaches no one

    await _sql(database_url, f'ALTER ROLE "{role}" LOGIN')
    await cluster.wait_for(lambda: cluster.condition("main", C.LISTENER_CONNECTED)[0] == "True", "Listener back")
    await changes.until(lambda: _is(redis_client, keyspace, "pkg/mod_1.py", "VALUE = 'missed'\n"), "the missed change")
    await cluster.told("main", "Normal", R.LISTENER_RECONNECTED)
    told = [e[:2] for e in cluster.events("main")]
    assert told.index(("Warning", R.LISTENER_DOWN)) < told.index(("Normal", R.LISTENER_RECONNECTED))
    await cluster.wait_for(lambda: cluster.condition("main", C.READY)[:2] == ("True", R.IN_SYNC), "InSync again")


async def test_deleting_the_resource_stops_its_loop_and_removes_the_finalizer(
    cluster: Cluster, ready_cache: dict[str, str], database_url: str
) -> None:
    listening = await backends.listener_pids(database_url)
    assert len(listening) == 1
    await cluster.delete_cache("main")
    await cluster.wait_for(lambda: cluster.body("main") is None, "the object gone (finalizer removed)")
    await backends.exited(listening)  # the LISTEN connection closed


async def test_a_missing_secret_is_reported_then_picked_up_when_created(
    cluster: Cluster, source: pgsource.PgSource, database_url: str, redis_url: str, keyspace: keys.KeySpace
) -> None:
    await _load(source, 2)
    await cluster.create_cache("main", _spec(keyspace.prefix, secret="later"))
    await cluster.wait_for(lambda: cluster.condition("main", C.STALLED)[0] == "True", "Stalled")
    ready, reason, message = cluster.condition("main", C.READY)
    assert (ready, reason) == ("False", R.SECRET_NOT_FOUND)
    assert message == f"spec.source.databaseUrlSecretRef: Secret {NAMESPACE}/later not found"

    await cluster.apply_secret("later", {"database": database_url})  # still no "redis" key
    await cluster.wait_for(lambda: cluster.condition("main", C.READY)[1] == R.SECRET_KEY_NOT_FOUND, "key missing")
    assert "spec.cache.redisUrlSecretRef" in cluster.condition("main", C.READY)[2]

    await cluster.apply_secret("later", {"database": database_url, "redis": redis_url})
    await cluster.wait_for(lambda: cluster.ready("main"), "Ready once the Secret is complete")
    assert cluster.status("main")["sourceModules"] == 2
    await cluster.told("main", "Normal", R.RECOVERED)
    told = [e[:2] for e in cluster.events("main")]
    assert told[:2] == [("Warning", R.SECRET_NOT_FOUND), ("Warning", R.SECRET_KEY_NOT_FOUND)]


@pytest.mark.parametrize(
    ("database", "redis", "reason", "field"),
    [
        ("mysql://app:s3cr3t-pw@db/app", "REDIS", R.INVALID_URL, "spec.source.databaseUrlSecretRef"),
        ("DATABASE", "http://:s3cr3t-pw@cache:6379/0", R.INVALID_URL, "spec.cache.redisUrlSecretRef"),
        ("postgresql://postgres:s3cr3t-pw@127.0.0.1:1/app", "REDIS", R.SOURCE_UNAVAILABLE, "127.0.0.1:1/app"),
        ("DATABASE", "redis://:s3cr3t-pw@127.0.0.1:1/0", R.CACHE_UNAVAILABLE, "127.0.0.1:1/0"),
    ],
    ids=["bad database scheme", "bad redis scheme", "database unreachable", "redis unreachable"],
)
async def test_bad_urls_are_named_never_shown_and_fixing_them_recovers(
    cluster: Cluster,
    source: pgsource.PgSource,
    database_url: str,
    redis_url: str,
    keyspace: keys.KeySpace,
    database: str,
    redis: str,
    reason: str,
    field: str,
) -> None:
    await _load(source, 2)
    urls = {"database": database.replace("DATABASE", database_url), "redis": redis.replace("REDIS", redis_url)}
    await cluster.apply_secret("urls", urls)
    await cluster.create_cache("main", _spec(keyspace.prefix))
    await cluster.wait_for(lambda: cluster.condition("main", C.READY)[1] == reason, f"Ready False {reason}")
    message = cluster.condition("main", C.READY)[2]
    assert field in message
    everything = repr(cluster.history("main")) + repr(cluster.events("main"))
    assert "s3cr3t-pw" not in everything

    await cluster.apply_secret("urls", {"database": database_url, "redis": redis_url})
    await cluster.wait_for(lambda: cluster.ready("main"), "Ready after the fix, with no manual step")
    await cluster.told("main", "Normal", R.RECOVERED)


async def test_a_spec_change_restarts_the_loop_on_the_new_prefix(
    cluster: Cluster, ready_cache: dict[str, str], redis_client: aioredis.Redis, keyspace: keys.KeySpace
) -> None:
    moved = keys.KeySpace(keyspace.prefix.replace("bifrost:", "moved:"))
    await cluster.patch_cache("main", {"spec": {"keyPrefix": moved.prefix}})
    await cluster.wait_for(lambda: cluster.status("main").get("observedGeneration") == 2, "generation 2 observed")
    await cluster.wait_for(lambda: cluster.ready("main"), "Ready on the new prefix")
    for path, text in ready_cache.items():
        assert await _cached(redis_client, moved, path) == text


async def test_a_rotated_secret_is_picked_up(
    cluster: Cluster, ready_cache: dict[str, str], database_url: str, keyspace: keys.KeySpace
) -> None:
    with private_redis() as server:
        async with key_changes(server.url, keyspace.prefix) as new_keys:
            await cluster.apply_secret("urls", {"database": database_url, "redis": server.url})
            await new_keys.until(lambda: _filled(server, keyspace, ready_cache), "the cache filled in the new Redis")
    assert cluster.status("main")["observedGeneration"] == 1, "a Secret change is not a spec change"


async def _filled(server: PrivateRedis, keyspace: keys.KeySpace, contents: dict[str, str]) -> bool:
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        return all([await _cached(client, keyspace, path) == text for path, text in contents.items()])
    finally:
        await client.aclose()


async def test_two_caches_never_interfere(
    cluster: Cluster,
    source: pgsource.PgSource,
    database_url: str,
    other_database_url: str,
    redis_url: str,
    keyspace: keys.KeySpace,
    redis_client: aioredis.Redis,
) -> None:
    other_source = pgsource.PgSource(engine=db.make_engine(other_database_url))
    other = keys.KeySpace(keyspace.prefix.replace("bifrost:", "other:"))
    try:
        ours = await _load(source, 4, prefix="ours")
        theirs = await _load(other_source, 2, prefix="theirs")
    finally:
        await other_source.close()
    await cluster.apply_secret("urls", {"database": database_url, "redis": redis_url})
    await cluster.apply_secret("other", {"database": other_database_url, "redis": redis_url})
    await cluster.create_cache("a", _spec(keyspace.prefix))
    await cluster.create_cache("b", _spec(other.prefix, secret="other"))
    await cluster.wait_for(lambda: cluster.ready("a") and cluster.ready("b"), "both Ready")
    assert (cluster.status("a")["sourceModules"], cluster.status("b")["sourceModules"]) == (4, 2)
    assert await redis_client.smembers(keyspace.index) == set(ours)
    assert await redis_client.smembers(other.index) == set(theirs)

    await cluster.patch_cache("b", {"spec": {"suspend": True}})
    await cluster.wait_for(lambda: cluster.condition("b", C.READY)[1] == R.SUSPENDED, "b suspended")
    await redis_client.delete(keyspace.content("ours/mod_0.py"))
    await cluster.wait_for(lambda: cluster.status("a").get("totalRepairs") == 5, "a repaired")
    assert cluster.ready("a")
    assert cluster.status("b")["totalRepairs"] == 2
    assert ("Normal", R.DRIFT_CORRECTED, "corrected 1 cache entries (1 missing)") not in cluster.events("b")


async def test_prune_false_keeps_entries_of_deleted_modules(
    cluster: Cluster,
    source: pgsource.PgSource,
    database_url: str,
    redis_url: str,
    keyspace: keys.KeySpace,
    redis_client: aioredis.Redis,
    changes: KeyChanges,
) -> None:
    contents = await _load(source, 3)
    await cluster.apply_secret("urls", {"database": database_url, "redis": redis_url})
    await cluster.create_cache("main", _spec(keyspace.prefix, prune=False))
    await cluster.wait_for(lambda: cluster.ready("main"), "Ready True")

    await _sql(database_url, "UPDATE workspace_files SET is_deleted = true WHERE path = 'pkg/mod_0.py'")
    await _set_content(database_url, "pkg/mod_1.py", "VALUE = 'new'\n")  # a change still flows
    await changes.until(lambda: _is(redis_client, keyspace, "pkg/mod_1.py", "VALUE = 'new'\n"), "the change applied")
    token = "after-delete"
    await cluster.patch_cache("main", {"metadata": {"annotations": {names.RESYNC_ANNOTATION: token}}})
    await cluster.wait_for(lambda: cluster.status("main").get("lastHandledReconcileAt") == token, "a full resync")
    assert await _cached(redis_client, keyspace, "pkg/mod_0.py") == contents["pkg/mod_0.py"]
