"""One ModuleCache's loop: resolve its spec and Secrets, run the core ``Watcher``, keep its status current.

``Runner.run`` is what the kopf daemon awaits. It supervises, rather than syncs:

* it resolves the spec and the Secrets it names into core settings; a problem (missing Secret, bad URL) becomes
  Ready False with that reason, retried with backoff, and picked up at once when the CR or a Secret changes;
* it runs a ``watcher.Watcher`` (LISTEN + keyspace events + periodic resync) and restarts it whenever the
  resolved configuration changes (spec, or a rotated Secret), or after it crashed (with backoff);
* ``suspend`` stops the watcher: nothing writes to the cache until it is resumed;
* it is the watcher's ``Observer``: each report updates the ``status.Facts``, metrics and liveness, and wakes
  the status writer, which turns facts into a status patch and events with ``status.compute`` (only on change);
* a new ``modcache.dev/resync-requested-at`` value asks the watcher for a full resync; the full resync that
  follows echoes it as ``lastHandledReconcileAt``.

``poke`` is how kopf's event handlers say "the object or one of its Secrets changed".
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
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from modcache import db, engine, errors, pgsource, plan, rediscache, watcher
from modcache_operator import health, kube, metrics, names, spec, status

log = logging.getLogger(__name__)

R = names.Reason
INCREMENTAL_TRIGGERS = frozenset({"notify", "keyspace"})


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    """Operator-wide tunables of every runner."""

    timestamp_interval_s: float = 300.0  # a no-drift resync refreshes lastSyncTime at most this often
    drift_event_interval_s: float = 60.0  # at most one DriftCorrected event per this period
    status_debounce_s: float = 0.05  # status changes arriving together make one write
    retry_initial_s: float = 1.0  # backoff of a failing configuration or a crashed watcher
    retry_max_s: float = 60.0
    heartbeat_s: float = 5.0  # how often the supervising loop proves it runs
    watcher_grace_s: float = 60.0  # a watcher silent for 2 resync intervals + this is hung
    secret_recheck_s: float = 30.0  # while syncs fail, re-read the Secrets this often (rotation)
    stop_timeout_s: float = 5.0  # bound on stopping a watcher and closing its connections


class EventPoster(Protocol):
    def __call__(self, event: status.Event) -> None: ...


class Stopped(Protocol):
    """kopf's ``stopped`` flag of a daemon (or an asyncio.Event in tests)."""

    def is_set(self) -> bool: ...
    def wait(self) -> Awaitable[Any]: ...


class ObjectView(Protocol):
    """The live object kopf keeps current (``kopf.Body``): read on every wake-up."""

    @property
    def spec(self) -> Mapping[str, Any]: ...
    @property
    def metadata(self) -> Mapping[str, Any]: ...
    @property
    def status(self) -> Mapping[str, Any]: ...


@dataclasses.dataclass
class _Running:
    """The watcher of one resolved configuration, and the connections it owns."""

    resolved: spec.Resolved
    watcher: watcher.Watcher
    source: pgsource.PgSource
    cache: rediscache.RedisCache
    task: asyncio.Task[None] = dataclasses.field(init=False)
    error: BaseException | None = None

    def start(self, name: str) -> None:
        self.task = asyncio.create_task(self._run(), name=name)

    async def _run(self) -> None:
        """The watcher, its failure kept here rather than in the task: when kopf stops, it re-raises whatever
        the tasks it outlived ended with, and an error that surfaced while cancelling must not fail the
        operator's shutdown."""
        try:
            await self.watcher.run()
        except Exception as e:  # a crash (an ExceptionGroup from its TaskGroup), reported by the supervisor
            self.error = e


