"""An Observer for tests: records what a watcher reports and lets a test await a condition on it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable

from modcache import errors, plan, watcher

WAIT_S = 10.0


@dataclasses.dataclass
class Recorder:
    """An Observer that keeps everything it hears and lets a test await a condition on it."""

    syncs: list[tuple[plan.Report, str]] = dataclasses.field(default_factory=list)
    failures: list[tuple[errors.ModcacheError, str]] = dataclasses.field(default_factory=list)
    listener: list[bool] = dataclasses.field(default_factory=list)
    keyspace: list[tuple[bool, str]] = dataclasses.field(default_factory=list)
    changed: asyncio.Condition = dataclasses.field(default_factory=asyncio.Condition)

    def on_sync(self, report: plan.Report, trigger: str) -> None:
        self._record(self.syncs, (report, trigger))

    def on_sync_failed(self, error: errors.ModcacheError, trigger: str) -> None:
        self._record(self.failures, (error, trigger))

    def on_listener(self, connected: bool, detail: str) -> None:
        self._record(self.listener, connected)

    def on_keyspace(self, active: bool, detail: str) -> None:
        self._record(self.keyspace, (active, detail))

    def _record(self, where: list[object], what: object) -> None:  # type: ignore[misc]
        where.append(what)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait_for(self, predicate: Callable[[], object], timeout_s: float = WAIT_S) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), timeout_s)

    def synced(self, path: str, reason: plan.Reason, trigger: str | None = None) -> bool:
        """Whether a sync (with ``trigger``, if given) applied ``reason`` to ``path``."""
        return any(
            item.path == path and item.reason is reason and (trigger is None or trigger in t) and r.repaired
            for r, t in self.syncs
            for item in r.plan.items
        )

    def full_syncs(self, trigger: str | None = None) -> int:
        return sum(1 for r, t in self.syncs if r.full and (trigger is None or t == trigger))


@contextlib.asynccontextmanager
async def running(w: watcher.Watcher) -> AsyncIterator[watcher.Watcher]:
    """Run ``w`` in a task for the duration of the block."""
    task = asyncio.create_task(w.run())
    try:
        yield w
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
