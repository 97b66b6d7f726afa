"""Fault -> repaired, per fault class of issue 9 item 4, against ``modcache sync --watch`` as a real process.

Fixture: N live modules x 4 KiB (default 100,000) in a throw-away PostgreSQL database, a private redis-server
(``hz 100``, persistence only for the lossy-restart class), and ``modcache sync --watch`` (the CLI, default settings:
probe every 0.1 s, periodic resync every 300 s) in its own process.

Each sample injects one fault with a plain Redis command (or stops/starts the server) and times until an
*independent* check passes: the judge here reads the keys directly and compares them with what it computed from the
rows itself (``json.dumps`` of the row, as ``tests/testkit/convergence.py`` does), never the engine's plan. Single-key
faults are re-checked on every keyspace event of the cache's prefix (no polling); whole-cache faults (FLUSHDB,
FLUSHALL, restart) are polled every 20 ms until the index, the manifest and the number of content keys are complete,
and afterwards every content key is compared byte for byte (untimed). Between samples the bench waits until the
watcher has been quiet for 0.3 s, and after a whole-cache sample until its deep resync has ended (it writes nothing
until then), so one repair never overlaps the next fault.

The naive reference, measured in the same run: without events (the original plan's design, or a periodic resync
alone) a fault waits for the next full sync; its cost at this size is the original plan's full resync time, plus
up to its interval.

    ./dev bench core_faults [--modules N] [--samples N] [--slow-samples N] [--whole-samples N] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from bench import _support as sup
from modcache import keys

TARGET_SINGLE_MS = 50.0
TARGET_ANY_MS = 1000.0
QUIET_S = 0.3
WAIT_S = 120.0
BOUND_S = 3600
KS = keys.KeySpace()
FORGED = "99999999999999999:" + "0" * 64 + ":1"

Check = Callable[[], Awaitable[bool]]


# -- the private server, restartable with or without its snapshot ------------------------------------------------


class Server:
    def __init__(self) -> None:
        self.port = sup.free_port()
        self.dir = tempfile.mkdtemp(prefix="modcache-faults-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--hz", "100", "--dir", self.dir]
        self.proc = subprocess.Popen([*args, "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        sup._wait_port(self.port)

    def stop(self, *, keep_snapshot: bool = False) -> None:
        if not keep_snapshot:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.dir, "dump.rdb"))
        if self.proc is not None:
            self.proc.terminate()  # with --save "" a SIGTERM writes no snapshot: only an explicit SAVE does
            self.proc.wait(30)
            self.proc = None


@contextlib.contextmanager
def private_server() -> Iterator[Server]:
    server = Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def sync_watch(database_url: str, redis_url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "MODCACHE_DATABASE_URL": database_url, "MODCACHE_REDIS_URL": redis_url}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "modcache"), "sync", "--watch"], env=env, stdout=out, stderr=out
        )
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


# -- the independent judge -----------------------------------------------------------------------------------------


class Judge:
    """Reads Redis directly and compares with values computed here from the rows (never the engine's)."""

    def __init__(self, client: aioredis.Redis, expected: dict[str, str], total: int) -> None:
        self.c = client
        self.expected = expected  # path -> the exact value a worker must read
        self.total = total
        self.top = 0  # the highest manifest generation before the fault (for the generation classes)

    async def content_ok(self, path: str) -> bool:
        want = self.expected[path]
        async with self.c.pipeline(transaction=False) as pipe:
            pipe.type(KS.content(path))
            pipe.get(KS.content(path))
            pipe.sismember(KS.index, path)
            pipe.hget(KS.manifest, path)
            kind, value, member, entry = await pipe.execute(raise_on_error=False)
        if kind != "string" or not member or not isinstance(entry, str):
            return False
        digest = json.loads(want)["hash"]
        gen, _, rest = entry.partition(":")
        return value == want and gen.isdigit() and rest == f"{digest}:{len(want.encode())}"

    async def not_member(self, name: str) -> bool:
        return not await self.c.sismember(KS.index, name)

    async def generation_ok(self) -> bool:
        value = await self.c.get(KS.generation)
        return isinstance(value, str) and value.isdigit() and int(value) >= self.top

    async def complete(self) -> bool:
        async with self.c.pipeline(transaction=False) as pipe:
            pipe.scard(KS.index)
            pipe.hlen(KS.manifest)
            pipe.dbsize()
            index, manifest, size = await pipe.execute(raise_on_error=False)
        return index == self.total and manifest == self.total and isinstance(size, int) and size >= self.total

    async def top_generation(self) -> int:
        top = 0
        async for _, value in self.c.hscan_iter(KS.manifest, count=10_000):
            gen = value.partition(":")[0]
            top = max(top, int(gen)) if gen.isdigit() else top
        return top


class Events:
    """The judge's own keyspace subscription on the prefix: wakes checks up, and tells when the watcher is quiet."""

    def __init__(self, redis_url: str) -> None:
        self._client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        self.tick = asyncio.Event()
        self.last_s = time.perf_counter()
        self.evicted: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        await pubsub.psubscribe(KS.keyspace_pattern(0))
        self._task = asyncio.create_task(self._read(pubsub))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._client.connection_pool.disconnect()

    async def _read(self, pubsub: aioredis.client.PubSub) -> None:
        async for message in pubsub.listen():
            key = str(message["channel"]).split(":", 1)[1]
            if "modcache:probe:" in key or key.endswith("modcache:canary"):
                continue  # the watcher's probe refreshes its own key every 0.1 s
            if message["data"] == "evicted":
                self.evicted.append(key)
            self.last_s = time.perf_counter()
            self.tick.set()

    async def until(self, check: Check, started: float) -> float:
        """Seconds from ``started`` until ``check`` passes, re-checked on every event."""
        deadline = started + WAIT_S
        while True:
            self.tick.clear()
            if await _answered(check):
                return time.perf_counter() - started
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise SystemExit("a fault was not repaired within the bound")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.tick.wait(), min(remaining, 1.0))

    async def quiet(self) -> None:
        """Until no event has arrived for ``QUIET_S`` (the previous repair is over)."""
        while (left := QUIET_S - (time.perf_counter() - self.last_s)) > 0:
            self.tick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.tick.wait(), left)


