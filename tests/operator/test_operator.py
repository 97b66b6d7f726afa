"""The operator end to end: kopf in-process against kmock's emulator, real PostgreSQL and Redis.

Each test creates Secrets and ModuleCaches through the emulated API (over real HTTP), changes the real source or
cache, and waits for what a user would see: the cache repaired, the status and events, the finalizer gone.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from modcache import keys, modules, pgsource
from modcache_operator import names
from operatorkit.cluster import Cluster

C = names.ConditionType
R = names.Reason


def _spec(prefix: str, **extra: Any) -> dict[str, Any]:
    return {
        "source": {"databaseUrlSecretRef": {"name": "urls", "key": "database"}},
        "cache": {"redisUrlSecretRef": {"name": "urls", "key": "redis"}},
        "keyPrefix": prefix,
        "resyncInterval": "1h",
        **extra,
    }


async def _load(source: pgsource.PgSource, count: int) -> dict[str, str]:
    contents = {f"pkg/mod_{n}.py": f"VALUE = {n}\n" for n in range(count)}
    for path, text in contents.items():
        await source.put_module(path, text.encode())
    return contents


async def test_a_new_cache_becomes_ready_with_counts(
    cluster: Cluster,
    source: pgsource.PgSource,
    database_url: str,
    redis_url: str,
    keyspace: keys.KeySpace,
    redis_client: aioredis.Redis,
) -> None:
    contents = await _load(source, 5)
    await cluster.apply_secret("urls", {"database": database_url, "redis": redis_url})
    await cluster.create_cache("main", _spec(keyspace.prefix))

    await cluster.wait_for(lambda: cluster.ready("main"), "Ready True")
    status = cluster.status("main")
    assert (status["sourceModules"], status["cachedModules"]) == (5, 5)
    assert status["observedGeneration"] == 1
    assert cluster.condition("main", C.READY)[1] == R.IN_SYNC
    assert cluster.condition("main", C.LISTENER_CONNECTED)[0] == "True"
    assert cluster.body("main")["metadata"]["finalizers"] == [names.FINALIZER]  # type: ignore[index]
    for path, text in contents.items():
        cached = modules.decode_cached(await redis_client.get(keyspace.content(path)))
        assert cached["content"] == text
