"""Child process for the latency benchmarks: a modcache Watcher, as ``modcache sync --watch`` would run it.

Run as ``python -m bench._watch_child DATABASE_URL REDIS_URL``; runs until SIGTERM/SIGINT, then exits 0.
Running the watcher in its own process keeps the measuring process's event loop from sharing its time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

import redis.asyncio as aioredis

from bench import _support as sup
from modcache import settings, watcher

LOG_ENV = "MODCACHE_BENCH_WATCH_LOG"


async def _watch(database_url: str, redis_url: str) -> None:
    config = settings.Settings(database_url=database_url, redis_url=redis_url)  # type: ignore[arg-type]
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        async with sup.modcache_engine(database_url, redis_url) as eng:
            w = watcher.Watcher(engine=eng, settings=config, listen_dsn=database_url, redis_client=client)
            task = asyncio.create_task(w.run())
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, task.cancel)
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await client.aclose()


def main() -> None:
    log_file = os.environ.get(LOG_ENV)
    if log_file:  # everything the watcher says, for diagnosing a benchmark run
        logging.basicConfig(level=logging.DEBUG, filename=log_file, format="%(asctime)s %(name)s %(message)s")
    else:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="watcher: %(message)s")
    asyncio.run(_watch(sys.argv[1], sys.argv[2]))


if __name__ == "__main__":
    main()
