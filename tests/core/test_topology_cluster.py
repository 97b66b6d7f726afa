"""Redis Cluster (issue 11): three masters with a replica each, of the test's own (``testkit.topologies``).

Every key of a cache lives in the slot of its prefix's hash tag (``{bifrost}:module:``), so the write scripts stay
atomic. The watcher is built from a ``redis+cluster://`` URL by ``wiring``: it converges, repairs a bounded, seeded
subset of the integrity issue's cache faults (as ``test_chaos`` does on one node: content keys rewritten, cut,
expired, retyped, forged; index and manifest entries removed or forged; the generation lowered or deleted), and
follows a failover of the slot's master: key events subscribed again on the new owner, a change committed
afterwards reaches the cache.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from modcache import errors, keys, settings, wiring
from modcache_consumer import serving
from modcache_consumer import settings as consumer_settings
from testkit import convergence, topologies
from testkit.observers import Recorder
from testkit.watching import upsert, watch_settings, watching

KS = keys.KeySpace("{bifrost}:module:")
SEED = 11
ROUNDS = 12


@pytest.fixture(scope="module")
def cluster() -> Iterator[topologies.Cluster]:
    with topologies.redis_cluster() as topology:
        yield topology


def test_a_cluster_url_with_an_untagged_prefix_is_a_config_error_naming_the_fix() -> None:
    with pytest.raises(errors.ConfigError, match="MODCACHE_KEY_PREFIX") as caught:
        settings.Settings.from_env(redis_url="redis+cluster://127.0.0.1:7000,127.0.0.1:7001")
    assert "'{bifrost}:module:'" in str(caught.value)
    for untagged in ("bifrost:{}module:", "bifrost:{module:"):  # an empty or unclosed tag moves keys by path
        with pytest.raises(errors.ConfigError, match="hash tag"):
            settings.Settings.from_env(redis_url="redis+cluster://127.0.0.1:7000", key_prefix=untagged)
    tagged = settings.Settings.from_env(redis_url="redis+cluster://127.0.0.1:7000", key_prefix=KS.prefix)
    assert tagged.keyspace().prefix == KS.prefix


@pytest.mark.parametrize("prefix", ["{bifrost}:module:", "t1:{bifrost}:module:", "{a}{b}:"])
def test_every_key_of_a_tagged_prefix_is_in_one_slot(prefix: str) -> None:
    tag = keys.hash_tag(prefix)
    assert tag
    ks = keys.KeySpace(prefix)
    names = [ks.index, ks.manifest, ks.generation, ks.status, ks.writes_channel, ks.content("a/}{x}.py")]
    assert {keys.hash_tag(name) for name in names} == {tag}


async def test_watch_mode_on_a_cluster_repairs_faults_and_follows_a_failover(
    cluster: topologies.Cluster, database_url: str
) -> None:
    config = watch_settings(database_url=database_url, redis_url=cluster.url(), key_prefix=KS.prefix)
    recorder = Recorder()
    await upsert(database_url, {f"pkg/m{n}.py": f"V = {n}\n" for n in range(30)})
    async with watching(config, recorder) as (wired, _):
        client: Any = wired.cache.client
        assert await convergence.converged(database_url, client, KS.prefix, within_s=10) == []
        rng = random.Random(SEED)
        for round_ in range(ROUNDS):
            fault = await rng.choice(FAULTS)(client, rng)
            left = await convergence.converged(database_url, client, KS.prefix, within_s=5)
            assert left == [], f"seed {SEED} round {round_} ({fault}): {left}"

        slot = client.keyslot(KS.generation)
        old, new = await asyncio.to_thread(cluster.fail_over, slot)
        await recorder.wait_for(lambda: any(f":{new.port}" in d for active, d in recorder.keyspace if active), 30)
        await upsert(database_url, {"pkg/m0.py": "V = 'after the failover'\n", "pkg/new.py": "NEW = 1\n"})
        assert await convergence.converged(database_url, client, KS.prefix, within_s=10) == []
        await client.set(KS.content("pkg/new.py"), "forged on the new owner")  # heard from the new owner's events
        assert await convergence.converged(database_url, client, KS.prefix, within_s=10) == []
        # the consumer's module server reads through the same cluster client (a MULTI of one slot's keys)
        server = serving.ModuleServer(client=client, keyspace=KS, repair=_no_repair)
        generation, (entry,) = await server.lookup(["pkg/new.py"])
        assert generation is not None
        assert entry["content"] == "NEW = 1\n"
    moved = [d for active, d in recorder.keyspace if active and f":{new.port}" in d]
    assert f"(was 127.0.0.1:{old.port})" in moved[0]


async def _no_repair(paths: list[str]) -> None:
    raise AssertionError(f"nothing is missing: {paths}")


# -- a subset of test_chaos's cache faults, on the tagged prefix ------------------------------------------------


async def _cached(client: Any, rng: random.Random) -> str:
    return rng.choice(sorted(await client.smembers(KS.index)))


async def content_fault(client: Any, rng: random.Random) -> str:
    path = await _cached(client, rng)
    key = KS.content(path)
    fault = rng.choice(["set", "append", "setrange", "del", "pexpire", "hash", "forge"])
    match fault:
        case "set":
            await client.set(key, json.dumps({"content": "evil", "path": path, "hash": "0" * 64}))
        case "append":
            await client.append(key, " ")
        case "setrange":
            await client.setrange(key, 15, "#")
        case "del":
            await client.delete(key)
        case "pexpire":
            await client.pexpire(key, 1)
        case "hash":
            await client.delete(key)
            await client.hset(key, "content", "evil")
        case "forge":
            await client.setrange(key, 14, "Z")  # same length, inside the content
    return f"content {fault}"


async def bookkeeping_fault(client: Any, rng: random.Random) -> str:
    path = await _cached(client, rng)
    fault = rng.choice(["srem", "sadd", "hset", "hdel", "del-index", "gen-low", "gen-del"])
    match fault:
        case "srem":
            await client.srem(KS.index, path)
        case "sadd":
            await client.sadd(KS.index, "ghost/never.py")
        case "hset":
            await client.hset(KS.manifest, path, "99999999999999999:" + "0" * 64 + ":1")
        case "hdel":
            await client.hdel(KS.manifest, path)
        case "del-index":
            await client.delete(KS.index)
        case "gen-low":
            await client.set(KS.generation, "5")
        case "gen-del":
            await client.delete(KS.generation)
    return f"bookkeeping {fault}"


FAULTS: list[Callable[[Any, random.Random], Awaitable[str]]] = [content_fault, content_fault, bookkeeping_fault]


def test_the_consumer_on_a_cluster_needs_a_tagged_config_namespace_too() -> None:
    cluster = {"redis_url": "redis+cluster://127.0.0.1:7000", "key_prefix": KS.prefix}
    with pytest.raises(errors.ConfigError, match=r"MODCACHE_CACHE_NAMESPACE.*'\{bifrost-config\}:'"):
        consumer_settings.ConsumerSettings.from_env(**cluster)
    tagged = consumer_settings.ConsumerSettings.from_env(**cluster, cache_namespace="{bifrost-config}:")
    assert keys.hash_tag(keys.config_cache_key("GLOBAL", tagged.cache_namespace)) == "bifrost-config"


async def test_a_half_done_slot_migration_fails_the_sync_with_a_message_saying_what_to_do(
    cluster: topologies.Cluster, database_url: str
) -> None:
    """A resharding left half done (the slot MIGRATING on its owner, IMPORTING on another master, some of the
    cache's keys moved): the atomic scripts cannot run on keys split over two nodes, and redis-py's bare
    ``TRYAGAIN``/``ASK`` said nothing of what to do. The cache is a prefix of the test's own ({mig}: its own slot)."""
    ks = keys.KeySpace("{mig}:module:")
    config = settings.Settings(database_url=database_url, redis_url=cluster.url(), key_prefix=ks.prefix)  # type: ignore[arg-type]
    await upsert(database_url, {"mig/a.py": "A = 1\n"})
    async with wiring.connect(config) as wired:
        await wired.engine.full_resync()
        slot = wired.cache.client.keyslot(ks.generation)  # type: ignore[union-attr]
        source = cluster.owner(slot)
        target = next(n for n in cluster.nodes if n is not source and n.cli("ROLE").startswith("master"))
        target.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source.cli("CLUSTER", "MYID"))
        source.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target.cli("CLUSTER", "MYID"))
        source.cli("MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", ks.index)
        try:
            with pytest.raises(errors.CacheUnavailable) as caught:
                await wired.engine.full_resync()
        finally:  # undo the migration: the index back home, the slot stable on both
            target.cli("MIGRATE", "127.0.0.1", str(source.port), "", "0", "5000", "KEYS", ks.index)
            for node in (source, target):
                node.cli("CLUSTER", "SETSLOT", str(slot), "STABLE")
        await wired.engine.full_resync()  # whole again: the sync works
    message = str(caught.value)
    assert "its keys are being moved between nodes, by a resharding or one left half done" in message
    assert "finish or undo the migration with 'redis-cli --cluster fix HOST:PORT'" in message
