"""The clocks the operator reads, injected (so tests can drive them): monotonic for deadlines, wall for status.

Every deadline, backoff and watchdog uses ``monotonic`` (it never jumps); only what people read (status
timestamps, events, metrics) uses ``now``. The default monotonic clock is the event loop's, so a deadline
computed from it and an ``asyncio.sleep`` until it agree.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclasses.dataclass(frozen=True)
class Clock:
    monotonic: Callable[[], float] = time.monotonic
    now: Callable[[], datetime.datetime] = _utc_now


SYSTEM = Clock()
