"""The convergence core on Redis Sentinel and Redis Cluster beside one node, in the same run (issue 11).

Fixture: N modules x 4 KiB (default 10,000) in one throw-away PostgreSQL database; three private Redis topologies
started with the tests' helpers (``tests/testkit/topologies.py``): one redis-server; one master + one replica +
three sentinels (``redis+sentinel://``); three masters with a replica each (``redis+cluster://``). Every topology
uses the same hash-tagged prefix ``{bifrost}:module:`` (the cluster needs it) and is built by ``wiring`` from its
URL, as the CLI and the operator build it.

Per topology:

* **full resync**: cold (empty cache: every module written) and warm (nothing to do: the routine check of every
  key), median of ``--runs``;
* **change -> cache**: a Watcher runs in this process; ``--changes`` single-row UPDATEs are committed one at a
  time, and the latency is from sending the statement to the watcher's report that the write script applied the
  path (its observer is called once Redis acknowledged the write: no polling);
* **planned failover** (Sentinel only): ``SENTINEL FAILOVER`` with the watcher running; once every sentinel names
  the new master, one change is committed; the time is from the failover to that change being on the new master
  (read there every 10 ms: nothing announces a key's arrival on one node).

    ./dev bench core_topologies [--modules N] [--changes N] [--runs R]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import random
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from bench import _support as sup
from modcache import errors, plan, settings, wiring

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from testkit import topologies  # the tests' private topologies, reused as they are

PREFIX = "{bifrost}:module:"
WAIT_S = 10.0
BOUND_S = 900
UPDATE_SQL = "UPDATE workspace_files SET content = $2, content_hash = $3, size_bytes = $4 WHERE path = $1"


class Applied:
    """A watcher observer that resolves a future when a path was written by the watcher."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self.fulls = asyncio.Event()
        self.keyspace = asyncio.Event()

    def expect(self, path: str) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting[path] = future
        return future

    def on_sync(self, report: plan.Report, trigger: str) -> None:
        now = time.perf_counter()
        if report.full:
            self.fulls.set()
        for item in report.plan.items:
            future = self.waiting.pop(item.path, None)
            if future is not None and not future.done():
                future.set_result(now)

    def on_sync_failed(self, error: errors.ModcacheError, trigger: str) -> None:
        print(f"  (sync {trigger} failed: {error})")

    def on_listener(self, connected: bool, detail: str) -> None: ...

    def on_keyspace(self, active: bool, detail: str) -> None:
        if active:
            self.keyspace.set()


@contextlib.contextmanager
def topology(name: str) -> Iterator[tuple[str, topologies.Sentinel | None]]:
    """The Redis URL of a private topology of kind ``name`` (and the Sentinel topology itself, to fail it over)."""
    if name == "single":
        with sup.private_redis() as url:
            yield url, None
    elif name == "sentinel":
        with topologies.sentinel_redis() as sentinel:
            yield sentinel.url(), sentinel
    else:
        with topologies.redis_cluster() as cluster:
            yield cluster.url(), None


def _revision(path: str, n: int) -> tuple[str, str, int]:
    text = (f"# {path} revision {n}\n" + "VALUE = 1  # padding\n" * 200)[: sup.MODULE_BYTES - 1] + "\n"
    raw = text.encode()
    return text, hashlib.sha256(raw).hexdigest(), len(raw)


async def _full_resyncs(wired: wiring.Wired, runs: int) -> tuple[float, float]:
    cold, warm = [], []
    for _ in range(runs):
        await wired.cache.client.delete(*wired.cache.keyspace.bookkeeping().values())
        keys = [k async for k in wired.cache.client.scan_iter(match=wired.cache.keyspace.scan_pattern, count=5000)]
        for start in range(0, len(keys), 1000):
            await wired.cache.client.delete(*keys[start : start + 1000])
        began = time.perf_counter()
        await wired.engine.full_resync()
        cold.append(time.perf_counter() - began)
        began = time.perf_counter()
        report = await wired.engine.full_resync()
        warm.append(time.perf_counter() - began)
        if report.plan:
            raise SystemExit(f"not converged after a full resync: {report.plan.describe()}")
    return sup.median(cold), sup.median(warm)


