"""The consumer's event loop: uvloop (libuv, its callbacks, transports and timers in C) unless told otherwise.

The consumer's per-execution work is mostly the event loop's own (about a hundred callbacks per execution:
futures, task steps, socket reads and writes of asyncpg, redis-py, aio-pika and the executor's channels);
uvloop runs the same code with a cheaper loop (``MODCACHE_EVENT_LOOP=asyncio``: the standard library's).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], *, loop: str = "uvloop") -> T:
    """``asyncio.run(main)`` on ``loop`` ("uvloop" falls back to asyncio's loop, saying so, where it is missing)."""
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed; running on asyncio's own event loop")
        else:
            result: T = uvloop.run(main)
            return result
    return asyncio.run(main)