async def poll(check: Check, started: float) -> float:
    while not await _answered(check):
        if time.perf_counter() - started > WAIT_S:
            raise SystemExit("the cache was not refilled within the bound")
        await asyncio.sleep(0.02)  # the whole cache is being rewritten: poll a cheap count, every 20 ms
    return time.perf_counter() - started


async def _answered(check: Check) -> bool:
    """The check's answer; False while the server cannot answer (restarting, loading its snapshot)."""
    try:
        return await check()
    except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError, OSError):
        return False


# -- the fault classes -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Bench:
    client: aioredis.Redis
    judge: Judge
    events: Events
    server: Server
    database_url: str
    rng: random.Random
    paths: list[str]

    def pick(self) -> str:
        return self.rng.choice(self.paths)

    async def timed(self, inject: Callable[[], Awaitable[object]], check: Check) -> float:
        await self.events.quiet()
        started = time.perf_counter()
        await inject()
        return await self.events.until(check, started)

    async def content(self, fault: str) -> float:
        path, c = self.pick(), self.client
        key = KS.content(path)
        commands: dict[str, Callable[[], Awaitable[object]]] = {
            "SET": lambda: c.set(key, "garbage"),
            "SETEX": lambda: c.setex(key, 100, json.dumps({"content": "evil", "path": path, "hash": "0" * 64})),
            "APPEND": lambda: c.append(key, " "),
            "SETRANGE (same length)": lambda: c.setrange(key, 20, "#"),
            "DEL": lambda: c.delete(key),
            "EXPIRE -> expired": lambda: c.pexpire(key, 1),
            "wrong type (HSET)": lambda: c.eval(
                "redis.call('DEL', KEYS[1]) return redis.call('HSET', KEYS[1], 'a', 'b')", 1, key
            ),
        }
        return await self.timed(commands[fault], lambda: self.judge.content_ok(path))

    async def rename(self) -> float:
        a, b = self.pick(), self.pick()
        while b == a:
            b = self.pick()

        async def both() -> bool:
            return await self.judge.content_ok(a) and await self.judge.content_ok(b)

        return await self.timed(lambda: self.client.rename(KS.content(a), KS.content(b)), both)

    async def evicted(self) -> float:
        """A few random keys evicted (allkeys-random, maxmemory just below what is used, restored by the next
        command of the same pipeline; Redis evicts before a command, never inside MULTI or a script): the keys are
        learnt from the ``evicted`` events."""
        await self.events.quiet()
        used = int((await self.client.info("memory"))["used_memory"])
        self.events.evicted.clear()
        started = time.perf_counter()
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.config_set("maxmemory", str(used - 12_000))
            pipe.set("bench:evict", "x")
            pipe.config_set("maxmemory", "0")
            await pipe.execute()
        while not self.events.evicted:  # the judge learns which keys went from their ``evicted`` events
            self.events.tick.clear()
            await asyncio.wait_for(self.events.tick.wait(), WAIT_S)
        evicted = [p for k in self.events.evicted if (p := KS.path_of(k)) is not None]

        async def all_back() -> bool:
            return all([await self.judge.content_ok(p) for p in evicted])

        return await self.events.until(all_back, started)

    async def index(self, fault: str) -> float:
        path, c = self.pick(), self.client
        if fault == "SREM":
            return await self.timed(lambda: c.srem(KS.index, path), lambda: self.judge.content_ok(path))
        if fault == "SADD (no such module)":
            return await self.timed(
                lambda: c.sadd(KS.index, "ghost/never.py"), lambda: self.judge.not_member("ghost/never.py")
            )
        if fault == "SADD (not a path)":
            return await self.timed(
                lambda: c.sadd(KS.index, "modcache:generation"), lambda: self.judge.not_member("modcache:generation")
            )
        return await self.timed(lambda: c.delete(KS.index), self.judge.complete)

    async def manifest(self, fault: str) -> float:
        path, c = self.pick(), self.client
        if fault == "HSET (forged fence)":
            return await self.timed(lambda: c.hset(KS.manifest, path, FORGED), lambda: self.judge.content_ok(path))
        if fault == "HDEL":
            return await self.timed(lambda: c.hdel(KS.manifest, path), lambda: self.judge.content_ok(path))
        return await self.timed(lambda: c.delete(KS.manifest), self.judge.complete)

    async def generation(self, fault: str) -> float:
        self.judge.top = await self.judge.top_generation()
        c = self.client
        inject = {
            "SET abc": lambda: c.set(KS.generation, "abc"),
            "SET 5 (low)": lambda: c.set(KS.generation, "5"),
            "DEL": lambda: c.delete(KS.generation),
        }[fault]
        return await self.timed(inject, self.judge.generation_ok)

    async def whole(self, fault: str) -> float:
        await self.events.quiet()
        fault_at = _now()
        started = time.perf_counter()
        if fault == "FLUSHDB":
            await self.client.flushdb()
        elif fault == "FLUSHALL":
            await self.client.flushall()
        else:  # restart without persistence: the server comes back empty
            started = await self._restart(keep_snapshot=False)
        took = await poll(self.judge.complete, started)
        if fault == "restart":
            await self._resubscribe()
        await self._deep_done(fault_at)
        return took

    async def lossy(self) -> float:
        """A failover/restart that lost writes: a snapshot is taken, one module is updated (and cached), then the
        server restarts from the snapshot, which still holds the old version."""
        path = self.pick()
        await self.events.quiet()
        saver = aioredis.Redis.from_url(self.server.url, socket_timeout=300)  # writing 400 MB takes a while
        try:
            await saver.save()
        finally:
            await saver.aclose()
        conn = await asyncpg.connect(self.database_url)
        try:
            content = f"# updated {time.time_ns()}\n"
            digest = _sha(content)
            await conn.execute(
                "UPDATE workspace_files SET content = $2, content_hash = $3 WHERE path = $1", path, content, digest
            )
        finally:
            await conn.close()
        self.judge.expected[path] = json.dumps({"content": content, "path": path, "hash": digest})
        await self.events.until(lambda: self.judge.content_ok(path), time.perf_counter())
        fault_at = _now()
        started = await self._restart(keep_snapshot=True)
        took = await poll(lambda: self.judge.content_ok(path), started)
        await self._resubscribe()
        await self._deep_done(fault_at)
        return took

    async def _deep_done(self, fault_at: datetime.datetime) -> None:
        """Wait (untimed) for the deep resync a replaced or reconnected cache gets after its refill: it writes no
        key until it ends, so the quiet wait cannot see it, and the next sample must not queue behind it."""
        await poll(lambda: self._deep_since(fault_at), time.perf_counter())

    async def _deep_since(self, fault_at: datetime.datetime) -> bool:
        status = await self.client.hgetall(KS.status)
        stamp = status.get("last_success_at")
        return status.get("deep") == "1" and stamp is not None and datetime.datetime.fromisoformat(stamp) >= fault_at

    async def _restart(self, *, keep_snapshot: bool) -> float:
        await self.events.stop()
        self.server.stop(keep_snapshot=keep_snapshot)
        started = time.perf_counter()
        self.server.start()
        await self.client.connection_pool.disconnect()
        return started

    async def _resubscribe(self) -> None:
        self.events = Events(self.server.url)
        await self.events.start()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