@contextlib.asynccontextmanager
async def _watching(wired: wiring.Wired, observer: Applied) -> AsyncIterator[None]:
    w = wired.watcher(observer=observer, rng=random.Random(1))
    task = asyncio.create_task(w.run())
    try:
        await asyncio.wait_for(asyncio.gather(observer.fulls.wait(), observer.keyspace.wait()), 60)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _changes(database_url: str, observer: Applied, args: argparse.Namespace, salt: int) -> list[float]:
    writer = await asyncpg.connect(settings.asyncpg_dsn(database_url))
    latencies = []
    try:
        for n in range(args.changes + 5):  # the first 5 warm the path up and are not counted
            path = sup.module_path(n % args.modules)
            text, digest, size = _revision(path, salt * 100_000 + n)
            seen = observer.expect(path)
            sent = time.perf_counter()
            await writer.execute(UPDATE_SQL, path, text, digest, size)
            applied = await asyncio.wait_for(seen, WAIT_S)
            if n >= 5:
                latencies.append(applied - sent)
    finally:
        await writer.close()
    return latencies


async def _planned_failover(sentinel: topologies.Sentinel, wired: wiring.Wired, database_url: str, salt: int) -> float:
    """Seconds from ``SENTINEL FAILOVER`` to a change committed once the sentinels settled being on the new master."""
    began = time.perf_counter()
    old = await asyncio.to_thread(sentinel.fail_over)
    new = await asyncio.to_thread(sentinel.wait_for_new_master, old)
    path = sup.module_path(0)
    text, digest, size = _revision(path, salt * 100_000 + 99_999)
    writer = await asyncpg.connect(settings.asyncpg_dsn(database_url))
    try:
        await writer.execute(UPDATE_SQL, path, text, digest, size)
    finally:
        await writer.close()
    node = aioredis.Redis(port=new, decode_responses=True)
    try:
        while time.perf_counter() - began < 60:
            if digest in (await node.get(wired.cache.keyspace.content(path)) or ""):
                return time.perf_counter() - began
            await asyncio.sleep(0.01)
    finally:
        await node.aclose()
    raise SystemExit("the change never reached the new master within 60 s")


async def _one(
    name: str, database_url: str, args: argparse.Namespace, salt: int
) -> tuple[float, float, list[float], float | None]:
    with topology(name) as (redis_url, sentinel):
        config = settings.Settings(
            database_url=database_url,  # type: ignore[arg-type]
            redis_url=redis_url,  # type: ignore[arg-type]
            key_prefix=PREFIX,
            resync_interval_s=3600,
            deep_interval_s=3600,
        )
        async with wiring.connect(config, application_name="modcache-bench") as wired:
            cold, warm = await _full_resyncs(wired, args.runs)
            observer = Applied()
            async with _watching(wired, observer):
                latencies = await _changes(database_url, observer, args, salt)
                failover = None if sentinel is None else await _planned_failover(sentinel, wired, database_url, salt)
    return cold, warm, latencies, failover


async def bench(args: argparse.Namespace) -> None:
    async with sup.bench_database() as database_url:
        with sup.private_redis() as info_url:
            await sup.print_machine_info(database_url=database_url, redis_url=info_url)
        load_s = await sup.load_modules(database_url, args.modules)
        print(f"fixture: {args.modules} modules x {sup.MODULE_BYTES} B loaded server-side in {load_s:.1f} s")
        print(f"prefix {PREFIX!r} everywhere; {args.changes} single-row changes and {args.runs} resync runs each\n")
        results = {}
        for salt, name in enumerate(("single", "sentinel", "cluster")):
            results[name] = await _one(name, database_url, args, salt)
        print(
            f"  {'topology':<10} {'full resync cold':>17} {'warm (no drift)':>16} {'change->cache p50':>18} {'p99':>9}"
        )
        for name, (cold, warm, latencies, _) in results.items():
            ms = [v * 1000 for v in latencies]
            p50, p99 = sup.percentile(ms, 50), sup.percentile(ms, 99)
            print(f"  {name:<10} {cold:>15.3f} s {warm:>14.3f} s {p50:>15.2f} ms {p99:>6.2f} ms")
        failover = results["sentinel"][3]
        print(f"\n  Sentinel planned failover (SENTINEL FAILOVER) -> a change on the new master: {failover:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(prog="./dev bench core_topologies")
    parser.add_argument("--modules", type=int, default=10_000)
    parser.add_argument("--changes", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(asyncio.wait_for(bench(args), BOUND_S))


if __name__ == "__main__":
    main()