class Runner:
    def __init__(
        self,
        *,
        namespace: str,
        name: str,
        body: ObjectView,
        kube_api: kube.KubeApi,
        metrics: metrics.Metrics,
        liveness: health.Liveness,
        post_event: EventPoster,
        config: RunnerConfig = RunnerConfig(),
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
        rng: random.Random | None = None,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self._body = body
        self._kube = kube_api
        self._metrics = metrics
        self._liveness = liveness
        self._post_event = post_event
        self._config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self._wakeup = asyncio.Event()
        self._dirty = asyncio.Event()
        self._written: dict[str, Any] = dict(body.status or {})
        self.facts = _seed_facts(self._written, _generation(body))
        self._running: _Running | None = None
        self._secret_names: frozenset[str] = frozenset()
        self._pending_drift: status.Drift | None = None
        self._drift_announced_at: datetime.datetime | None = None
        self._pending_token: str | None = None
        self._fulls_since_request = 0
        self._last_activity = time.monotonic()
        self._failures = 0
        self._secrets_read_at = 0.0
        self._endpoints = ("", "")
        self._announced = status.announced_failure(self._written)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    # -- what kopf's handlers call ----------------------------------------------------------------------------

    def poke(self) -> None:
        """The object changed in a way that matters (spec, generation, annotation) or a Secret changed."""
        self._wakeup.set()

    def uses_secret(self, name: str) -> bool:
        return name in self._secret_names

    def wants_wakeup(self, body: ObjectView) -> bool:
        """Whether an event on the object matters: a new generation or a new resync request."""
        token = _resync_token(body)
        new_token = token is not None and token not in (self.facts.handled_token, self._pending_token)
        return _generation(body) != self.facts.generation or new_token

    async def run(self, stopped: Stopped) -> None:
        """Supervise until ``stopped`` is set, then stop the watcher (bounded) and return."""
        writer = asyncio.create_task(self._write_status_forever(), name=f"modcache-status-{self.key}")
        try:
            await self._supervise(stopped)
        finally:
            await self._stop_watcher()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            self._liveness.forget(self.key)

    # -- supervising --------------------------------------------------------------------------------------------

    async def _supervise(self, stopped: Stopped) -> None:
        while not stopped.is_set():
            self._beat()
            delay_s = await self._converge_configuration()
            self._handle_resync_request()
            await self._wait(stopped, timeout_s=delay_s)

    async def _converge_configuration(self) -> float:
        """Make the running watcher match the object; the time to wait before looking again."""
        generation = _generation(self._body)
        try:
            parsed = spec.parse(self._body.spec)
            self._secret_names = parsed.secret_names()
            if parsed.suspend:
                await self._suspend(generation)
                return self._config.heartbeat_s
            self._check_watcher()
            if self._running is None or self._woken() or self._needs_secret_recheck():
                await self._ensure_watcher(await self._resolve(parsed), generation)
        except errors.ModcacheError as e:
            return await self._configuration_failed(e, generation)
        return self._config.heartbeat_s

    def _woken(self) -> bool:
        woken = self._wakeup.is_set()
        self._wakeup.clear()
        return woken

    async def _resolve(self, parsed: spec.CacheSpec) -> spec.Resolved:
        values = {ref.field: await self._kube.read_secret_value(self.namespace, ref) for ref in parsed.secret_refs()}
        listen = parsed.listen_database
        resolved = spec.Resolved(
            spec=parsed,
            database_url=values[parsed.database.field],
            listen_database_url=values[listen.field] if listen is not None else None,
            redis_url=values[parsed.redis.field],
        )
        resolved.settings()  # raises SpecProblem for a bad URL, naming the field
        self._secrets_read_at = time.monotonic()
        return resolved

    async def _ensure_watcher(self, resolved: spec.Resolved, generation: int) -> None:
        current = self._running
        unchanged = current is not None and current.resolved.fingerprint() == resolved.fingerprint()
        if unchanged and current is not None and not current.task.done():
            self._update(generation=generation, suspended=False)
            return
        await self._stop_watcher()
        self._start_watcher(resolved, generation)

    def _start_watcher(self, resolved: spec.Resolved, generation: int) -> None:
        settings = resolved.settings()
        source_url, redis_url = (u.get_secret_value() for u in (resolved.database_url, resolved.redis_url))
        source = pgsource.PgSource(
            engine=db.make_engine(source_url, application_name="modcache-operator"),
            max_module_bytes=settings.max_module_bytes,
        )
        cache = rediscache.RedisCache.from_url(
            redis_url,
            keyspace=settings.keyspace(),
            ttl_s=settings.ttl_s,
            ttl_jitter_ratio=settings.ttl_jitter_ratio,
            check_batch_size=settings.check_batch_size,
        )
        core = engine.Engine(
            source=source, cache=cache, fetch_batch_size=settings.fetch_batch_size, prune=resolved.spec.prune
        )
        the_watcher = watcher.Watcher(
            engine=core, settings=settings, listen_dsn=resolved.listen_dsn(), redis_client=cache.client, observer=self
        )
        self._running = _Running(resolved=resolved, watcher=the_watcher, source=source, cache=cache)
        self._running.start(f"modcache-watcher-{self.key}")
        self._endpoints = resolved.endpoints()
        self._last_activity = time.monotonic()
        if self._pending_token is not None:
            self._fulls_since_request = 1  # this watcher's first full resync starts after the request
        log.info("%s: watching %s -> %s", self.key, *self._endpoints)
        self._update(
            generation=generation,
            suspended=False,
            problem=None,
            synced=False,
            source=status.Link(),
            cache=status.Link(),
            listener=status.Link(),
            keyspace=status.Link(),
        )

    async def _stop_watcher(self) -> None:
        """Cancel the watcher and close its connections, each bounded by ``stop_timeout_s``."""
        running, self._running = self._running, None
        if running is None:
            return
        running.task.cancel()
        done, _ = await asyncio.wait([running.task], timeout=self._config.stop_timeout_s)
        if not done:
            log.warning("%s: the watcher did not stop within %.0fs", self.key, self._config.stop_timeout_s)
        elif running.error is not None:
            log.debug("%s: the watcher ended with %s", self.key, errors.describe(running.error))
        closing = asyncio.gather(running.cache.close(), running.source.close(), return_exceptions=True)
        try:
            await asyncio.wait_for(closing, self._config.stop_timeout_s)
        except TimeoutError:
            log.warning("%s: connections did not close within %.0fs", self.key, self._config.stop_timeout_s)

    async def _suspend(self, generation: int) -> None:
        if self._running is not None:
            log.info("%s: suspended; stopping the watcher", self.key)
        await self._stop_watcher()
        self._update(generation=generation, suspended=True, problem=None)

    def _check_watcher(self) -> None:
        """Raise if the watcher crashed (the caller restarts it with backoff)."""
        running = self._running
        if running is None or not running.task.done():
            return
        error = _innermost(running.error)
        detail = errors.describe(error) if error is not None else "stopped unexpectedly"
        raise errors.TransientError(f"the sync loop failed: {self._scrub(detail)}")

    def _needs_secret_recheck(self) -> bool:
        """While syncs fail, the Secrets may have been rotated: re-read them now and then."""
        since_s = time.monotonic() - self._secrets_read_at
        return self.facts.problem is not None and since_s >= self._config.secret_recheck_s

    async def _configuration_failed(self, error: errors.ModcacheError, generation: int) -> float:
        self._failures += 1
        message = self._scrub(str(error))
        running = self._running
        if isinstance(error, spec.SpecProblem):
            await self._stop_watcher()  # a spec that cannot be used must not keep the old one running
            problem = status.Problem(error.condition_reason, message)
        elif running is not None and not running.task.done():
            log.warning("%s: %s; the running watcher carries on", self.key, message)
            return self._backoff_s()  # e.g. the API server hiccuped while re-reading a Secret
        else:
            await self._stop_watcher()
            problem = status.Problem(names.Reason.SYNC_FAILED, message)
        log.warning("%s: %s (retrying)", self.key, message)
        self._update(generation=generation, suspended=False, problem=problem, synced=False)
        return self._backoff_s()

    def _backoff_s(self) -> float:
        ceiling = min(self._config.retry_max_s, self._config.retry_initial_s * 2 ** min(self._failures, 16))
        return self._rng.uniform(ceiling / 2, ceiling)

    async def _wait(self, stopped: Stopped, *, timeout_s: float) -> None:
        async def until_stopped() -> None:
            await stopped.wait()

        waits = [asyncio.create_task(until_stopped()), asyncio.create_task(self._wakeup.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    def _beat(self) -> None:
        running = self._running
        if running is not None and not running.task.done():
            allowed_s = 2 * running.resolved.spec.resync_interval_s + self._config.watcher_grace_s
            if time.monotonic() - self._last_activity > allowed_s:
                log.error("%s: the watcher reported nothing for %.0fs; not beating", self.key, allowed_s)
                return
        self._liveness.beat(self.key, allowed_silence_s=3 * self._config.heartbeat_s + self._config.retry_max_s)

    # -- manual resync ------------------------------------------------------------------------------------------

    def _handle_resync_request(self) -> None:
        token = _resync_token(self._body)
        if token is None or token in (self.facts.handled_token, self._pending_token):
            return
        self._pending_token = token
        self._fulls_since_request = 0
        if self._running is not None:
            log.info("%s: full resync requested (%s)", self.key, token)
            self._running.watcher.request_resync(watcher.MANUAL)

    def _full_resync_done(self, trigger: str) -> str | None:
        """The token a finished full resync handled, if any (the first to start after the request)."""
        if self._pending_token is None:
            return self.facts.handled_token
        self._fulls_since_request += 1
        if trigger == watcher.MANUAL or self._fulls_since_request >= 2:
            handled, self._pending_token = self._pending_token, None
            return handled
        return self.facts.handled_token

    # -- the watcher's Observer ---------------------------------------------------------------------------------

    def on_sync(self, report: plan.Report, trigger: str) -> None:
        now = self._clock()
        self._last_activity = time.monotonic()
        self._metrics.synced(self.namespace, self.name, trigger, report, at_s=now.timestamp())
        drift = self._drift(report, trigger, now)
        if report.full:
            self._failures = 0
            _release_memory()  # a full resync's working set is large and short-lived: give it back
            counts = status.Counts(report.source_count, report.cached_count, len(report.plan.rejected))
            source_at, cache_at = self._endpoints
            self._update(
                problem=None,
                synced=True,
                counts=counts,
                digest=report.digest,
                last_attempt_at=now,
                last_success_at=now,
                source=status.Link(True, f"connected to {source_at}"),
                cache=status.Link(True, f"connected to {cache_at}"),
                handled_token=self._full_resync_done(trigger),
            )
        elif trigger == watcher.NOTIFY and self.facts.counts is not None:
            self._update(counts=_after_changes(self.facts.counts, report.applied))
        if drift is not None:
            self._update(last_drift=drift, total_repairs=self.facts.total_repairs + drift.total)
        if self.facts.counts is not None:
            self._metrics.counts(
                self.namespace, self.name, source=self.facts.counts.source, cached=self.facts.counts.cached
            )

    def on_sync_failed(self, error: errors.ModcacheError, trigger: str) -> None:
        self._last_activity = time.monotonic()
        self._metrics.failed(self.namespace, self.name, trigger)
        changes = self._failure(error)
        if not set(trigger.split("+")) <= INCREMENTAL_TRIGGERS:
            changes["last_attempt_at"] = self._clock()
        self._update(**changes)

    def _failure(self, error: errors.ModcacheError) -> dict[str, Any]:
        """The facts a failed sync changes; the message says where (host, port, database), never the secret."""
        source_at, cache_at = self._endpoints
        message = self._scrub(errors.truncate(str(error)))
        if isinstance(error, errors.SourceUnavailable):
            detail = f"{source_at}: {message}"
            return {"source": status.Link(False, detail), "problem": status.Problem(R.SOURCE_UNAVAILABLE, detail)}
        if isinstance(error, errors.CacheUnavailable):
            detail = f"{cache_at}: {message}"
            return {"cache": status.Link(False, detail), "problem": status.Problem(R.CACHE_UNAVAILABLE, detail)}
        return {"problem": status.Problem(R.SYNC_FAILED, message)}

    def on_listener(self, connected: bool, detail: str) -> None:
        self._last_activity = time.monotonic()
        was_up = self.facts.listener.up
        self._metrics.listener(self.namespace, self.name, connected)
        self._update(listener=status.Link(connected, self._scrub(detail)))
        unverified = was_up or self.facts.source.up is None  # lost it, or never heard from PostgreSQL
        if unverified and not connected and self._running is not None:
            self._running.watcher.request_resync(watcher.RECONNECT)  # is PostgreSQL itself still there?

    def on_keyspace(self, active: bool, detail: str) -> None:
        self._last_activity = time.monotonic()
        was_active = self.facts.keyspace.up
        self._update(keyspace=status.Link(active, self._scrub(detail)))
        unverified = was_active or self.facts.cache.up is None
        if unverified and not active and self._running is not None:
            self._running.watcher.request_resync(watcher.RECONNECT)  # is Redis itself still there?

    def _drift(self, report: plan.Report, trigger: str, now: datetime.datetime) -> status.Drift | None:
        """Corrections that were drift (the cache diverged), not the propagation of a source change."""
        if report.repaired == 0 or trigger == watcher.NOTIFY:
            return None
        drift = status.Drift(counts=dict(report.applied), trigger=metrics.trigger_label(trigger), at=now)
        self._pending_drift = drift if self._pending_drift is None else self._pending_drift.merged(drift)
        return drift

    # -- status ---------------------------------------------------------------------------------------------------

    def _update(self, **changes: Any) -> None:
        old, self.facts = self.facts, dataclasses.replace(self.facts, **changes)
        events, self._announced = status.events_between(old, self.facts, self._announced)
        for event in events:
            self._post_event(event)
        self._dirty.set()

    async def _write_status_forever(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self._config.status_debounce_s)  # let a burst of reports make one write
            self._dirty.clear()
            try:
                await self._write_status()
            except errors.TransientError as e:
                log.warning("%s: status not written (%s); retrying", self.key, e)
                await asyncio.sleep(self._config.retry_initial_s)
                self._dirty.set()

    async def _write_status(self) -> None:
        now = self._clock()
        update = status.compute(self.facts, self._written, now, timestamp_interval_s=self._config.timestamp_interval_s)
        self._metrics.conditions(self.namespace, self.name, {c["type"]: c["status"] for c in update.conditions})
        drift_event = status.drift_event(
            self._pending_drift, self._drift_announced_at, now, interval_s=self._config.drift_event_interval_s
        )
        if drift_event is not None:
            self._post_event(drift_event)
            self._pending_drift, self._drift_announced_at = None, now
        elif self._pending_drift is not None:
            self._dirty.set()  # announce what piled up once the interval has passed
        if update.status is None:
            return
        if await self._kube.patch_status(self.namespace, self.name, status.patch_for(update.status, self._written)):
            self._written = update.status

    def _scrub(self, text: str) -> str:
        """Remove any Secret value (or the password in it) that a library put into a message."""
        running = self._running
        if running is None:
            return text
        for secret in (running.resolved.database_url, running.resolved.listen_database_url, running.resolved.redis_url):
            if secret is not None:
                text = _without(text, secret.get_secret_value())
        return text


def _innermost(error: BaseException | None) -> BaseException | None:
    """The first real error inside (nested) exception groups, which is what a person needs to read."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


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


def _after_changes(counts: status.Counts, applied: Mapping[plan.Reason, int]) -> status.Counts:
    """Counts after a NOTIFY batch: new modules were written (missing), removed ones deleted (orphan)."""
    delta = applied.get(plan.Reason.MISSING, 0) - applied.get(plan.Reason.ORPHAN, 0)
    return dataclasses.replace(counts, source=counts.source + delta, cached=counts.cached + delta)


def _generation(body: ObjectView) -> int:
    return int(body.metadata.get("generation") or 0)


def _resync_token(body: ObjectView) -> str | None:
    token = (body.metadata.get("annotations") or {}).get(names.RESYNC_ANNOTATION)
    return str(token) if token else None


def _seed_facts(previous: Mapping[str, Any], generation: int) -> status.Facts:
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
