"""What one ModuleCache's status says: the watcher's observations become ``status.Facts``, facts become a status.

The ``Reporter`` is the core watcher's ``Observer`` and the supervisor's scribe. Each observation or supervisor
decision is one typed change of the facts (``dataclasses.replace`` on ``status.Facts``, checked by mypy); every
change is compared with the previous facts for events (``status.events_between``), and wakes the status writer.

The writer computes the status with the pure ``status.compute`` against **the server's copy** (kopf's live body,
or the answer to our own last patch until kopf has seen it), so a value another writer left there (a previous
leader, a person) is corrected, and a write happens only when something worth writing differs. Failed writes
back off with jitter: a transient error quickly; a rejection (403, 422: RBAC or schema) slowly, with a Warning
event and, where the server still accepts it, a Ready condition saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import datetime
import gc
import logging
import random
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import pydantic

from modcache import errors, plan, watcher
from modcache_operator import backoff, clock, kube, metrics, names, spec, status, tunables

log = logging.getLogger(__name__)

R = names.Reason
C = names.ConditionType
INCREMENTAL_TRIGGERS = frozenset({"notify", "keyspace"})


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


class Watcher(Protocol):
    """What the reporter asks of the running watcher."""

    def request_resync(self, trigger: str = ...) -> None: ...


class Reporter:
    def __init__(
        self,
        *,
        namespace: str,
        name: str,
        body: ObjectView,
        api: StatusApi,
        metrics: metrics.Metrics,
        post_event: EventPoster,
        config: tunables.Tunables = tunables.DEFAULT,
        clock: clock.Clock = clock.SYSTEM,
        rng: random.Random | None = None,
        may_write: Callable[[], bool] = lambda: True,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self._body = body
        self._api = api
        self._metrics = metrics
        self._post_event = post_event
        self._config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self._may_write = may_write
        self._dirty = asyncio.Event()
        self.facts = seed_facts(body.status or {}, _generation(body))
        self.last_activity_at = clock.monotonic()  # when the watcher last said anything
        self.watcher: Watcher | None = None
        self._secrets: tuple[pydantic.SecretStr, ...] = ()
        self._endpoints = ("", "")
        self._announced = status.announced_failure(body.status or {})
        self._pending_drift: status.Drift | None = None
        self._drift_announced_at: float | None = None  # monotonic
        self._drift_timer: asyncio.TimerHandle | None = None
        self._resyncs = _ResyncRequests(handled=self.facts.handled_token)
        self._echo: tuple[str, Mapping[str, Any], float] | None = None  # (resourceVersion, status, at)
        self._last_write: tuple[dict[str, Any], Mapping[str, Any]] | None = None  # (desired, server's answer)
        self._rejected: str | None = None
        self._retries = backoff.Backoff(config.status_retry_initial_s, config.status_retry_max_s, self._rng)
        self._rejections = backoff.Backoff(config.rejected_initial_s, config.rejected_max_s, self._rng)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    # -- what the supervisor decided ------------------------------------------------------------------------

    def watching(self, generation: int, resolved: spec.Resolved) -> None:
        """A new watcher runs ``resolved``: every link is unknown until it reports."""
        self._secrets = tuple(u for u in (resolved.database_url, resolved.listen_database_url, resolved.redis_url) if u)
        self._endpoints = resolved.endpoints()
        self.last_activity_at = self._clock.monotonic()
        self._resyncs.watcher_started()
        unknown = status.Link()
        self._apply(
            dataclasses.replace(
                self.facts,
                generation=generation,
                suspended=False,
                problem=None,
                synced=False,
                source=unknown,
                cache=unknown,
                listener=unknown,
                keyspace=unknown,
            )
        )

    def unchanged(self, generation: int) -> None:
        """The running watcher already matches this generation (e.g. a change that does not restart it)."""
        self._apply(dataclasses.replace(self.facts, generation=generation, suspended=False))

    def suspended(self, generation: int) -> None:
        self._apply(dataclasses.replace(self.facts, generation=generation, suspended=True, problem=None))

    def failed(self, generation: int, problem: status.Problem) -> None:
        """The configuration cannot run (spec, Secret, conflict) or a transient error stopped the watcher."""
        problem = status.Problem(problem.reason, self.scrub(problem.message))
        self._apply(
            dataclasses.replace(self.facts, generation=generation, suspended=False, problem=problem, synced=False)
        )

    def request_resync(self, token: str | None) -> None:
        """A ``modcache.dev/resync-requested-at`` value: the first full resync that starts after it handles it."""
        if self._resyncs.new(token) and self.watcher is not None:
            log.info("%s: full resync requested (%s)", self.key, token)
            self.watcher.request_resync(watcher.MANUAL)

    def body_changed(self, resource_version: str | None) -> None:
        """kopf saw a new version of the object: compare the status with it again."""
        if self._echo is not None and self._echo[0] == resource_version:
            self._echo = None  # kopf's body caught up with our own write
        self._dirty.set()

    def scrub(self, text: str) -> str:
        """Remove any Secret value (or the password in it) that a library put into a message."""
        for secret in self._secrets:
            text = _without(text, secret.get_secret_value())
        return text

    # -- the watcher's Observer ---------------------------------------------------------------------------

    def on_sync(self, report: plan.Report, trigger: str) -> None:
        now = self._clock.now()
        self.last_activity_at = self._clock.monotonic()
        self._metrics.synced(self.namespace, self.name, trigger, report, at_s=now.timestamp())
        facts = self.facts
        if report.full:
            _release_memory()  # a full resync's working set is large and short-lived: give it back
            source_at, cache_at = self._endpoints
            facts = dataclasses.replace(
                facts,
                problem=None,
                synced=True,
                counts=status.Counts(report.source_count, report.cached_count, len(report.plan.rejected)),
                digest=report.digest,
                last_attempt_at=now,
                last_success_at=now,
                source=status.Link(True, f"connected to {source_at}"),
                cache=status.Link(True, f"connected to {cache_at}"),
                handled_token=self._resyncs.full_resync_done(trigger),
            )
        elif trigger == watcher.NOTIFY and facts.counts is not None:
            facts = dataclasses.replace(facts, counts=_after_changes(facts.counts, report.applied))
        drift = self._drift(report, trigger, now)
        if drift is not None:
            facts = dataclasses.replace(facts, last_drift=drift, total_repairs=facts.total_repairs + drift.total)
        self._apply(facts)
        if facts.counts is not None:
            self._metrics.counts(self.namespace, self.name, source=facts.counts.source, cached=facts.counts.cached)

    def on_sync_failed(self, error: errors.ModcacheError, trigger: str) -> None:
        self.last_activity_at = self._clock.monotonic()
        self._metrics.failed(self.namespace, self.name, trigger)
        facts = self._failure(error)
        if not set(trigger.split("+")) <= INCREMENTAL_TRIGGERS:
            facts = dataclasses.replace(facts, last_attempt_at=self._clock.now())
        self._apply(facts)

    def on_listener(self, connected: bool, detail: str) -> None:
        self.last_activity_at = self._clock.monotonic()
        was_up = self.facts.listener.up
        self._metrics.listener(self.namespace, self.name, connected)
        self._apply(dataclasses.replace(self.facts, listener=status.Link(connected, self.scrub(detail))))
        unverified = was_up or self.facts.source.up is None  # lost it, or never heard from PostgreSQL
        if unverified and not connected and self.watcher is not None:
            self.watcher.request_resync(watcher.RECONNECT)  # is PostgreSQL itself still there?

    def on_keyspace(self, active: bool, detail: str) -> None:
        self.last_activity_at = self._clock.monotonic()
        was_active = self.facts.keyspace.up
        self._apply(dataclasses.replace(self.facts, keyspace=status.Link(active, self.scrub(detail))))
        unverified = was_active or self.facts.cache.up is None
        if unverified and not active and self.watcher is not None:
            self.watcher.request_resync(watcher.RECONNECT)  # is Redis itself still there?

    def _failure(self, error: errors.ModcacheError) -> status.Facts:
        """The facts after a failed sync; the message says where (host, port, database), never the secret."""
        source_at, cache_at = self._endpoints
        message = self.scrub(errors.truncate(str(error)))
        if isinstance(error, errors.SourceUnavailable):
            detail = f"{source_at}: {message}"
            problem = status.Problem(R.SOURCE_UNAVAILABLE, detail)
            return dataclasses.replace(self.facts, source=status.Link(False, detail), problem=problem)
        if isinstance(error, errors.CacheUnavailable):
            detail = f"{cache_at}: {message}"
            problem = status.Problem(R.CACHE_UNAVAILABLE, detail)
            return dataclasses.replace(self.facts, cache=status.Link(False, detail), problem=problem)
        return dataclasses.replace(self.facts, problem=status.Problem(R.SYNC_FAILED, message))

    def _drift(self, report: plan.Report, trigger: str, now: datetime.datetime) -> status.Drift | None:
        """Corrections that were drift (the cache diverged), not the propagation of a source change."""
        if report.repaired == 0 or trigger == watcher.NOTIFY:
            return None
        drift = status.Drift(counts=dict(report.applied), trigger=metrics.trigger_label(trigger), at=now)
        self._pending_drift = drift if self._pending_drift is None else self._pending_drift.merged(drift)
        return drift

    def _apply(self, new: status.Facts) -> None:
        if new == self.facts:
            return
        old, self.facts = self.facts, new
        events, self._announced = status.events_between(old, new, self._announced)
        for event in events:
            self._post_event(event)
        self._dirty.set()

    # -- writing the status -------------------------------------------------------------------------------------

    async def write_forever(self) -> None:
        """Write the status whenever facts or the server's copy change; back off when writes fail."""
        try:
            while True:
                await self._dirty.wait()
                await asyncio.sleep(self._config.status_debounce_s)  # let a burst of reports make one write
                self._dirty.clear()
                delay_s = await self._write_once()
                if delay_s is not None:
                    await asyncio.sleep(delay_s)
                    self._dirty.set()
        finally:
            if self._drift_timer is not None:
                self._drift_timer.cancel()

    async def _write_once(self) -> float | None:
        """One comparison and, if needed, one write; the delay before trying again if it failed."""
        now = self._clock.now()
        server = self._server_status()
        update = status.compute(self.facts, server, now, timestamp_interval_s=self._config.timestamp_interval_s)
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


