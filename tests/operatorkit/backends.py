"""PostgreSQL backends a test waits on: the operator's LISTEN connections, and their exits (awaited, not polled).

A backend is a process on this machine (the suite's PostgreSQL is local); a Linux pidfd becomes readable when
its process exits, which the event loop can wait on. A backend that is already gone counts as exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable

import asyncpg

LISTENER_APPLICATION = "modcache-listener"


async def listener_pids(database_url: str) -> list[int]:
    """Backends LISTENing for modcache on the test's database."""
    database = database_url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
            database,
            LISTENER_APPLICATION,
        )
    finally:
        await conn.close()
    return [int(row["pid"]) for row in rows]


async def exited(pids: Iterable[int], *, timeout_s: float = 20.0) -> None:
    """Until every one of these backend processes has exited."""
    async with asyncio.timeout(timeout_s):
        for pid in pids:
            await _exit_of(pid)


async def _exit_of(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        await gone
    finally:
        loop.remove_reader(fd)
        with contextlib.suppress(OSError):
            os.close(fd)
