"""Whether this replica may write: open while it leads; closing it stops every writer at once.

With leader election, the elector closes the term's fence the moment it can no longer prove it holds the Lease
(its renew deadline passed, or another replica holds it). ``close`` runs every registered halt synchronously,
so the watchers are cancelled in that same instant, before any standby can acquire the Lease; supervisors and
status writers check ``open`` before they start anything. Without leader election the fence never closes.
"""

from __future__ import annotations

from collections.abc import Callable


class Fence:
    def __init__(self) -> None:
        self.open = True
        self._halts: dict[object, Callable[[], None]] = {}

    def on_close(self, key: object, halt: Callable[[], None]) -> None:
        self._halts[key] = halt
        if not self.open:
            halt()

    def forget(self, key: object) -> None:
        self._halts.pop(key, None)

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        for halt in list(self._halts.values()):
            halt()
