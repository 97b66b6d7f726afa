"""Watch mode: keep one cache converged continuously, from events, so nothing waits for the periodic resync.

The adapters iterate; this module only orchestrates four loops run with ``asyncio.wait`` (the first to fail
unexpectedly stops the others and is raised):

* **source** -- ``pgsource.listen``: NOTIFY hints become path updates; every (re)connect asks for a full resync,
  because notifications sent while the listener was away are lost;
* **cache** -- ``keyevents.KeyEvents``: a foreign change to a content key becomes a path update (verified by
  whole value); a change to the index or the manifest asks for a full resync; a flush, a swap, a restart or a
  lossy failover (the probe) asks for a full resync at once and a deep one right after it; one to the generation
  or the status record is checked first; every (re)subscribe asks for a *deep* resync (a foreign write in the gap
  may have kept a value's length);
* **applier** -- drains the paths queued by the two above and converges them with ``Engine.apply_paths``;
  whatever piled up while a batch ran becomes the next batch, so bursts coalesce with no added delay;
* **resync** -- a full resync on request or every ``resync_interval_s`` (jittered); deep (whole values, SCAN)
  on request and every ``deep_interval_s``; failures retry sooner, with backoff.

An ``Observer`` hears about every sync and every connectivity change; the CLI logs them, the operator turns them
into status conditions, events and metrics.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from modcache import backoff, engine, errors, keyevents, pgsource, plan, settings

log = logging.getLogger(__name__)

# Why a sync ran (a bounded set: used as a metrics label).
CONNECT, RECONNECT, PERIODIC, MANUAL, NOTIFY, KEYSPACE, RETRY, DEEP, EVICTED = (
    "connect", "reconnect", "periodic", "manual", "notify", "keyspace", "retry", "deep", "evicted",
)  # fmt: skip

EVICTION_WINDOW_S = 1.0  # evictions within this long after our repair of evicted keys mean the cache does not fit
EVICTIONS_PER_S = 50  # evicted keys in one second from which the repairs of evicted keys are backed off
EVICTION_BACKOFF_S = 0.5
EVICTION_BACKOFF_MAX_S = 30.0
FIRST_EVENTS_WAIT_S = 5.0  # the first resync waits this long at most for the key events to be subscribed

Backoff = backoff.Backoff
merged_keyspace_flags = keyevents.merged_keyspace_flags


class Observer(Protocol):
    def on_sync(self, report: plan.Report, trigger: str) -> None: ...
    def on_sync_failed(self, error: errors.ModcacheError, trigger: str) -> None: ...
    def on_listener(self, connected: bool, detail: str) -> None: ...
    def on_keyspace(self, active: bool, detail: str) -> None: ...


class LoggingObserver:
    """The default observer: one log line per change worth a person's attention."""

    def on_sync(self, report: plan.Report, trigger: str) -> None:
        if report.plan or report.full:
            kind = "full resync" if report.full else "update"
            log.info("%s (%s): %s in %.3fs", kind, trigger, report.plan.describe(), report.duration_s)
        for rejected in report.plan.rejected:
            log.warning("rejected module %s", rejected)

    def on_sync_failed(self, error: errors.ModcacheError, trigger: str) -> None:
        log.warning("sync (%s) failed: %s", trigger, error)

    def on_listener(self, connected: bool, detail: str) -> None:
        (log.info if connected else log.warning)("listener %s: %s", "connected" if connected else "down", detail)

    def on_keyspace(self, active: bool, detail: str) -> None:
        (log.info if active else log.warning)("keyspace events %s: %s", "on" if active else "off", detail)


@dataclasses.dataclass
class State:
    """What the watcher knows right now (read by the operator's status writer)."""

    listener_connected: bool = False
    listener_server: str | None = None  # host:port of the PostgreSQL the listener reached last
    listener_server_changes: int = 0  # how often it reached another one than before (a failover, a switchover)
    keyspace_active: bool | None = None  # None: not yet known
    full_resyncs: int = 0
    last_full: plan.Report | None = None
    last_error: str | None = None
    evicting: bool = False  # Redis is evicting the cache's keys faster than it can hold them (maxmemory)
    evictions: int = 0  # the cache's keys Redis was heard evicting (a cache that does not fit shows here)