SINGLE = [
    ("content", "SET"),
    ("content", "SETEX"),
    ("content", "APPEND"),
    ("content", "SETRANGE (same length)"),
    ("content", "DEL"),
    ("content", "EXPIRE -> expired"),
    ("content", "wrong type (HSET)"),
    ("content", "RENAME"),
    ("content", "EVICTED"),
    ("index", "SREM"),
    ("index", "SADD (no such module)"),
    ("index", "SADD (not a path)"),
    ("manifest", "HSET (forged fence)"),
    ("manifest", "HDEL"),
    ("generation", "SET abc"),
    ("generation", "SET 5 (low)"),
    ("generation", "DEL"),
]
WHOLE_KEY = [("index", "DEL"), ("manifest", "DEL")]
WHOLE = [("cache", "FLUSHDB"), ("cache", "FLUSHALL"), ("cache", "restart"), ("cache", "lossy restart")]


async def _one(b: Bench, group: str, fault: str) -> float:
    if group == "content":
        return await (b.rename() if fault == "RENAME" else b.evicted() if fault == "EVICTED" else b.content(fault))
    if group == "index":
        return await b.index(fault)
    if group == "manifest":
        return await b.manifest(fault)
    if group == "generation":
        return await b.generation(fault)
    return await (b.lossy() if fault == "lossy restart" else b.whole(fault))


