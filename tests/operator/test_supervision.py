"""The supervisor decides from state and the reporter writes against the server's copy (in-process operator).

* a rotated Secret and a new spec are picked up after reading the Secret failed, with no other event to help;
* Secrets are only ever read by name (no list, no watch: RBAC needs only ``get``);
* a status the API server rejects is told in a Warning event and a Ready condition, and retried slowly;
* values another writer left in the status (a previous leader, a person) are corrected;
* events name the operator's pod (``reportingInstance``).
"""

from __future__ import annotations

import asyncio

import kmock
import redis.asyncio as aioredis

from modcache import keys, modules, pgsource
from modcache_operator import names
from operatorkit.cluster import Cluster, cache_spec
from operatorkit.emulator import Fault
from operatorkit.keychanges import KeyChanges, key_changes
from testkit.servers import private_redis

C = names.ConditionType
R = names.Reason


async def _ready(cluster: Cluster, source: pgsource.PgSource, database_url: str, redis_url: str, prefix: str) -> None:
    for n in range(3):
        await source.put_module(f"pkg/mod_{n}.py", f"VALUE = {n}\n".encode())
    await cluster.apply_secret("urls", {"database": database_url, "redis": redis_url})
    await cluster.create_cache("main", cache_spec(prefix, resyncInterval="1h"))
    await cluster.wait_for(lambda: cluster.ready("main"), "Ready")


async def _all_cached(client: aioredis.Redis, keyspace: keys.KeySpace, count: int) -> bool:
    values = [await client.get(keyspace.content(f"pkg/mod_{n}.py")) for n in range(count)]
    return all(v is not None and modules.decode_cached(v)["content"] == f"VALUE = {n}\n" for n, v in enumerate(values))


def _secret_reads_failing(cluster: Cluster) -> Fault:
    fault = Fault(500, method="GET", plural="secrets")
    cluster.emulator.faults.append(fault)
    return fault


async def test_a_rotated_secret_is_picked_up_after_reading_it_failed(
    cluster: Cluster, source: pgsource.PgSource, database_url: str, redis_url: str, keyspace: keys.KeySpace
) -> None:
    await _ready(cluster, source, database_url, redis_url, keyspace.prefix)
    failing = _secret_reads_failing(cluster)
    await cluster.wait_for(lambda: failing.hits >= 1, "a Secret read failing")
    with private_redis() as rotated:
        await cluster.apply_secret("urls", {"database": database_url, "redis": rotated.url})  # the rotation
        await cluster.wait_for(lambda: failing.hits >= 2, "the next read failing too")
        client = aioredis.Redis.from_url(rotated.url, decode_responses=True)
        try:
            async with key_changes(rotated.url, keyspace.prefix) as rotated_keys:
                cluster.emulator.heal()  # nothing else happens: no event on the object, no Secret watch
                await rotated_keys.until(lambda: _all_cached(client, keyspace, 3), "the cache filled in the new Redis")
        finally:
            await client.aclose()
        await cluster.wait_for(lambda: cluster.ready("main"), "Ready on the rotated Redis")  # while it still runs
    assert cluster.status("main")["observedGeneration"] == 1


async def test_a_spec_change_is_picked_up_after_reading_the_secret_failed(
    cluster: Cluster,
    source: pgsource.PgSource,
    database_url: str,
    redis_url: str,
    keyspace: keys.KeySpace,
    redis_client: aioredis.Redis,
    changes: KeyChanges,
) -> None:
    await _ready(cluster, source, database_url, redis_url, keyspace.prefix)
    failing = _secret_reads_failing(cluster)
    moved = keys.KeySpace(keyspace.prefix.replace("bifrost:", "moved:"))
    await cluster.patch_cache("main", {"spec": {"keyPrefix": moved.prefix}})
    await cluster.wait_for(lambda: failing.hits >= 2, "reading the Secret for generation 2 failing, twice")
    cluster.emulator.heal()
    await changes.until(lambda: _all_cached(redis_client, moved, 3), "the cache filled under the new prefix")
    await cluster.wait_for(lambda: cluster.status("main").get("observedGeneration") == 2, "generation 2 observed")
    await cluster.wait_for(lambda: cluster.ready("main"), "Ready on the new prefix")


