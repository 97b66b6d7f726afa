"""Writing one ModuleCache's status: the reporter's facts, computed against the server's copy, written on change.

The ``StatusWriter`` runs one loop per ModuleCache. Whenever the facts change (``changed``) or kopf sees a new
version of the object (``body_changed``), it computes the status with the pure ``status.compute`` against **the
server's copy** (kopf's live body, or the answer to our own last patch until kopf has seen it), so a value
another writer left there (a previous leader, a person) is corrected, and it writes only when something worth
writing differs. Failed writes back off with jitter: a transient error quickly; a rejection (403, 422: RBAC or
schema) slowly, with a Warning event and, where the server still accepts it, a Ready condition saying so.
It also announces drift corrections, at most one event per ``drift_event_interval_s``, on a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from modcache import errors
from modcache_operator import backoff, clock, kube, metrics, names, status, tunables

log = logging.getLogger(__name__)

R = names.Reason


class EventPoster(Protocol):
    def __call__(self, event: status.Event) -> None: ...


class ObjectView(Protocol):
    """The live object kopf keeps current (``kopf.Body``)."""

    @property
    def spec(self) -> Mapping[str, Any]: ...
    @property
    def metadata(self) -> Mapping[str, Any]: ...
    @property
    def status(self) -> Mapping[str, Any]: ...


class StatusApi(Protocol):
    def patch_status(
        self, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> Awaitable[Mapping[str, Any] | None]: ...


def _always() -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Outlets:
    """Where one ModuleCache's status, events and metrics go, and at what pace: its Reporter's and StatusWriter's.

    ``may_write`` is asked before every write (the leader's fence: a deposed leader writes nothing)."""

    api: StatusApi
    metrics: metrics.Metrics
    post_event: EventPoster
    config: tunables.Tunables = tunables.DEFAULT
    clock: clock.Clock = clock.SYSTEM
    rng: random.Random | None = None
    may_write: Callable[[], bool] = _always


class StatusWriter:
    def __init__(
        self, *, namespace: str, name: str, body: ObjectView, facts: Callable[[], status.Facts], outlets: Outlets
    ) -> None:
        self.namespace = namespace
        self.name = name
        self._body = body
        self._api = outlets.api
        self._facts = facts
        self._metrics = outlets.metrics
        self._post_event = outlets.post_event
        self._config = config = outlets.config
        self._clock = outlets.clock
        self._may_write = outlets.may_write
        rng = outlets.rng or random.Random()
        self._dirty = asyncio.Event()
        self._pending_drift: status.Drift | None = None
        self._drift_announced_at: float | None = None  # monotonic
        self._drift_timer: asyncio.TimerHandle | None = None
        self._echo: tuple[str, Mapping[str, Any], float] | None = None  # (resourceVersion, status, at)
        self._last_write: tuple[dict[str, Any], Mapping[str, Any]] | None = None  # (desired, server's answer)
        self._rejected: str | None = None
        self._retries = backoff.Backoff(config.status_retry_initial_s, config.status_retry_max_s, rng)
        self._rejections = backoff.Backoff(config.rejected_initial_s, config.rejected_max_s, rng)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def changed(self) -> None:
        """The facts changed: compare and maybe write (after a short debounce)."""
        self._dirty.set()

    def drifted(self, drift: status.Drift) -> None:
        """Corrections to announce (merged with any not announced yet)."""
        self._pending_drift = drift if self._pending_drift is None else self._pending_drift.merged(drift)
        self._dirty.set()

    def body_changed(self, resource_version: str | None) -> None:
        """kopf saw a new version of the object: compare the status with it again."""
        if self._echo is not None and self._echo[0] == resource_version:
            self._echo = None  # kopf's body caught up with our own write
        self._dirty.set()

    async def write_forever(self) -> None:
        """Write the status whenever facts or the server's copy change; back off when writes fail."""
        try:
            while True:
                await self._dirty.wait()
                await asyncio.sleep(self._config.status_debounce_s)  # let a burst of reports make one write
                self._dirty.clear()
                delay_s = await self._write_or_complain()
                if delay_s is not None:
                    await asyncio.sleep(delay_s)
                    self._dirty.set()
        finally:
            if self._drift_timer is not None:
                self._drift_timer.cancel()

    async def _write_or_complain(self) -> float | None:
        """``_write_once``; a surprise (a bug, a server value nobody expected) is logged and retried with backoff
        instead of ending the writer, which would freeze the status at whatever it last said."""
        try:
            return await self._write_once()
        except Exception:
            delay_s = self._retries.next_s()
            log.exception("%s: the status could not be computed or written; retrying in %.1fs", self.key, delay_s)
            return delay_s

    async def _write_once(self) -> float | None:
        """One comparison and, if needed, one write; the delay before trying again if it failed."""
        now = self._clock.now()
        server = self._server_status()
        update = status.compute(self._facts(), server, now, timestamp_interval_s=self._config.timestamp_interval_s)
        self._metrics.conditions(self.namespace, self.name, {c["type"]: c["status"] for c in update.conditions})
        self._announce_drift()
        if update.status is None or not self._may_write():
            return None
        if self._last_write is not None and self._last_write == (update.status, server):
            return None  # the server keeps answering our write with this (it prunes or defaults a field): done
        try:
            answer = await self._api.patch_status(self.namespace, self.name, status.patch_for(update.status, server))
        except kube.Rejected as e:
            return await self._write_rejected(e, update)
        except errors.TransientError as e:
            delay_s = self._retries.next_s()
            level = logging.WARNING if self._retries.failures == 1 else logging.DEBUG  # once per outage
            log.log(level, "%s: status not written (%s); retrying in %.1fs", self.key, e, delay_s)
            return delay_s
        self._retries.reset()
        self._rejections.reset()
        if self._rejected is not None:
            log.info("%s: status accepted again", self.key)
            self._rejected = None
        if answer is not None:
            written: Mapping[str, Any] = answer.get("status") or {}
            version = str((answer.get("metadata") or {}).get("resourceVersion") or "")
            self._echo = (version, written, self._clock.monotonic())
            self._last_write = (update.status, written)
        return None

    def _server_status(self) -> Mapping[str, Any]:
        """The status as the server has it: our last write's answer until kopf's body has caught up with it."""
        if self._echo is not None:
            _, written, at = self._echo
            if self._clock.monotonic() - at < self._config.echo_wait_s:
                return written
            self._echo = None
        return dict(self._body.status or {})

    async def _write_rejected(self, error: kube.Rejected, update: status.Update) -> float:
        """Say so where someone will look (an event; a Ready condition if the server takes that), then wait."""
        message = errors.truncate(f"the API server rejected the status: {error.reason}")
        if message != self._rejected:
            log.error("%s: %s", self.key, message)
            self._post_event(status.Event(status.EventType.WARNING, R.STATUS_REJECTED, message))
            self._rejected = message
            with contextlib.suppress(errors.ModcacheError):
                await self._api.patch_status(
                    self.namespace, self.name, {"conditions": status.rejected_conditions(update, message)}
                )
        return self._rejections.next_s()

    def _announce_drift(self) -> None:
        now_s, interval_s = self._clock.monotonic(), self._config.drift_event_interval_s
        since_s = None if self._drift_announced_at is None else now_s - self._drift_announced_at
        event = status.drift_event(self._pending_drift, since_s, interval_s=interval_s)
        if event is not None:
            self._post_event(event)
            self._pending_drift, self._drift_announced_at = None, now_s
        elif self._pending_drift is not None and since_s is not None and self._drift_timer is None:
            # Look again once the interval has passed (a timer: nothing polls meanwhile).
            wait_s = max(interval_s - since_s, 0.001)
            self._drift_timer = asyncio.get_running_loop().call_later(wait_s, self._drift_due)

    def _drift_due(self) -> None:
        self._drift_timer = None
        self._dirty.set()
