"""PrefixConflict end to end: two ModuleCaches whose prefixes overlap on one Redis database never both write.

The older one (creationTimestamp, then name) keeps the prefix; the younger is refused, Ready False with reason
PrefixConflict naming the other, and starts once the other is gone. At start-up the younger waits for an older
one that has not read its Secrets yet, instead of writing until it is refused.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from modcache import keys, pgsource
from modcache_operator import names
from operatorkit.cluster import NAMESPACE, Cluster, cache_spec, emulated_api, running_operator
from operatorkit.emulator import Fault

C = names.ConditionType
R = names.Reason


def _spec(prefix: str, secret: str = "urls") -> dict[str, Any]:
    return cache_spec(prefix, secret=secret, resyncInterval="1h")


async def _wrote_anything(client: aioredis.Redis, prefix: str) -> bool:
    space = keys.KeySpace(prefix)
    return bool(await client.exists(space.index, space.generation, space.manifest))


async def test_the_younger_of_two_overlapping_caches_is_refused_until_the_older_goes(
    cluster: Cluster,
    source: pgsource.PgSource,
    database_url: str,
    redis_url: str,
    keyspace: keys.KeySpace,
    redis_client: aioredis.Redis,
) -> None:
    await source.put_module("pkg/a.py", b"A = 1\n")
    await cluster.apply_secret("urls", {"database": database_url, "redis": redis_url})
    await cluster.create_cache("older", _spec(keyspace.prefix))
    await cluster.wait_for(lambda: cluster.ready("older"), "the older Ready")
    nested = f"{keyspace.prefix}t2/"
    await cluster.create_cache("younger", _spec(nested))

    await cluster.wait_for(lambda: cluster.condition("younger", C.READY)[1] == R.PREFIX_CONFLICT, "refused")
    ready, _, message = cluster.condition("younger", C.READY)
    assert ready == "False"
    assert f"ModuleCache {NAMESPACE}/older" in message
    assert keyspace.prefix in message
    assert "127.0.0.1:6379/0" in message
    assert cluster.condition("younger", C.STALLED)[0] == "True", "a person must act"
    await cluster.told("younger", "Warning", R.PREFIX_CONFLICT)
    assert not await _wrote_anything(redis_client, nested)
    assert cluster.ready("older"), "the older keeps running"

    await cluster.delete_cache("older")
    await cluster.wait_for(lambda: cluster.ready("younger"), "the younger starts once the older is gone")
    assert await _wrote_anything(redis_client, nested)


async def test_at_start_the_younger_waits_for_an_older_one_that_has_not_read_its_secrets(
    source: pgsource.PgSource,
    database_url: str,
    redis_url: str,
    keyspace: keys.KeySpace,
    redis_client: aioredis.Redis,
) -> None:
    await source.put_module("pkg/a.py", b"A = 1\n")
    async with emulated_api() as (emulator, url):
        cluster = Cluster(emulator=emulator, operator=None, ports=None)  # type: ignore[arg-type]
        for secret in ("a-urls", "b-urls"):
            await cluster.apply_secret(secret, {"database": database_url, "redis": redis_url})
        nested = f"{keyspace.prefix}t2/"
        await cluster.create_cache("a", _spec(nested, secret="a-urls"))  # older (or as old, and first by name)
        await cluster.create_cache("b", _spec(keyspace.prefix, secret="b-urls"))
        emulator.faults.append(Fault(500, method="GET", plural="secrets", name="a-urls"))  # a cannot read yet

        async with running_operator(emulator, url) as running:
            waiting = "waiting for the older ModuleCache modcache-test/a"
            await running.wait_for(lambda: waiting in running.condition("b", C.READY)[2], "b waits for a")
            assert running.condition("b", C.READY)[:2] == ("False", R.STARTING)
            assert not await _wrote_anything(redis_client, keyspace.prefix)

            emulator.heal()
            await running.wait_for(lambda: running.ready("a"), "a Ready")
            await running.wait_for(lambda: running.condition("b", C.READY)[1] == R.PREFIX_CONFLICT, "b refused")
            assert not await _wrote_anything(redis_client, keyspace.prefix), "b wrote before it was refused"
