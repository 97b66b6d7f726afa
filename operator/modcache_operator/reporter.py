"""What one ModuleCache's status says: the watcher's observations and the supervisor's decisions as facts.

The ``Reporter`` is the core watcher's ``Observer`` and the supervisor's scribe. Each observation or decision is
one typed change of the ``status.Facts`` (``dataclasses.replace``, checked by mypy), with metrics and the
watcher's last sign of life; every change is compared with the previous facts for events
(``status.events_between``) and handed to its ``statuswriter.StatusWriter``, which writes the status. It also
keeps Secret values out of messages (``scrub``) and tracks which resync request a full resync handled.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import gc
import logging
import urllib.parse
from collections.abc import Mapping
from typing import Any, Protocol

import pydantic

from modcache import errors, plan, watcher
from modcache_operator import metrics, names, spec, status, statuswriter

log = logging.getLogger(__name__)

R = names.Reason
C = names.ConditionType
INCREMENTAL_TRIGGERS = frozenset({"notify", "keyspace"})


class Watcher(Protocol):
    """What the reporter asks of the running watcher."""

    def request_resync(self, trigger: str = ...) -> None: ...

    def listener_server_changes(self) -> int: ...

    def source_refusals(self) -> int: ...


class Reporter:
    def __init__(
        self,
        *,
        namespace: str,
        name: str,
        body: statuswriter.ObjectView,
        outlets: statuswriter.Outlets,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self._metrics = outlets.metrics
        self._post_event = outlets.post_event
        self._clock = clock = outlets.clock
        self.facts = seed_facts(body.status or {}, _generation(body))
        self.last_activity_at = clock.monotonic()  # when the watcher last said anything
        self.watcher: Watcher | None = None
        self._server_changes = 0  # the watcher's listener_server_changes already counted in the metric
        self._refusals = 0  # the watcher's source_refusals already counted in the metric
        self._secrets: tuple[pydantic.SecretStr, ...] = ()
        self._endpoints = ("", "")
        self._announced = status.announced_failure(body.status or {})
        self._resyncs = _ResyncRequests(handled=self.facts.handled_token)
        self.writer = statuswriter.StatusWriter(
            namespace=namespace, name=name, body=body, facts=lambda: self.facts, outlets=outlets
        )

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
        self._count_server_changes()  # a stale PostgreSQL refused, another host synced from instead
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
        self._count_server_changes()  # a stale PostgreSQL refused shows as this failure
        facts = self._failure(error)
        if not set(trigger.split("+")) <= INCREMENTAL_TRIGGERS:
            facts = dataclasses.replace(facts, last_attempt_at=self._clock.now())
        self._apply(facts)

    def on_listener(self, connected: bool, detail: str) -> None:
        self.last_activity_at = self._clock.monotonic()
        was_up = self.facts.listener.up
        self._metrics.listener(self.namespace, self.name, connected)
        self._count_server_changes()
        self._apply(dataclasses.replace(self.facts, listener=status.Link(connected, self.scrub(detail))))
        unverified = was_up or self.facts.source.up is None  # lost it, or never heard from PostgreSQL
        if unverified and not connected and self.watcher is not None:
            self.watcher.request_resync(watcher.RECONNECT)  # is PostgreSQL itself still there?

    def _count_server_changes(self) -> None:
        """A listener that reached another PostgreSQL server (the watcher counts them; a new watcher from 0), and
        servers refused as stale (another cluster, an older timeline)."""
        changes = 0 if self.watcher is None else self.watcher.listener_server_changes()
        if changes > self._server_changes:
            self._metrics.listener_server_changed(self.namespace, self.name, changes - self._server_changes)
        self._server_changes = changes
        refusals = 0 if self.watcher is None else self.watcher.source_refusals()
        if refusals > self._refusals:
            self._metrics.source_refused(self.namespace, self.name, refusals - self._refusals)
        self._refusals = refusals

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
        self.writer.drifted(drift)
        return drift

    def _apply(self, new: status.Facts) -> None:
        if new == self.facts:
            return
        old, self.facts = self.facts, new
        events, self._announced = status.events_between(old, new, self._announced)
        for event in events:
            self._post_event(event)
        self.writer.changed()


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


def _generation(body: statuswriter.ObjectView) -> int:
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
    text = text.replace(url, errors.redact_url(url))
    for password in _spellings(errors.url_password(url)):
        text = text.replace(password, "***")
    return text


def _spellings(password: str | None) -> list[str]:
    """A password as written in the URL and as a library decoded it (``%2F`` and ``/`` are both possible)."""
    if not password:
        return []
    return sorted({password, urllib.parse.unquote(password)}, key=len, reverse=True)
