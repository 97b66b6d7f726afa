"""The clocks the operator reads, injected (so tests can drive them): monotonic for deadlines, wall for status.

Every deadline, backoff and watchdog uses ``monotonic`` (it never jumps); only what people read (status
timestamps, events, metrics) uses ``now``. The default monotonic clock is the running event loop's (the same
``time.monotonic`` in production), so a deadline computed from it and an ``asyncio.sleep`` until it always agree,
also under a test's fast-forwarded loop time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
from collections.abc import Callable


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _loop_time() -> float:
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:  # no loop running (construction time): the clock asyncio uses by default
        return time.monotonic()


@dataclasses.dataclass(frozen=True)
class Clock:
    monotonic: Callable[[], float] = _loop_time
    now: Callable[[], datetime.datetime] = _utc_now


SYSTEM = Clock()