class _ResyncRequests:
    """Which ``resync-requested-at`` value is pending, and whether a finished full resync handled it."""

    def __init__(self, *, handled: str | None) -> None:
        self.handled = handled
        self.pending: str | None = None
        self._fulls_since = 0

    def new(self, token: str | None) -> bool:
        if token is None or token in (self.handled, self.pending):
            return False
        self.pending, self._fulls_since = token, 0
        return True

    def watcher_started(self) -> None:
        if self.pending is not None:
            self._fulls_since = 1  # a new watcher's first full resync starts after the request

    def full_resync_done(self, trigger: str) -> str | None:
        """The token a finished full resync handled: the first full resync to start after the request."""
        if self.pending is not None:
            self._fulls_since += 1
            if trigger == watcher.MANUAL or self._fulls_since >= 2:
                self.handled, self.pending = self.pending, None
        return self.handled


def seed_facts(previous: Mapping[str, Any], generation: int) -> status.Facts:
    """Facts that survive an operator restart, from the status the previous run wrote."""
    counts = None
    if isinstance(previous.get("sourceModules"), int):
        counts = status.Counts(
            previous["sourceModules"], previous.get("cachedModules", 0), previous.get("rejectedModules", 0)
        )
    return status.Facts(
        generation=generation,
        counts=counts,
        digest=previous.get("sourceDigest"),
        last_attempt_at=_time(previous.get("lastSyncTime")),
        last_success_at=_time(previous.get("lastSuccessfulSyncTime")),
        last_drift=_seed_drift(previous.get("lastDrift")),
        total_repairs=int(previous.get("totalRepairs") or 0),
        handled_token=previous.get("lastHandledReconcileAt"),
    )


def _seed_drift(raw: object) -> status.Drift | None:
    if not isinstance(raw, Mapping) or (at := _time(raw.get("time"))) is None:
        return None
    counts = {reason: int(raw.get(reason.value) or 0) for reason in plan.Reason}
    return status.Drift(counts=counts, trigger=str(raw.get("trigger") or ""), at=at)


def _time(text: object) -> datetime.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return None


def _generation(body: ObjectView) -> int:
    return int(body.metadata.get("generation") or 0)


def _after_changes(counts: status.Counts, applied: Mapping[plan.Reason, int]) -> status.Counts:
    """Counts after a NOTIFY batch: new modules were written (missing), removed ones deleted (orphan)."""
    delta = applied.get(plan.Reason.MISSING, 0) - applied.get(plan.Reason.ORPHAN, 0)
    return dataclasses.replace(counts, source=counts.source + delta, cached=counts.cached + delta)


def _release_memory() -> None:
    """Collect, then hand freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _without(text: str, url: str) -> str:
    password = _password(url)
    text = text.replace(url, errors.redact_url(url))
    return text.replace(password, "***") if password else text


def _password(url: str) -> str | None:
    try:
        return urllib.parse.urlsplit(url).password
    except ValueError:
        return None