async def test_secrets_are_only_ever_read_by_name(
    cluster: Cluster, source: pgsource.PgSource, database_url: str, redis_url: str, keyspace: keys.KeySpace
) -> None:
    await _ready(cluster, source, database_url, redis_url, keyspace.prefix)
    before = len(_secret_requests(cluster))
    await cluster.apply_secret("urls", {"database": database_url, "redis": redis_url, "extra": "x"})
    await cluster.wait_for(lambda: len(_secret_requests(cluster)) >= before + 2, "the Secret read again")
    reads = [r for r in _secret_requests(cluster) if r.method == kmock.method.GET]
    assert {(r.action, r.name) for r in reads} == {(kmock.action.FETCH, "urls")}, "a list or watch: RBAC needs more"


def _secret_requests(cluster: Cluster) -> list[kmock.Request]:
    return [r for r in cluster.emulator.requests_log() if r.resource is not None and r.resource.plural == "secrets"]


async def test_a_rejected_status_is_told_and_retried_slowly(
    cluster: Cluster,
    source: pgsource.PgSource,
    database_url: str,
    redis_url: str,
    keyspace: keys.KeySpace,
    redis_client: aioredis.Redis,
) -> None:
    await _ready(cluster, source, database_url, redis_url, keyspace.prefix)
    # As an older CRD whose schema refuses a field would: the whole status is rejected, conditions alone are not.
    rejected = Fault(422, method="PATCH", plural="modulecaches", subresource="status", body_contains="totalRepairs")
    cluster.emulator.faults.append(rejected)
    await redis_client.delete(keyspace.content("pkg/mod_1.py"))  # a repair: the status must change
    await cluster.wait_for(lambda: cluster.condition("main", C.READY)[1] == R.STATUS_REJECTED, "Ready says so")
    ready, _, message = cluster.condition("main", C.READY)
    assert ready == "False"
    assert "HTTP 422" in message

    def told() -> list[tuple[str, str, str]]:
        return [e for e in cluster.events("main") if e[:2] == ("Warning", R.STATUS_REJECTED)]

    await cluster.wait_for(told, "a Warning event")  # kopf posts events from a queue of its own
    warnings = told()
    assert len(warnings) == 1
    assert "injected HTTP 422" in warnings[0][2]

    attempts = rejected.hits
    await asyncio.sleep(4.0)  # how often does it try in 4 s? (nothing to await: counting what happens)
    assert rejected.hits - attempts <= 5, "a rejected status must back off, not be retried every second"
    assert len([e for e in cluster.events("main") if e[1] == R.STATUS_REJECTED]) == 1, "told once"

    cluster.emulator.heal()
    await cluster.wait_for(lambda: cluster.status("main").get("totalRepairs") == 4, "the status written again")
    await cluster.wait_for(lambda: cluster.condition("main", C.READY)[:2] == ("True", R.IN_SYNC), "Ready again")


async def test_values_another_writer_left_in_the_status_are_corrected(
    cluster: Cluster, source: pgsource.PgSource, database_url: str, redis_url: str, keyspace: keys.KeySpace
) -> None:
    await _ready(cluster, source, database_url, redis_url, keyspace.prefix)
    stale = {
        "sourceModules": 999,
        "message": "left by a previous leader",
        "conditions": [{"type": "Ready", "status": "False", "reason": "SyncFailed", "message": "old news"}],
    }
    await cluster.emulator.patch(
        f"/apis/{names.GROUP}/{names.VERSION}/namespaces/modcache-test/{names.PLURAL}/main/status",
        json={"status": stale},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    await cluster.wait_for(lambda: cluster.status("main").get("sourceModules") == 3, "the count corrected")
    await cluster.wait_for(lambda: cluster.ready("main"), "Ready corrected")
    assert cluster.status("main")["message"] == "3 of 3 modules cached"
    assert {c["type"] for c in cluster.status("main")["conditions"]} == {c.value for c in C}


async def test_events_name_the_operators_pod(
    cluster: Cluster, source: pgsource.PgSource, database_url: str, redis_url: str, keyspace: keys.KeySpace
) -> None:
    await _ready(cluster, source, database_url, redis_url, keyspace.prefix)
    await cluster.wait_for(lambda: cluster.events("main"), "an event")
    posted = [
        obj.raw
        for (resource, _, _), obj in cluster.emulator.objects.items()
        if resource.plural == "events" and not obj.deleted
    ]
    assert {e["reportingInstance"] for e in posted} == {cluster.operator.reporting_instance}
    assert {e["reportingComponent"] for e in posted} == {names.REPORTING_COMPONENT}