async def _expected(database_url: str) -> dict[str, str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT path, content, content_hash FROM workspace_files WHERE entity_type = 'module'")
    finally:
        await conn.close()
    return {p: json.dumps({"content": c, "path": p, "hash": h}) for p, c, h in rows}


async def _verify_all(client: aioredis.Redis, expected: dict[str, str]) -> int:
    """Every content key compared byte for byte with what the judge computed (untimed); returns the mismatches."""
    paths, wrong = list(expected), 0
    for start in range(0, len(paths), 2000):
        batch = paths[start : start + 2000]
        values = await client.mget([KS.content(p) for p in batch])
        wrong += sum(1 for p, v in zip(batch, values, strict=True) if v != expected[p])
    return wrong


async def _naive_s(database_url: str, redis_url: str, client: aioredis.Redis, path: str) -> float:
    """The repair without events: a full resync after the fault (what a periodic or per-message sync does)."""
    async with sup.modcache_engine(database_url, redis_url) as eng:
        await client.delete(KS.content(path))
        started = time.perf_counter()
        await eng.full_resync()
        return time.perf_counter() - started


async def bench(args: argparse.Namespace) -> None:
    only = set(args.only.split(",")) if args.only else None
    results: list[tuple[str, list[float], float]] = []
    with private_server() as server, tempfile.TemporaryDirectory() as tmp:
        async with sup.bench_database() as database_url:
            await sup.print_machine_info(database_url=database_url, redis_url=server.url)
            load_s = await sup.load_modules(database_url, args.modules)
            print(f"fixture: {args.modules} modules x {sup.MODULE_BYTES} B loaded server-side in {load_s:.1f} s")
            expected = await _expected(database_url)
            client = aioredis.Redis.from_url(server.url, decode_responses=True)
            await client.config_set("maxmemory-policy", "allkeys-random")
            judge = Judge(client, expected, args.modules)
            events = Events(server.url)
            await events.start()
            log = Path(tmp) / "watch.log"
            try:
                with sync_watch(database_url, server.url, log):
                    started = time.perf_counter()
                    await poll(judge.complete, started)
                    print(f"modcache sync --watch filled the cache in {time.perf_counter() - started:.1f} s\n")
                    b = Bench(client, judge, events, server, database_url, random.Random(9), sorted(expected))
                    plan = [(g, f, args.samples) for g, f in SINGLE]
                    plan += [(g, f, args.slow_samples) for g, f in WHOLE_KEY]
                    plan += [(g, f, args.whole_samples) for g, f in WHOLE]
                    for group, fault, n in plan:
                        label = f"{group}: {fault}"
                        if only and fault not in only and group not in only:
                            continue
                        times = [await _one(b, group, fault) for _ in range(n)]
                        target = TARGET_SINGLE_MS if (group, fault) in SINGLE else TARGET_ANY_MS
                        results.append((label, times, target))
                        sup.summary(label, times, target)
                    await b.events.quiet()
                wrong = await _verify_all(client, judge.expected)
                print(f"\nafterwards: {wrong} content keys differ from the rows (compared byte for byte)")
                naive = await _naive_s(database_url, server.url, client, sorted(expected)[0])
            finally:
                await b.events.stop() if "b" in locals() else await events.stop()
                await client.aclose()
                if args.log:
                    print(log.read_text()[-5000:])
    print(f"\nresults ({args.modules} modules x {sup.MODULE_BYTES} B, `modcache sync --watch`, default settings):")
    for label, times, target in results:
        sup.summary(label, times, target)
    print(f"  naive (no events: repaired by the next full sync): one full resync takes {naive:.2f} s, after waiting")
    print("  up to resync_interval_s (300 s by default); the original plan's per-message sync takes ~15 s at this size")


def main() -> None:
    parser = argparse.ArgumentParser(prog="./dev bench core_faults")
    parser.add_argument("--modules", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=30, help="samples per single-key class")
    parser.add_argument("--slow-samples", type=int, default=5, help="samples of DEL index / DEL manifest")
    parser.add_argument("--whole-samples", type=int, default=2, help="samples per whole-cache class")
    parser.add_argument("--only", default="", help="comma-separated fault names or groups")
    parser.add_argument("--log", action="store_true", help="print the end of the watcher's log")
    args = parser.parse_args()
    asyncio.run(asyncio.wait_for(bench(args), BOUND_S))


if __name__ == "__main__":
    main()
