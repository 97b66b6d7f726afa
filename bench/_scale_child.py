"""Child process for ``core_scaling``: cold fill, drifted resyncs, a no-drift resync; prints times and peak RSS.

Run as ``python -m bench._scale_child DATABASE_URL REDIS_URL MODULES RUNS``; prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import resource
import statistics
import sys
import time

import redis.asyncio as aioredis

from bench import _support as sup


async def _run(database_url: str, redis_url: str, modules: int, runs: int) -> dict[str, float]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        async with sup.modcache_engine(database_url, redis_url) as eng:
            started = time.perf_counter()
            await eng.full_resync()
            cold_s = time.perf_counter() - started
            drift = sup.Drift(count=modules, ratio=0.01)
            drifted = []
            for _ in range(runs):
                await drift.apply(client, eng.cache.keyspace)
                started = time.perf_counter()
                report = await eng.full_resync()
                drifted.append(time.perf_counter() - started)
                if not report.plan:
                    raise SystemExit("the drift was not seen")
            started = time.perf_counter()
            clean = await eng.full_resync()
            clean_s = time.perf_counter() - started
            if clean.plan:
                raise SystemExit(f"not converged: {clean.plan.describe()}")
    finally:
        await client.aclose()
    return {"cold_s": cold_s, "drifted_s": statistics.median(drifted), "clean_s": clean_s}


def main() -> None:
    database_url, redis_url, modules, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    result: dict[str, float] = asyncio.run(_run(database_url, redis_url, modules, runs))
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
