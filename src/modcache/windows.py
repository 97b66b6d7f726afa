"""An action run at most once per window of time, the rest owed to the window's end (no I/O; the clock is passed
in). What the watcher uses where anyone may cause the action as often as they like -- a forged notification, a write
to the probe key -- and each run costs a full resync: a flood costs one at once and one per window after it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class OncePerWindow:
    """``action`` at most once per ``window_s``. ``open`` says whether the caller may act itself (a new window starts
    then); ``owe`` runs ``action`` once at the current window's end, however often it is called, and that run starts
    the next window. ``cancel`` drops what is owed (the watcher stopping)."""

    def __init__(self, window_s: float, action: Callable[[], None], monotonic: Callable[[], float]) -> None:
        self.window_s = window_s
        self._action = action
        self._monotonic = monotonic
        self.started_at: float | None = None  # when the current window began (None: never)
        self._owed: asyncio.TimerHandle | None = None

    def open(self) -> bool:
        """Whether the last window has ended (or none began): if so, one begins now and the caller acts itself."""
        now = self._monotonic()
        if self.started_at is None or now - self.started_at >= self.window_s:
            self.started_at = now
            return True
        return False

    def owe(self) -> None:
        """Run ``action`` at the end of the current window (once, however often this is called meanwhile)."""
        if self._owed is None:
            left_s = 0.0 if self.started_at is None else self.window_s - (self._monotonic() - self.started_at)
            self._owed = asyncio.get_running_loop().call_later(max(0.0, left_s), self._run_owed)

    def ask(self) -> None:
        """``action`` now if the window allows, else at its end."""
        if self.open():
            self._action()
        else:
            self.owe()

    def cancel(self) -> None:
        if self._owed is not None:
            self._owed.cancel()
            self._owed = None

    def _run_owed(self) -> None:
        self._owed = None
        self.started_at = self._monotonic()
        self._action()
