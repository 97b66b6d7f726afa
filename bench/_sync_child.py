"""Child process for ``core_cold``: run one sync (modcache's or the original plan's) and print its time and peak RSS.

Run as ``python -m bench._sync_child modcache|plan DATABASE_URL REDIS_URL``; prints one JSON object. Running
in its own process makes ``ru_maxrss`` the peak of exactly this sync (plus the interpreter and imports).
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time

from bench import _support as sup


async def _modcache(database_url: str, redis_url: str) -> dict[str, object]:
    async with sup.modcache_engine(database_url, redis_url) as eng:
        started = time.perf_counter()
        report = await eng.full_resync()
        elapsed = time.perf_counter() - started
    return {"sync_s": elapsed, "applied": {r.value: n for r, n in report.applied.items()}}


async def _plan(database_url: str, redis_url: str) -> dict[str, object]:
    consumer = sup.PlanConsumer(database_url=database_url, redis_url=redis_url)
    try:
        await consumer.warm_up()
        started = time.perf_counter()
        added = await consumer.sync_module_cache()
        elapsed = time.perf_counter() - started
    finally:
        await consumer.close()
    return {"sync_s": elapsed, "applied": {"missing": added}}


def main() -> None:
    approach, database_url, redis_url = sys.argv[1:4]
    started = time.perf_counter()
    run = _modcache if approach == "modcache" else _plan
    result = asyncio.run(run(database_url, redis_url))
    result["process_s"] = time.perf_counter() - started
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
