"""Awaiting the end of a process that is not the test's child (an execution, its descendants, a template).

A pidfd becomes readable when its process terminates (a zombie counts: it runs nothing any more), so the test
awaits that instead of polling the process table.
"""

from __future__ import annotations

import asyncio
import os


async def gone(pid: int, timeout_s: float = 10.0) -> bool:
    """Whether ``pid`` terminated within ``timeout_s`` (at once if it is gone already)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: ended.done() or ended.set_result(None))
    try:
        async with asyncio.timeout(timeout_s):
            await ended
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return True
