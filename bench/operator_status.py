"""Status writes per hour in steady state, and the time from a source change to the status reflecting it.

The operator runs in-process (kopf against the emulated API, real PostgreSQL and Redis) over 1,000 modules with
``resyncInterval: 10s`` (the CRD's minimum, so many resyncs fit in the run) and its default status throttle.

* Steady state, no drift: every status write is counted for ``OBSERVE_S``; the naive way, measured in the same
  run, is one write per resync (what an operator that writes on every resync does: the resync count).
* Change -> status: a module is inserted with SQL, and the clock stops when ``status.sourceModules`` shows it
  (NOTIFY -> incremental sync -> status write). The naive way: a timer-driven loop (full resync + status write
  every ``NAIVE_INTERVAL_S``), measured on the same kind of change.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import asyncpg

from bench import _operator_kit as kit
from modcache import db, engine, keys, modules, pgsource, rediscache
from modcache_operator import credentials, kube, tunables

MODULES = 1_000
OBSERVE_S = 65.0
CHANGES = 30
NAIVE_CHANGES = 5
NAIVE_INTERVAL_S = 2.0
CONFIG = tunables.Tunables()  # the defaults a deployment runs with


def main() -> None:
    asyncio.run(run())


async def run() -> None:
    from operatorkit.cluster import OperatorThread  # the tests' harness: kopf in a thread of its own

    print(await kit.machine_info())
    async with kit.scratch_database() as database, kit.scratch_prefix() as prefix, kit.emulated_api() as api:
        emulator, api_url = api
        await kit.load_modules(database, MODULES, 1024)
        thread = OperatorThread(api_url, config=CONFIG, namespaces=(kit.NAMESPACE,))
        await asyncio.to_thread(thread.start)
        try:
            cluster = kit.Cluster(emulator=emulator, operator=thread.operator, ports=thread.ports)  # type: ignore[arg-type]
            await cluster.apply_secret("urls", {"database": database, "redis": kit.service_url("redis")})
            await cluster.create_cache("main", kit.spec(prefix, resyncInterval="10s"))
            await cluster.wait_for(lambda: cluster.ready("main"), "Ready", timeout_s=60)
            await _steady_state(cluster)
            ours = await _change_latency(cluster, database, "main", CHANGES)
        finally:
            await asyncio.to_thread(thread.stop)
        naive = await _naive_latency(cluster, api_url, database, prefix)
    _report_latency("ours ", ours)
    _report_latency("naive", naive, f"(timer-driven, full resync + status write every {NAIVE_INTERVAL_S:.0f}s)")


async def _steady_state(cluster: kit.Cluster) -> None:
    await asyncio.sleep(2)  # let the start-up writes settle
    versions = len(cluster.history("main"))
    resyncs_before = _resyncs(cluster)
    await asyncio.sleep(OBSERVE_S)  # the measurement: count what happens in this window
    writes = len(cluster.history("main")) - versions
    resyncs = _resyncs(cluster) - resyncs_before
    per_hour = 3600 / OBSERVE_S
    print(f"steady state over {OBSERVE_S:.0f}s, resyncInterval 10s, {MODULES:,} modules, no drift:")
    print(f"  ours : {writes} status writes ({writes * per_hour:.0f}/h; throttle: one lastSyncTime per "
          f"{CONFIG.timestamp_interval_s:.0f}s -> at most {3600 / CONFIG.timestamp_interval_s:.0f}/h)")  # fmt: skip
    print(f"  naive: {resyncs} full resyncs -> {resyncs} writes ({resyncs * per_hour:.0f}/h, one per resync)")


def _resyncs(cluster: kit.Cluster) -> int:
    registry = cluster.operator.metrics.registry
    total = 0.0
    for trigger in ("periodic", "retry", "manual", "connect", "reconnect"):
        labels = {"namespace": kit.NAMESPACE, "name": "main", "trigger": trigger, "result": "success"}
        total += registry.get_sample_value("modcache_reconciles_total", labels) or 0.0
    return int(total)


async def _change_latency(cluster: kit.Cluster, database: str, name: str, changes: int) -> list[float]:
    conn = await asyncpg.connect(database)
    timings = []
    try:
        for n in range(changes):
            before = cluster.status(name)["sourceModules"]
            started = time.perf_counter()
            await _insert(conn, f"new/{name}_{n}.py")
            while cluster.status(name).get("sourceModules") != before + 1:  # noqa: ASYNC110 -- 1 ms resolution
                await asyncio.sleep(0.001)
            timings.append(time.perf_counter() - started)
    finally:
        await conn.close()
    return timings


async def _insert(conn: asyncpg.Connection, path: str) -> None:
    raw = f"PATH = {path!r}\n".encode()
    await conn.execute(
        "INSERT INTO workspace_files (path, content, content_hash, size_bytes, entity_type)"
        " VALUES ($1, $2, $3, $4, 'module')",
        path, raw.decode(), modules.content_hash(raw), len(raw),
    )  # fmt: skip


async def _naive_latency(cluster: kit.Cluster, api_url: str, database: str, prefix: str) -> list[float]:
    """A naive operator: every NAIVE_INTERVAL_S, a full resync and an unconditional status write."""
    await cluster.create_cache("naive", kit.spec(prefix.replace("bifrost:", "naive:"), suspend=True))
    api = kube.KubeApi(credentials=credentials.Credentials(server=api_url))
    source = pgsource.PgSource(engine=db.make_engine(database))
    cache = rediscache.RedisCache.from_url(
        kit.service_url("redis"), keyspace=keys.KeySpace(prefix.replace("bifrost:", "naive:"))
    )
    core = engine.Engine(source=source, cache=cache)

    async def loop() -> None:
        while True:
            report = await core.full_resync()
            await api.patch_status(kit.NAMESPACE, "naive", {"sourceModules": report.source_count})
            await asyncio.sleep(NAIVE_INTERVAL_S)

    task = asyncio.create_task(loop())
    try:
        await cluster.wait_for(lambda: "sourceModules" in cluster.status("naive"), "the naive loop", timeout_s=60)
        return await _change_latency(cluster, database, "naive", NAIVE_CHANGES)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await source.close()
        await cache.close()
        await api.close()


def _report_latency(who: str, timings: list[float], note: str = "(NOTIFY -> incremental sync -> status)") -> None:
    ms = sorted(t * 1000 for t in timings)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    print(f"change -> status {who}: p50 {statistics.median(ms):.0f} ms, p99 {p99:.0f} ms, max {ms[-1]:.0f} ms "
          f"over {len(ms)} inserts {note}")  # fmt: skip