class Watcher:
    def __init__(
        self,
        *,
        engine: engine.Engine,
        settings: settings.Settings,
        listen_dsn: str,
        redis_client: Any = None,  # accepted for callers built before the wiring; the cache's own client is used
        observer: Observer | None = None,
        rng: random.Random | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.state = State()
        self._listen_dsn = settings_module.asyncpg_dsn(listen_dsn)
        self._observer = observer or LoggingObserver()
        self._rng = rng or random.Random()
        self._monotonic = monotonic
        self._resync_wanted = asyncio.Event()
        self._resync_trigger = MANUAL
        self._deep_wanted = True  # nothing was watched before we started
        self._deep_after = False  # a deep resync is due right after the next routine one
        self._last_deep = monotonic()
        self._pending: dict[str, str] = {}
        self._pending_event = asyncio.Event()
        self._cache_heard = asyncio.Event()  # the key-event iterator said whether events flow
        self._claims_wanted = False  # the manifest changed: the next resync may rebuild it from the keys' claims
        self._doubts: set[str] = set()  # roles (generation, status) changed by someone else, checked by one task
        self._doubts_event = asyncio.Event()
        self._evictions: collections.deque[float] = collections.deque()  # when evicted events arrived (last 1 s)
        self._held: set[str] = set()  # evicted paths whose repair waits (Redis is evicting what we write)
        self._held_resync = False  # an evicted bookkeeping key's resync waits too
        self._held_event = asyncio.Event()
        self._deep_task: asyncio.Task[plan.Report] | None = None  # the deep resync running, if one is
        self._preempted: asyncio.Task[plan.Report] | None = None  # the one cancelled because the cache was replaced

    async def run(self) -> None:
        """Run until cancelled (or until a loop fails unexpectedly, which is raised)."""
        with contextlib.suppress(errors.TransientError):  # before the listener connects; every resync learns too
            await self.engine.learn_lineage()
        loops = {
            "modcache-resync": self._resync_loop(),
            "modcache-listener": self._source_loop(),
            "modcache-keyspace": self._cache_loop(),
            "modcache-applier": self._apply_loop(),
            "modcache-bookkeeping": self._doubt_loop(),
            "modcache-evictions": self._eviction_loop(),
        }
        tasks = [asyncio.create_task(coro, name=name) for name, coro in loops.items()]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            await _stop(tasks)

    def source_refusals(self) -> int:
        """PostgreSQL servers refused so far for being another cluster or on an older timeline (``lineage``)."""
        checked = self.engine.source.lineage
        return 0 if checked is None else checked.refusals

    def request_resync(self, trigger: str = MANUAL, *, deep: bool = False) -> None:
        """Ask for a full resync as soon as the current one (if any) is done."""
        self._resync_trigger = trigger
        self._deep_wanted |= deep
        self._resync_wanted.set()

    def enqueue(self, paths: Iterable[str], trigger: str) -> None:
        """Ask for these paths to be converged soon (coalesced with whatever else is waiting)."""
        for path in paths:
            self._pending.setdefault(path, trigger)
        if self._pending:
            self._pending_event.set()

    # -- full resyncs ----------------------------------------------------------------------------------------

    async def _resync_loop(self) -> None:
        retry = Backoff(1.0, self.settings.resync_interval_s, self._rng)
        delay_s = self._interval_s()
        with contextlib.suppress(TimeoutError):  # the first (deep) resync starts once changes are being heard
            await asyncio.wait_for(self._cache_heard.wait(), FIRST_EVENTS_WAIT_S)
        while True:
            trigger = await self._wait_for_resync(delay_s)
            deep = self._deep_wanted or self._monotonic() - self._last_deep >= self.settings.deep_interval_s
            claims, self._claims_wanted = self._claims_wanted, False
            try:
                report = await self._resync(deep=deep, claims=claims)
            except _Preempted:  # the cache was replaced while every value was being compared: refill it first,
                self._deep_wanted = False  # then compare (``_deep_after``)
                self._last_deep = self._monotonic()
                delay_s = 0.0
                continue
            except errors.TransientError as e:
                self.state.last_error = str(e)
                self._observer.on_sync_failed(e, trigger)
                delay_s = retry.next_s()
                if not self._resync_wanted.is_set():  # a request made meanwhile (a reconnect) keeps its trigger
                    self._resync_trigger = RETRY
                continue
            retry.reset()
            if deep:
                self._deep_wanted = False
                self._last_deep = self._monotonic()
            elif self._deep_after or report.claimed:  # values never compared were taken: compare every one now
                self._deep_after = False
                self.request_resync(DEEP, deep=True)
            delay_s = min(self._interval_s(), self._until_deep_s())
            self.state.full_resyncs += 1
            self.state.last_full = report
            self.state.last_error = None
            self._observer.on_sync(report, trigger)

    async def _resync(self, *, deep: bool, claims: bool) -> plan.Report:
        """One full resync; a deep one runs as a task that a flushed or replaced cache cancels (``_preempt``): its
        refill must not wait for 400 MB of values to be compared against a cache that is gone."""
        task = asyncio.create_task(self.engine.full_resync(deep=deep, claims=claims), name="modcache-full-resync")
        self._deep_task = task if deep else None
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task is self._preempted and (current is None or not current.cancelling()):
                raise _Preempted from None
            raise
        finally:
            self._deep_task = None

    def _preempt(self) -> None:
        task = self._deep_task
        if task is not None and not task.done():
            log.warning("the cache was replaced during a deep resync: refilling first, comparing every value after")
            self._preempted = task
            self._deep_after = True
            task.cancel()

    async def _wait_for_resync(self, delay_s: float) -> str:
        try:
            await asyncio.wait_for(self._resync_wanted.wait(), delay_s)
        except TimeoutError:
            if self._resync_trigger == RETRY:
                return RETRY
            return DEEP if self._until_deep_s() <= 0 else PERIODIC
        self._resync_wanted.clear()
        return self._resync_trigger

    def _interval_s(self) -> float:
        jitter = self.settings.resync_jitter_ratio
        return self.settings.resync_interval_s * self._rng.uniform(1 - jitter, 1 + jitter)

    def _until_deep_s(self) -> float:
        return max(0.0, self.settings.deep_interval_s - (self._monotonic() - self._last_deep))

    # -- incremental updates ---------------------------------------------------------------------------------

    async def _apply_loop(self) -> None:
        while True:
            await self._pending_event.wait()
            self._pending_event.clear()
            batch, self._pending = self._pending, {}
            trigger = "+".join(sorted(set(batch.values())))
            try:
                report = await self.engine.apply_paths(batch)
            except errors.TransientError as e:
                self._observer.on_sync_failed(e, trigger)
                self.request_resync(RETRY)  # the full resync retries with backoff and covers these paths
                continue
            if report.plan.repairs:  # a bookkeeping key was rebuilt: the other paths need a look too
                self.request_resync(KEYSPACE)
            self._observer.on_sync(report, trigger)

    # -- PostgreSQL LISTEN -----------------------------------------------------------------------------------

    async def _source_loop(self) -> None:
        connected_before = False
        events = pgsource.listen(
            self._listen_dsn,
            backoff_max_s=self.settings.listener_backoff_max_s,
            keepalive_s=self.settings.listener_keepalive_s,
            rng=self._rng,
            lineage=self.engine.source.lineage,  # a stale former primary's NOTIFYs are not the source's
        )
        async for event in events:
            match event:
                case pgsource.Listening(detail, server):
                    detail = self._note_server(server, detail)
                    self.state.listener_connected = True
                    self._observer.on_listener(True, detail)
                    self.request_resync(RECONNECT if connected_before else CONNECT)
                    connected_before = True
                case pgsource.Hinted(paths):
                    self.enqueue(paths, NOTIFY)  # names are judged by the engine before anything is done
                case pgsource.ResyncAsked():
                    self.request_resync(NOTIFY)
                case pgsource.ListenerLost(detail):
                    self.state.listener_connected = False
                    self._observer.on_listener(False, detail)

    def _note_server(self, server: str, detail: str) -> str:
        """Remember which PostgreSQL server the listener reached; the detail says when it is another one."""
        before, self.state.listener_server = self.state.listener_server, server
        if before is None or before == server:
            return detail
        self.state.listener_server_changes += 1
        log.warning("the listener reached another PostgreSQL server: %s (was %s)", server, before)
        return f"{detail} (was {before})"

    # -- Redis key events --------------------------------------------------------------------------------------

    async def _cache_loop(self) -> None:
        cache = self.engine.cache
        async with keyevents.KeyEvents(
            cache,
            probe_interval_s=self.settings.probe_interval_s,
            backoff_max_s=self.settings.listener_backoff_max_s,
            rng=self._rng,
        ) as events:
            async for event in events:
                await self._on_key_event(event)

    async def _on_key_event(self, event: keyevents.KeyEvent) -> None:
        match event:
            case keyevents.Changed(event="evicted") if self._evicted():
                self._hold(event.path)
            case keyevents.Changed(path=str(path)):
                self.enqueue([path], KEYSPACE)
            case keyevents.Changed(role="manifest"):
                # a deleted manifest is rebuilt from what each content key claims, then every value is compared
                self._claims_wanted = True
                self.request_resync(KEYSPACE)
            case keyevents.Changed(role="index"):
                self.request_resync(KEYSPACE)
            case keyevents.Changed(role=str(role)):
                # checked by ``_doubt_loop``, coalesced: a flood of events on these keys (a co-tenant, a second
                # writer) costs one check at a time, never one round trip per event ahead of every other repair
                self._doubts.add(role)
                self._doubts_event.set()
            case keyevents.Regressed(keyevents.EVICTED) if self._evicted():
                self._hold(None)  # not a flush: keys were evicted; refilled once Redis stops evicting what we write
            case keyevents.Regressed(replaced=False) if self._under_eviction_pressure():
                self._hold(None)  # the generation evicted: the same
            case keyevents.Regressed(detail, replaced):
                # refill at once (the routine resync); a replaced database (flushed, swapped) may hold forged values
                # whose manifest entries agree with them: every value is compared right after
                log.warning("%s: refilling%s", detail, ", then checking every value" if replaced else "")
                self._deep_after |= replaced
                if replaced:
                    self._preempt()
                self.request_resync(KEYSPACE)
            case keyevents.Subscribed(detail):
                self._keyspace_changed(True, detail)
                if self._cache_heard.is_set():  # events published while we were away are lost
                    self.request_resync(RECONNECT, deep=True)
                self._cache_heard.set()
            case keyevents.Lost(detail) | keyevents.Unavailable(detail):
                self._keyspace_changed(False, detail)
                self._cache_heard.set()

    async def _doubt_loop(self) -> None:
        while True:
            await self._doubts_event.wait()
            self._doubts_event.clear()
            roles, self._doubts = self._doubts, set()
            for role in sorted(roles):
                if await self._doubtful(role):
                    self.request_resync(KEYSPACE)

    # -- Redis evicting the cache (maxmemory) ------------------------------------------------------------------

    def _evicted(self) -> bool:
        """Count one eviction; whether Redis has now evicted ``EVICTIONS_PER_S`` keys of the cache within a second:
        then each repair of an evicted key evicts others (the cache does not fit), and repairs are backed off."""
        self._evictions.append(self._monotonic())
        self.state.evictions += 1
        return self._under_eviction_pressure()

    def _under_eviction_pressure(self) -> bool:
        now = self._monotonic()
        while self._evictions and self._evictions[0] < now - 1.0:
            self._evictions.popleft()
        return len(self._evictions) >= EVICTIONS_PER_S

    def _hold(self, path: str | None) -> None:
        if path is None:
            self._held_resync = True
        else:
            self._held.add(path)
        self._held_event.set()

    async def _eviction_loop(self) -> None:
        """Release held repairs with exponential backoff while Redis keeps evicting (at most one batch per delay)."""
        delays = Backoff(EVICTION_BACKOFF_S, EVICTION_BACKOFF_MAX_S, self._rng)
        released_at: float | None = None
        while True:
            await self._held_event.wait()
            # One burst of evictions (someone lowered maxmemory once) is repaired at once; only evictions that go
            # on right after our own repairs (what we write evicts the rest: the cache does not fit) back off.
            if released_at is not None and self._monotonic() - released_at < EVICTION_WINDOW_S:
                delay_s = delays.next_s()
                self.state.evicting = True
                log.warning(
                    "Redis is evicting the cache's keys (maxmemory too small for %d+ modules?): repairs of evicted "
                    "keys wait %.1fs",
                    len(self._held),
                    delay_s,
                )
                await asyncio.sleep(delay_s)
            self._held_event.clear()
            released_at = self._monotonic()
            held, self._held = self._held, set()
            self.enqueue(held, EVICTED)
            if self._held_resync:
                self._held_resync = False
                self.request_resync(EVICTED)
            if not self._under_eviction_pressure():
                delays.reset()
                self.state.evicting = False

    async def _doubtful(self, role: str) -> bool:
        """Whether a foreign change to the generation or the status record needs a resync (another modcache
        writer changes both legitimately, and must not make this one resync after every write).

        A generation that is gone, unbelievable or below what this process has seen is put right at once (reset from
        the server clock, or raised past the high-water): the fence must never wait for a full resync to be sound
        again; the resync that follows checks the manifest against it."""
        cache = self.engine.cache
        try:
            if role == "status":
                return await cache.status_problem() is not None
            seen = cache.high_water
            generation = await cache.read_generation(create=True)
            if generation.value < seen:
                await cache.raise_generation(seen)
                return True
        except errors.TransientError:
            return True
        return bool(generation.problem)

    def _keyspace_changed(self, active: bool, detail: str) -> None:
        if self.state.keyspace_active is not False or active:
            (log.info if active else log.warning)("keyspace events %s: %s", "on" if active else "off", detail)
        self.state.keyspace_active = active
        self._observer.on_keyspace(active, detail)


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again if one swallowed it.

    Python 3.11's ``asyncio.wait_for`` (used inside asyncpg) can lose a cancellation that races with its
    result; a single ``cancel()`` is therefore not enough to stop a loop for sure.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)


class _Preempted(Exception):
    """The running deep resync was cancelled because the cache was replaced (the refill goes first)."""


settings_module = settings  # inside Watcher, ``settings`` is the parameter
