"""Cold cache: FLUSHDB, then restore 100,000 modules x 4 KiB; time and peak RSS of the syncing process.

Each sync runs in a child process of its own (``bench._sync_child``), so its peak RSS (``ru_maxrss``, checked
against ``RUSAGE_CHILDREN`` here) is the sync's alone. modcache streams content in batches (read a batch,
write it while the next is read); the original plan's algorithm loads every row with content at once, then writes the
missing ones one round trip at a time. Both restore the same FLUSHDB'd cache from the same database.

    ./dev bench core_cold [--modules N] [--no-plan]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench import _support as sup

TARGET_S = 10.0
TARGET_RSS_BYTES = 300 * 1024 * 1024
CHILD_TIMEOUT_S = 300
BOUND_S = 900
MIB = 1024 * 1024


def _run_child(approach: str, database_url: str, redis_url: str) -> dict[str, Any]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run(
        [sys.executable, "-m", "bench._sync_child", approach, database_url, redis_url],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{approach} sync failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["children_max_rss_bytes"] = after * 1024 if after > before else None  # None: not a new maximum
    return result


async def _flush_and_restore(approach: str, database_url: str, redis_url: str) -> dict[str, Any]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await client.flushdb()
        result = await asyncio.to_thread(_run_child, approach, database_url, redis_url)
        result["keys_after"] = await client.dbsize()
    finally:
        await client.aclose()
    async with sup.modcache_engine(database_url, redis_url) as eng:
        left = await eng.full_resync(dry_run=True)
    result["drift_left"] = {r.value: n for r, n in left.plan.counts().items() if n}
    return result


def _show(label: str, result: dict[str, Any]) -> None:
    rss = result["peak_rss_bytes"] / MIB
    left = result["drift_left"] or "none"
    detail = f"(process {result['process_s']:.2f} s; {result['keys_after']} keys; drift left: {left})"
    sup.row(label, f"{result['sync_s']:.2f} s", f"peak RSS {rss:.0f} MiB", detail)


async def bench(args: argparse.Namespace) -> None:
    with sup.private_redis() as redis_url:
        async with sup.bench_database() as database_url:
            await sup.print_machine_info(database_url=database_url, redis_url=redis_url)
            load_s = await sup.load_modules(database_url, args.modules)
            print(f"fixture: {args.modules} modules x {sup.MODULE_BYTES} B loaded server-side in {load_s:.1f} s")
            warm = await _flush_and_restore("modcache", database_url, redis_url)  # warms PostgreSQL's caches
            _show("modcache, first fill (warm-up)", warm)
            ours = await _flush_and_restore("modcache", database_url, redis_url)
            _show("modcache, FLUSHDB -> restored", ours)
            theirs = await _flush_and_restore("plan", database_url, redis_url) if args.plan else None
            if theirs is not None:
                _show("original plan's algorithm, FLUSHDB -> restored", theirs)
    print(f"\nresults ({args.modules} modules x {sup.MODULE_BYTES} B, cold cache after FLUSHDB, one child each):")
    if theirs is not None:
        sup.row("original plan's algorithm: restore time", f"{theirs['sync_s']:.2f} s")
        sup.row("original plan's algorithm: peak RSS", f"{theirs['peak_rss_bytes'] / MIB:.0f} MiB")
    sup.row(
        "modcache: restore time",
        f"{ours['sync_s']:.2f} s",
        f"<= {TARGET_S:.0f} s",
        sup.verdict(ours["sync_s"], TARGET_S),
    )
    sup.row(
        "modcache: peak RSS of the syncing process",
        f"{ours['peak_rss_bytes'] / MIB:.0f} MiB",
        f"<= {TARGET_RSS_BYTES // MIB} MiB",
        sup.verdict(ours["peak_rss_bytes"], TARGET_RSS_BYTES),
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="./dev bench core_cold")
    parser.add_argument("--modules", type=int, default=100_000)
    parser.add_argument("--no-plan", dest="plan", action="store_false", help="skip the original plan's algorithm")
    args = parser.parse_args()
    started = time.perf_counter()
    asyncio.run(asyncio.wait_for(bench(args), BOUND_S))
    print(f"(benchmark took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
