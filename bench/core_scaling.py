"""Scaling of the full resync: 10k / 100k / 1M modules, cold fill, drifted and no-drift resync, peak RSS, one table.

For each size: a throw-away PostgreSQL database and a private redis-server; one child process
(``bench._scale_child``) runs, on one Engine built as production builds it: a cold fill, then for ``--runs`` rounds a
1 % drift (missing, stale, orphaned, laid down Redis-side) and its full resync, then a no-drift full resync; it
reports the times and its own peak RSS (``ru_maxrss``: the sync's working set plus the interpreter). The last line
compares each size's cost per module with the smallest size's: growth no worse than linear keeps it near 1.

    ./dev bench core_scaling [--sizes 10000,100000,1000000] [--bytes 4096,4096,512] [--runs 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import _support as sup

BOUND_S = 3600
ROOT = Path(__file__).resolve().parent.parent


async def _one(size: int, module_bytes: int, runs: int) -> dict[str, Any]:
    with sup.private_redis() as redis_url:
        async with sup.bench_database() as database_url:
            load_s = await sup.load_modules(database_url, size, size_bytes=module_bytes)
            print(f"  {size} modules x {module_bytes} B loaded in {load_s:.1f} s", flush=True)
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "bench._scale_child", database_url, redis_url, str(size), str(runs)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=False,
            )
    if done.returncode != 0:
        raise SystemExit(f"scaling child failed:\n{done.stderr[-8000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def bench(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    sizes_b = [int(b) for b in args.bytes.split(",")]
    with sup.private_redis() as redis_url:
        async with sup.bench_database() as database_url:
            await sup.print_machine_info(database_url=database_url, redis_url=redis_url)
    rows = []
    for size, module_bytes in zip(sizes, sizes_b, strict=True):
        rows.append((size, module_bytes, await _one(size, module_bytes, args.runs)))
        print(f"  {size} modules: {json.dumps(rows[-1][2])}", flush=True)  # kept if a larger size fails
    print(f"\nresults (medians of {args.runs} drifted runs; 1 % missing + 1 % stale + 1 % orphaned):")
    print(f"  {'modules':>9} {'bytes':>6} {'cold fill':>10} {'drifted':>9} {'no drift':>9} {'peak RSS':>9}  per module")
    base = None
    for size, module_bytes, r in rows:
        per = r["drifted_s"] / size * 1e6
        base = base or per
        print(
            f"  {size:>9} {module_bytes:>6} {r['cold_s']:>9.2f}s {r['drifted_s']:>8.2f}s {r['clean_s']:>8.2f}s "
            f"{r['peak_rss_bytes'] / 2**20:>6.0f} MiB  drifted {per:.1f} us ({per / base:.2f}x of the smallest)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="./dev bench core_scaling")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--bytes", default="4096,4096,512", help="module size per size (1M may use 512-byte modules)")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()
    asyncio.run(asyncio.wait_for(bench(args), BOUND_S))
    print(f"(benchmark took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
