"""Full resync at scale: modcache's ``Engine.full_resync`` vs. the original plan's algorithm, same data, same drift.

Fixture: N live modules x 4 KiB (default 100,000) generated in a throw-away PostgreSQL database, cached in a
private redis-server. Drift (Redis-side, laid down identically before every timed run): 1% missing (content
key deleted, index entry kept), 1% stale (an older version in the content key), 1% orphaned (content key +
index entry for a module no longer in the source).

Measures: the original plan's ``_sync_module_cache`` (rows with content through the ORM, one EXISTS per module) once;
modcache several times (median); what drift each leaves behind; then a no-drift verification, proving it
writes nothing (generation unchanged, no module write command in Redis's commandstats).

    ./dev bench core_full_resync [--modules N] [--runs R] [--naive-runs R]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import redis.asyncio as aioredis

from bench import _support as sup
from modcache import engine, plan

TARGET_DRIFT_S = 1.0
TARGET_SPEEDUP = 20.0
TARGET_NO_DRIFT_S = 0.5
DRIFT_RATIO = 0.01
BOUND_S = 600


def _counts(report: plan.Report) -> str:
    counts = {r.value: n for r, n in report.plan.counts().items() if n}
    return ", ".join(f"{n} {r}" for r, n in counts.items()) or "none"


async def _converge(eng: engine.Engine) -> None:
    """Bring the cache back to converged (untimed) and make sure it is."""
    await eng.full_resync()
    left = await eng.full_resync(dry_run=True)
    if left.plan:
        raise SystemExit(f"cache did not converge: {_counts(left)}")


async def _naive(
    args: argparse.Namespace,
    eng: engine.Engine,
    client: aioredis.Redis,
    drift: sup.Drift,
    database_url: str,
    redis_url: str,
) -> float:
    consumer = sup.PlanConsumer(database_url=database_url, redis_url=redis_url)
    times = []
    try:
        await consumer.warm_up()
        for _ in range(args.naive_runs):
            await _converge(eng)
            await drift.apply(client, eng.cache.keyspace)
            started = time.perf_counter()
            added = await consumer.sync_module_cache()
            times.append(time.perf_counter() - started)
            left = await eng.full_resync(dry_run=True)
            drift = f"re-cached {added}; drift left: {_counts(left)}"
            sup.row("original plan's algorithm", f"{times[-1]:.3f} s", "", drift)
    finally:
        await consumer.close()
    return sup.median(times)


async def _ours(args: argparse.Namespace, eng: engine.Engine, client: aioredis.Redis, drift: sup.Drift) -> float:
    times = []
    for _ in range(args.runs):
        await _converge(eng)
        await drift.apply(client, eng.cache.keyspace)
        started = time.perf_counter()
        report = await eng.full_resync()
        times.append(time.perf_counter() - started)
        left = await eng.full_resync(dry_run=True)
        sup.row("modcache full_resync", f"{times[-1]:.3f} s", "", f"repaired {_counts(report)}; left: {_counts(left)}")
    return sup.median(times)


async def _no_drift(args: argparse.Namespace, eng: engine.Engine, client: aioredis.Redis) -> float:
    await _converge(eng)
    await eng.full_resync()  # the status record says the last resync found no drift (a resync after drift records that)
    times = []
    for _ in range(args.runs):
        generation = await eng.cache.generation()
        await client.config_resetstat()
        started = time.perf_counter()
        report = await eng.full_resync()
        times.append(time.perf_counter() - started)
        calls = await sup.command_calls(client)
        writes = await sup.write_commands(client, calls)
        unchanged = await eng.cache.generation() == generation
        sup.row(
            "no-drift verification",
            f"{times[-1]:.3f} s",
            "",
            f"plan: {_counts(report)}; generation unchanged: {unchanged}; write commands: {writes or 'none'}",
        )
        if not unchanged or writes or report.plan:
            raise SystemExit("a no-drift resync wrote to the cache")
    return sup.median(times)


async def bench(args: argparse.Namespace) -> None:
    with sup.private_redis() as redis_url:
        async with sup.bench_database() as database_url:
            await sup.print_machine_info(database_url=database_url, redis_url=redis_url)
            load_s = await sup.load_modules(database_url, args.modules)
            print(f"fixture: {args.modules} modules x {sup.MODULE_BYTES} B loaded server-side in {load_s:.1f} s")
            client = aioredis.Redis.from_url(redis_url, decode_responses=True)
            try:
                async with sup.modcache_engine(database_url, redis_url) as eng:
                    cold = await eng.full_resync()
                    print(f"cache filled from cold by modcache in {cold.duration_s:.2f} s ({_counts(cold)})")
                    drift = sup.Drift(count=args.modules, ratio=DRIFT_RATIO)
                    print(f"drift per run: {drift.describe()}\n")
                    naive_s = await _naive(args, eng, client, drift, database_url, redis_url)
                    ours_s = await _ours(args, eng, client, drift)
                    clean_s = await _no_drift(args, eng, client)
            finally:
                await client.aclose()
    speedup = naive_s / ours_s
    print(f"\nresults ({args.modules} modules; medians; modcache runs={args.runs}, plan runs={args.naive_runs}):")
    sup.row("original plan's algorithm, drifted", f"{naive_s:.3f} s")
    sup.row(
        "modcache full_resync, drifted",
        f"{ours_s:.3f} s",
        f"<= {TARGET_DRIFT_S} s",
        sup.verdict(ours_s, TARGET_DRIFT_S),
    )
    sup.row(
        "speedup", f"{speedup:.1f}x", f">= {TARGET_SPEEDUP:.0f}x", sup.verdict(speedup, TARGET_SPEEDUP, at_least=True)
    )
    sup.row(
        "modcache no-drift verification (0 writes)",
        f"{clean_s:.3f} s",
        f"<= {TARGET_NO_DRIFT_S} s",
        sup.verdict(clean_s, TARGET_NO_DRIFT_S),
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="./dev bench core_full_resync")
    parser.add_argument("--modules", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5, help="timed modcache runs (median reported)")
    parser.add_argument("--naive-runs", type=int, default=1, help="timed runs of the original plan's algorithm")
    args = parser.parse_args()
    asyncio.run(asyncio.wait_for(bench(args), BOUND_S))


if __name__ == "__main__":
    main()
