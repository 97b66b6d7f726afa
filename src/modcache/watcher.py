"""Watch mode: keep one cache converged continuously, from events, so nothing waits for the periodic resync.

The adapters iterate; this module only orchestrates four loops run with ``asyncio.wait`` (the first to fail
unexpectedly stops the others and is raised):

* **source** -- ``pgsource.listen``: NOTIFY hints become path updates; every (re)connect asks for a full resync,
  because notifications sent while the listener was away are lost;
* **cache** -- ``keyevents.KeyEvents``: a foreign change to a content key becomes a path update (verified by whole
  value); members of the index or the manifest changed (``SREM``, ``HSET``, ...) are found by a member check against
  the expected copies and become path updates too; any other change to them asks for a full resync; a flush, a swap, a
  restart or a lossy failover (the probe) asks for a full resync at once and a deep one right after it; one to the
  generation or the status record is checked first; every (re)subscribe asks for a *deep* resync (a foreign write in
  the gap may have kept a value's length);
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

from modcache import backoff, engine, errors, keyevents, pgsource, plan, settings, windows

log = logging.getLogger(__name__)

# Why a sync ran (a bounded set: used as a metrics label).
CONNECT, RECONNECT, PERIODIC, MANUAL, NOTIFY, KEYSPACE, RETRY, DEEP, EVICTED = (
    "connect", "reconnect", "periodic", "manual", "notify", "keyspace", "retry", "deep", "evicted",
)  # fmt: skip

EVICTION_WINDOW_S = 1.0  # evictions within this long after our repair of evicted keys mean the cache does not fit
EVICTIONS_PER_S = 50  # evicted keys in one second from which the repairs of evicted keys are backed off
EVICTION_BACKOFF_S = 0.5
EVICTION_BACKOFF_MAX_S = 30.0
FIRST_EVENTS_WAIT_S = 5.0
#: Reports of a replaced cache whose bookkeeping still looks intact (a write to the probe key) are acted on at most
#: once per this long (attack-9 F6): the first at once, the rest by one routine and one deep resync at its end.
REPLACED_WINDOW_S = 30.0  # the first resync waits this long at most for the key events to be subscribed

#: Key events on the index and the manifest that change members, not the key: what a member check looks for
#: ('-'/'+' index members removed/added, 'r'/'f' manifest fields deleted/written). Any other event on them (DEL,
#: RENAME, EXPIRE, a SUNIONSTORE over the index...) replaces the key: put back from its expected copy, then a full
#: resync.
MEMBER_EVENTS = {
    "index": {"srem": "-", "spop": "-", "sadd": "+"},
    "manifest": {"hdel": "r", "hset": "f", "hincrby": "f", "hincrbyfloat": "f"},
}

#: What member events of the manifest ask for (``MEMBER_EVENTS``): answered by putting its copy back.
_MANIFEST_MARKS = frozenset(MEMBER_EVENTS["manifest"].values())
#: Full resyncs asked for by doubts of the copies: at most one per window (``Watcher._doubt_resync``).
DOUBT_WINDOW_S = 2.0
#: Manifest put-backs allowed within a window while another writer of the copies is about; beyond, member checks
#: answer (``Watcher._put_back_allowed``).
PUT_BACK_BURST = 3
PUT_BACK_WINDOW_S = 10.0
#: A member check is followed by a rest MEMBER_PACE times as long as it took (at most MEMBER_PACE_MAX_S) before the
#: next (``Watcher._pace``).
MEMBER_PACE = 3.0
MEMBER_PACE_MAX_S = 1.0

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
    keyspace_missing: str = ""  # keyspace-event classes Redis does not send and modcache could not set again
    replacements_limited: int = 0  # probe reports of a replaced cache not acted on at once (rate limit, F6)
    member_checks: int = 0  # index/manifest member events answered by a member check instead of a full resync
    members_repaired: int = 0  # index members / manifest fields those checks found changed by someone else
    manifest_put_back: int = 0  # manifest member events answered by putting modcache's copy back
    copies_restored: int = 0  # an index or manifest replaced as a whole, put back from its expected copy


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
        self._routine_wanted = False  # a routine resync was asked for (not only a deep one)
        self._events_complete = False  # every write to a content key is heard (keyevents.Subscribed.complete)
        self._lengths_next = False  # the next routine resync checks lengths whatever the events (a replaced cache)
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
        self._released_at: float | None = None  # when held repairs were last released
        self._released_write = 0  # ``writes_issued`` then: writes after it are (among them) those repairs
        self._thrashing = False  # Redis evicted after one of those repairs was written: the cache does not fit
        self._evicted_at: float | None = None  # when an eviction of the cache's keys was last heard
        self._deep_owed_at: float | None = None  # when a deep resync was owed while Redis evicted (``_owe_deep``)
        self._deep_owed = asyncio.Event()
        self._deep_task: asyncio.Task[bool] | None = None  # the deep resync running (in the background), if one is
        self._preempted: asyncio.Task[bool] | None = None  # the one cancelled because the cache was replaced
        # reports of a replaced cache acted on at once (the rest owe one routine and one deep resync at the end)
        self._replaced = windows.OncePerWindow(REPLACED_WINDOW_S, self._owed_resync, monotonic)
        self._members_wanted: set[str] = set()  # what member events ask a member check to look for (MEMBER_EVENTS)
        self._members_event = asyncio.Event()
        # "index"/"manifest" replaced as a whole, to be put back from the copy -> ``_copy_writes`` when it was heard
        self._restores: dict[str, int] = {}
        self._copy_writes = 0  # foreign writes to the expected copies heard (a copy written since is not put back)
        self._member_events = 0  # member events heard
        self._put_backs: collections.deque[float] = collections.deque()  # when the last put-backs ran (a window)
        self._copies_written_at: float | None = None  # when a foreign write to the copies was last heard
        # the full resyncs doubts of the copies ask for (``_doubt_resync``)
        self._doubted = windows.OncePerWindow(DOUBT_WINDOW_S, lambda: self.request_resync(KEYSPACE), monotonic)
        self._deep_retry = Backoff(1.0, self.settings.resync_interval_s, self._rng)  # a failed deep resync again
        self._deep_retry_due: asyncio.TimerHandle | None = None
        self._member_events_settled = 0  # ... when the last settle of the copies began (it covers those)
        # someone else wrote the expected copies: compared with index and manifest before the next full resync; so
        # they are at the start, and after every gap in the key events: what was written unheard is not believed (a
        # put-back makes the copy the manifest; attack-10 E1-E3: a copy forged, or left behind by an older modcache,
        # while nobody listened)
        self._expected_doubted = True
        self._settling = 0  # settles of the expected copies running (member checks wait for them)
        self._copies_settled = asyncio.Event()  # a settle of the expected copies ended (``_member_loop`` waits)

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
            "modcache-members": self._member_loop(),
            "modcache-owed-deep": self._owed_deep_loop(),
        }
        tasks = [asyncio.create_task(coro, name=name) for name, coro in loops.items()]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            await _stop(tasks)
            self._replaced.cancel()  # nothing owed runs on a watcher that has stopped
            self._doubted.cancel()
            if self._deep_retry_due is not None:
                self._deep_retry_due.cancel()

    def source_refusals(self) -> int:
        """PostgreSQL servers refused so far for being another cluster or on an older timeline (``lineage``)."""
        checked = self.engine.source.lineage
        return 0 if checked is None else checked.refusals

    def request_resync(self, trigger: str = MANUAL, *, deep: bool = False) -> None:
        """Ask for a full resync as soon as the current one (if any) is done; ``deep``: one that compares every value
        (it runs in the background; a routine one runs too unless only a deep one was asked for, ``DEEP``)."""
        self._resync_trigger = trigger
        self._deep_wanted |= deep
        self._routine_wanted |= trigger != DEEP
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
        try:
            while True:
                trigger = await self._wait_for_resync(delay_s)
                routine, self._routine_wanted = self._routine_wanted or trigger in (PERIODIC, RETRY), False
                deep = self._deep_wanted or self._monotonic() - self._last_deep >= self.settings.deep_interval_s
                if deep and self._deep_task is None:
                    # in the background: a routine resync asked for meanwhile (a fault in the index, a flush) runs at
                    # once instead of waiting for every value to be compared (seconds at 10,000 modules and more)
                    deep_task = self._start_deep(trigger)
                    if not self.state.full_resyncs:  # the first (the cold fill): routine ones would only repeat it
                        if not await deep_task:
                            delay_s = retry.next_s()
                            if not self._resync_wanted.is_set():
                                self._resync_trigger = RETRY
                            continue
                        retry.reset()
                        routine = False
                if not routine:  # only a deep one was asked for: it runs (or follows the one running)
                    delay_s = min(self._interval_s(), self._until_deep_s())
                    continue
                claims, self._claims_wanted = self._claims_wanted, False
                try:
                    # lengths are left unchecked only while every write to a content key is heard (each one is then
                    # compared by whole value on its event; docs/integrity.md)
                    lengths, self._lengths_next = not self._events_complete or self._lengths_next, False
                    await self._settle_expected()
                    report = await self.engine.full_resync(claims=claims, lengths=lengths)
                except errors.TransientError as e:
                    self.state.last_error = str(e)
                    self._observer.on_sync_failed(e, trigger)
                    self._lengths_next = True
                    delay_s = retry.next_s()
                    if not self._resync_wanted.is_set():  # a request made meanwhile (a reconnect) keeps its trigger
                        self._resync_trigger = RETRY
                    continue
                retry.reset()
                if self._deep_after:  # a replaced cache: compare every value now
                    self._deep_after = False
                    self.request_resync(DEEP, deep=True)
                elif report.claimed:  # values never compared were taken: compare every one, once Redis has room
                    self._owe_deep()
                delay_s = min(self._interval_s(), self._until_deep_s())
                self._record_full(report, trigger)
        finally:
            if self._deep_task is not None:
                self._deep_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._deep_task

    def _retry_deep(self) -> None:
        self._deep_retry_due = None
        if self._deep_wanted:  # not taken by a deep resync started meanwhile
            self.request_resync(DEEP, deep=True)

    def _record_full(self, report: plan.Report, trigger: str) -> None:
        self.state.full_resyncs += 1
        self.state.last_full = report
        self.state.last_error = None
        self._observer.on_sync(report, trigger)

    def _start_deep(self, trigger: str) -> asyncio.Task[bool]:
        self._deep_wanted = False  # taken: a request made while it runs sets it again, for one more after it
        self._last_deep = self._monotonic()  # the interval counts from its start (no routine ones in a loop meanwhile)
        task = asyncio.create_task(self._run_deep(trigger), name="modcache-deep-resync")
        self._deep_task = task
        return task

    async def _run_deep(self, trigger: str) -> bool:
        """One deep resync (a task that a flushed or replaced cache cancels, ``_preempt``: its refill must not wait
        for 400 MB of values to be compared against a cache that is gone); whether it completed."""
        current = asyncio.current_task()
        try:
            await self._settle_expected()
            report = await self.engine.full_resync(deep=True)
        except asyncio.CancelledError:
            if current is not self._preempted or (current is not None and current.cancelling() > 1):
                raise
            self._last_deep = self._monotonic()  # refilled first, then compared again (``_deep_after``)
            return False
        except errors.TransientError as e:
            self.state.last_error = str(e)
            self._observer.on_sync_failed(e, trigger)
            # tried again after a backoff: the reconnect's own deep resync, failing on a pooled connection a restart of
            # Redis had closed, waited for the next periodic resync (five minutes without its comparison)
            self._deep_wanted = True
            if self._deep_retry_due is None:
                delay_s = self._deep_retry.next_s()
                self._deep_retry_due = asyncio.get_running_loop().call_later(delay_s, self._retry_deep)
            return False
        finally:
            if self._deep_task is current:
                self._deep_task = None
        self._last_deep = self._monotonic()
        self._deep_retry.reset()
        self._record_full(report, trigger)
        if self._deep_wanted:  # asked for again while this one ran (events missed after it had read them)
            self._resync_trigger = DEEP
            self._resync_wanted.set()
        return True

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
                self._lengths_next = True  # the events of these paths were heard and are gone: lengths must tell
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
        if isinstance(event, keyevents.Subscribed | keyevents.Lost | keyevents.Unavailable | keyevents.Degraded):
            self._on_connectivity(event)
            return
        match event:
            case keyevents.Changed(event="evicted") if self._evicted(event.after_write):
                # an evicted manifest is rebuilt from the keys' claims, as a deleted one (10,000 values otherwise)
                self._claims_wanted |= event.role == "manifest"
                self._hold(event.path)
            case keyevents.Changed(path=str(path)):
                self.enqueue([path], KEYSPACE)
            case keyevents.Changed(role=str(role), event=kind):
                self._on_bookkeeping(role, kind)
            case keyevents.Regressed(keyevents.EVICTED) if self._evicted(self.engine.cache.writes_heard) or (
                self.state.evicting  # backing off: a refill at once would be one more repair Redis evicts
            ):
                self._hold(None)  # not a flush: keys were evicted; refilled once Redis stops evicting what we write
            case keyevents.Regressed(replaced=False) if self._under_eviction_pressure() or self.state.evicting:
                self._hold(None)  # the generation evicted: the same
            case keyevents.Regressed(replaced=True, probe_key=str(probe_key)) if await self._replaced_again(probe_key):
                pass  # rate-limited: the resyncs it owes run once at the end of the window (``_replaced_again``)
            case keyevents.Regressed(detail, replaced):
                # refill at once (the routine resync); a replaced database (flushed, swapped) may hold forged values
                # whose manifest entries agree with them: every value is compared right after
                log.warning("%s: refilling%s", detail, ", then checking every value" if replaced else "")
                self._deep_after |= replaced
                self._lengths_next = True  # what is there now was never heard being written
                if replaced:
                    self._preempt()
                self.request_resync(KEYSPACE)

    def _on_bookkeeping(self, role: str, kind: str) -> None:
        """Someone else changed one of modcache's own keys (``role``) with the event ``kind``."""
        match role:
            case "index" | "manifest" if kind in MEMBER_EVENTS[role]:
                # the event names the key, not the member: a member check finds which (``_member_loop``)
                self._member_events += 1
                self._members_wanted.add(MEMBER_EVENTS[role][kind])
                self._members_event.set()
            case keyevents.EXPECTED_ROLE:
                self._expected_doubted = True  # not believed until a full resync has rebuilt them
                self._copy_writes += 1
                self._copies_written_at = self._monotonic()
                self._doubt_resync()
            case "index" | "manifest":
                # replaced as a whole (DEL, RENAME, EXPIRE, a SUNIONSTORE over the index...): modcache's copy is put
                # back at once (``_member_loop``, in order with the member checks), then a full resync compares
                # (not when the copies are doubted already: -1 never equals the count)
                self._restores[role] = -1 if self._expected_doubted else self._copy_writes
                # if the copy cannot be put back after all (doubted by then: a forged notification of it in the same
                # transaction), the full resync rebuilds the manifest from the keys' claims, not value by value (4.7 s
                # at 100,000: attack-11 F4); put back, it lacks nothing, and nothing is taken on a claim
                self._claims_wanted |= role == "manifest"
                self._members_event.set()
            case _:
                # checked by ``_doubt_loop``, coalesced: a flood of events on these keys (a co-tenant, a second
                # writer) costs one check at a time, never one round trip per event ahead of every other repair
                self._doubts.add(role)
                self._doubts_event.set()

    def _doubt_resync(self) -> None:
        """The full resync a doubt of the copies asks for (it compares them with index and manifest first: two walks of
        the manifest in Lua): at most one per ``DOUBT_WINDOW_S``, the next one at the window's end. Anyone may PUBLISH
        a forged notification of a copy: one every 20 ms kept Redis 56-66 % busy (attack-11 F2). Member events wait
        for it meanwhile (the copies cannot be believed); any other full resync settles the copies too."""
        self._doubted.ask()

    def _on_connectivity(
        self, event: keyevents.Subscribed | keyevents.Lost | keyevents.Unavailable | keyevents.Degraded
    ) -> None:
        match event:
            case keyevents.Subscribed(detail, complete):
                self._events_complete = complete
                self.state.keyspace_missing = ""
                self._keyspace_changed(True, detail)
                if self._cache_heard.is_set():  # events published while we were away are lost
                    self._expected_doubted = True
                    self._copy_writes += 1
                    self.request_resync(RECONNECT, deep=True)
                self._cache_heard.set()
            case keyevents.Degraded(detail, missing):
                self._events_complete = False
                self.state.keyspace_missing = missing
                self._keyspace_changed(False, detail)
            case keyevents.Lost(detail) | keyevents.Unavailable(detail):
                self._events_complete = False
                self._keyspace_changed(False, detail)
                self._cache_heard.set()

    async def _replaced_again(self, probe_key: str) -> bool:
        """Whether a report of a replaced cache is rate-limited: another came less than ``REPLACED_WINDOW_S`` ago, the
        probe key whose watch was touched is still there, and the bookkeeping still looks like ours (the generation
        believable and not behind, index and manifest of their types): what a write to the probe key looks like.
        Anyone who can write under the prefix can touch the probe key as often as they like, and each report costs a
        routine and a deep resync; rate-limited, they cost one of each per window (at its end). A flush takes the
        probe key with everything else (the bookkeeping may already be back: our own repairs of the keys the same
        round's events named write it): within the window it is refilled at once, and only its deep resync waits
        for the window's end."""
        if self._replaced.open():
            return False
        cache = self.engine.cache
        try:
            seen, found = cache.high_water, await cache.read_generation(create=False)
            # the probe key named by the report, not the one armed since: anyone can SCAN for it and set it again,
            # after a FLUSHDB too (attack-9d F2), so the bookkeeping must be there as well
            modules = self.state.last_full.source_count if self.state.last_full is not None else 0
            missing = await cache.bookkeeping_missing(modules=modules)
            gone = not probe_key or await cache.key_type(probe_key) == "none" or bool(missing)
        except errors.TransientError:
            return False
        self.state.replacements_limited += 1
        self._lengths_next = True  # whatever comes back meanwhile, the next routine resync checks every key's length
        self._replaced.owe()
        if gone or found.problem or found.value < seen or found.wrong_types:
            # refilled at once (a DEL of the probe key looks the same, and costs the routine resync only); the deep
            # resync, the expensive part, is owed at the window's end
            log.warning("the cache was flushed or replaced again within %.0fs: refilling now", REPLACED_WINDOW_S)
            self._lengths_next = True  # a deep resync running goes on beside the refill (it runs in the background)
            self.request_resync(KEYSPACE)
        return True

    def _owed_resync(self) -> None:
        self._deep_after = True
        self._lengths_next = True
        self.request_resync(KEYSPACE)

    # -- index and manifest members changed by someone else -----------------------------------------------------

    async def _member_loop(self) -> None:
        """Answer member events (coalesced: one check at a time looks for all that arrived meanwhile) by finding the
        members that differ from the expected copies, then converging just those: valid paths through the applier
        (compared by whole value with their rows), names that are no content key unlisted. A copy that cannot be
        believed (absent, written by someone else) or too many changes: a full resync, as before."""
        while True:
            await self._members_event.wait()
            if self._expected_doubted or self._settling:
                # the full resync the doubt asked for settles the copies before it reads index and manifest: a change
                # made before that is in the copies too, and that resync repairs it; one made after it is a difference
                # the check finds once they are settled (asking for one more full resync here, as before, left one
                # queued behind the settling one, and it repaired the next fault instead of a member check)
                self._copies_settled.clear()
                await self._copies_settled.wait()
                if self._member_events == self._member_events_settled:  # all heard before it: nothing to put back
                    self._members_wanted.clear()  # (a put-back writes whatever it finds: another watcher would hear it)
                    if not self._restores:  # a key replaced meanwhile is still put back (or rebuilt): attack-11 F3
                        self._members_event.clear()
                continue
            self._members_event.clear()
            if self._restores:
                await self._restore()
            wanted, self._members_wanted = self._members_wanted, set()
            started = self._monotonic()
            if wanted & _MANIFEST_MARKS and await self._put_manifest_back():
                wanted -= _MANIFEST_MARKS
            if wanted:
                await self._check_members(wanted)
            await self._pace(self._monotonic() - started)  # after the repair is under way: it is not delayed

    async def _check_members(self, wanted: set[str]) -> None:
        names = await self._changed_members(wanted)
        if names is None:
            self._claims_wanted |= bool(wanted & _MANIFEST_MARKS)  # as for any manifest event (rebuilt from claims)
            self.request_resync(KEYSPACE)
            return
        self.state.member_checks += 1
        self.state.members_repaired += len(names)
        ks = self.engine.cache.keyspace
        invalid = [n for n in names if ks.name_problem(n) is not None]
        if invalid:
            await self._unlist(invalid)
        self.enqueue([n for n in names if ks.name_problem(n) is None], KEYSPACE)

    def _put_back_allowed(self) -> bool:
        """Whether a put-back may run now. A put-back writes whatever it finds, and anyone may PUBLISH a forged
        ``hset`` notification: another watcher of the cache cannot tell those writes from an attacker's, doubts its
        copies and resyncs in full, and its own put-backs are this watcher's foreign writes in turn (attack-10 E5).
        So once a foreign write to the copies was heard within ``PUT_BACK_WINDOW_S`` (another writer is about), at
        most ``PUT_BACK_BURST`` put-backs run within the window; beyond, the member check answers (a paced walk that
        writes only what differs). Alone on the cache, every put-back runs (paced)."""
        now = self._monotonic()
        while self._put_backs and now - self._put_backs[0] >= PUT_BACK_WINDOW_S:
            self._put_backs.popleft()
        crowded = self._copies_written_at is not None and now - self._copies_written_at < PUT_BACK_WINDOW_S
        if crowded and len(self._put_backs) >= PUT_BACK_BURST:
            return False
        self._put_backs.append(now)
        return True

    async def _put_manifest_back(self) -> bool:
        """Manifest fields changed by someone else (HSET, HDEL, ...): the event names the manifest, not the field, and
        Redis has no C-level diff of two hashes (the member check's Lua walk took ~250 ms at 100,000 entries), but it
        renames one in O(1): the expected copy, what modcache last wrote, is put in the manifest's place, and the copy
        is then made again from a spare one (a COPY, ~45 ms at 100,000 entries, with the manifest right already); paced
        as a member check. A content key changed with it has events of its own. False when a member check must tell."""
        if not self._put_back_allowed():
            return False
        try:
            report = await self.engine.put_manifest_back()
        except errors.TransientError as e:
            self._observer.on_sync_failed(e, KEYSPACE)
            return False
        if report is None:
            return False
        self.state.manifest_put_back += 1
        self._observer.on_sync(report, KEYSPACE)
        return True

    async def _pace(self, spent_s: float) -> None:
        """Rest ``MEMBER_PACE`` times as long as a member check took before the next may start. The manifest's is
        a Lua walk of every field that holds Redis for its whole length (~250 ms at 100,000 modules), and anyone may
        PUBLISH a keyspace notification: 200 forged ``hset`` events a second kept Redis busy for every Bifrost
        worker (attack-9d F6). Paced, a flood costs Redis at most 1/(1 + MEMBER_PACE) of its time, and a real
        event waits at most that much longer."""
        await asyncio.sleep(min(spent_s * MEMBER_PACE, MEMBER_PACE_MAX_S))

    async def _restore(self) -> None:
        """The index or the manifest replaced as a whole by someone else: the expected copy put in its place (workers
        find every module again at once; a manifest so restored keeps its fence and lengths), then a full resync
        compares it with the source. Without a copy that can be believed (absent, written by someone else) the full
        resync rebuilds the key, as before: a manifest from what each content key claims, then a deep resync."""
        roles, self._restores = self._restores, {}
        resync = False
        for role, copy_writes in sorted(roles.items()):
            restored: bool | None = False
            if not self._expected_doubted and copy_writes == self._copy_writes:
                try:
                    restored = await self.engine.cache.restore_from_copy(role)
                except errors.TransientError as e:
                    self._observer.on_sync_failed(e, KEYSPACE)
            if restored is None:  # intact to look at (a forged notification?): its members are compared instead
                self._members_wanted |= {"-", "+"} if role == "index" else {"r", "f"}
                continue
            resync = True
            if restored:
                self.state.copies_restored += 1
                (log.warning if self.state.copies_restored == 1 else log.debug)(
                    "the %s was replaced by someone else: modcache's copy is back, a full resync checks it", role
                )
            else:
                self._claims_wanted |= role == "manifest"
        if resync:
            self.request_resync(KEYSPACE)

    async def _changed_members(self, wanted: set[str]) -> list[str] | None:
        """The index members and manifest fields someone else changed, or None if a full resync must tell."""
        cache, names = self.engine.cache, []
        try:
            if wanted & {"-", "+"}:
                found = await cache.index_changes(removed="-" in wanted, added="+" in wanted)
                if found is None:
                    return None
                names += found
            if wanted & {"r", "f"}:
                found = await cache.manifest_changes(dropped="r" in wanted, written="f" in wanted)
                if found is None:
                    return None
                names += found
        except errors.TransientError as e:
            self._observer.on_sync_failed(e, KEYSPACE)
            return None
        return sorted(set(names))

    async def _unlist(self, names: list[str]) -> None:
        try:
            report = await self.engine.unlist(names)
        except errors.TransientError as e:
            self._observer.on_sync_failed(e, KEYSPACE)
            self.request_resync(RETRY)  # the full resync unlists them too
            return
        self._observer.on_sync(report, KEYSPACE)

    async def _settle_expected(self) -> None:
        """Before a full resync reads the index and the manifest: make the expected copies agree with them where they
        cannot be believed -- rebuilt when absent or of another size, compared in full after someone else wrote them,
        rewriting only what differs (another modcache process's ``APPLY`` writes them too, and this watcher's
        rewriting them would be that process's foreign change in turn: two watchers must not resync each other
        forever). Whatever the originals hold wrong then is in the copies too, and the resync that follows repairs
        it in both (``APPLY`` writes both alike), so after it they differ only where someone else wrote after the
        settle: a difference the member check finds. Settled after the resync instead, a change landing between its
        reads and the settle was taken into the copies, and only one more full resync could find it (it then also
        repaired the next member fault, which a member check should have). A failure is the resync's."""
        doubted, self._expected_doubted = self._expected_doubted, False  # a foreign write from now on: doubted again
        self._member_events_settled = self._member_events
        cache = self.engine.cache
        self._settling += 1
        try:
            changed = await cache.settle_expected()
            if doubted and not changed:
                index = await cache.index_changes(removed=True, added=True)
                manifest = await cache.manifest_changes(dropped=True, written=True)
                # the spare was compared with the manifest by field, and is made again if its size still differs
                await cache.settle_expected(rebuild=index is None or manifest is None)
        except errors.TransientError:
            self._expected_doubted |= doubted
            raise
        finally:
            self._settling -= 1
            self._copies_settled.set()

    async def _doubt_loop(self) -> None:
        while True:
            await self._doubts_event.wait()
            self._doubts_event.clear()
            roles, self._doubts = self._doubts, set()
            for role in sorted(roles):
                if await self._doubtful(role):
                    self.request_resync(KEYSPACE)

    # -- Redis evicting the cache (maxmemory) ------------------------------------------------------------------

    def _evicted(self, after_write: int) -> bool:
        """Count one eviction (heard after this process's write number ``after_write`` began); whether Redis has now
        evicted ``EVICTIONS_PER_S`` keys of the cache within a second: then repairs of evicted keys are held.

        An eviction heard within ``EVICTION_WINDOW_S`` of a release, after the begin marker of a write made since
        that release, happened after our repairs were written: what we write evicts the rest (the cache does not
        fit), and the next release backs off. The rest of one burst (someone lowered ``maxmemory`` once: every
        event was published before we wrote anything) is released at once however many events it has."""
        now = self._monotonic()
        self._evictions.append(now)
        self._evicted_at = now
        self.state.evictions += 1
        released = self._released_at
        if released is not None and now - released < EVICTION_WINDOW_S and after_write > self._released_write:
            self._thrashing = True
        return self._under_eviction_pressure()

    def _under_eviction_pressure(self) -> bool:
        now = self._monotonic()
        while self._evictions and self._evictions[0] < now - 1.0:
            self._evictions.popleft()
        return len(self._evictions) >= EVICTIONS_PER_S

    def _owe_deep(self) -> None:
        """A routine resync took values on their claims (a manifest deleted, or evicted): every value is compared by
        a deep resync -- at once, unless Redis is evicting the cache's keys. Then the manifest is evicted again and
        again (an ``allkeys-*`` policy, a cache that does not fit), each rebuild from claims owed one more deep
        resync, and every module was read from PostgreSQL about once a second for as long as Redis evicted; that deep
        resync now waits until Redis has room again (``_owed_deep_loop``), or a deep resync started meanwhile took
        its place. A foreign write to a content key meanwhile is still compared by whole value on its event."""
        if self._evicting_recently(EVICTION_WINDOW_S):
            if self._deep_owed_at is None:
                log.warning("values were taken on their claims while Redis evicts: the deep resync waits for room")
                self._deep_owed_at = self._monotonic()
            self._deep_owed.set()
        else:
            self.request_resync(DEEP, deep=True)

    def _evicting_recently(self, within_s: float) -> bool:
        """Whether Redis evicted the cache's keys within ``within_s``, or repairs of evicted keys are held (while they
        are, nothing is written, and Redis may be quiet for the whole backoff)."""
        heard = self._evicted_at is not None and self._monotonic() - self._evicted_at < within_s
        return heard or bool(self._held) or self._held_resync

    async def _owed_deep_loop(self) -> None:
        """Run the deep resync ``_owe_deep`` put off once Redis has room: no repair of an evicted key held, and no
        eviction heard for ``EVICTION_WINDOW_S`` (``INFO``'s ``used_memory`` does not tell: an eviction burst leaves it
        well below ``maxmemory`` between our writes); none if a deep resync started since it was owed."""
        while True:
            await self._deep_owed.wait()
            await asyncio.sleep(EVICTION_BACKOFF_S)
            if self._evicting_recently(EVICTION_WINDOW_S):
                continue
            owed_at, self._deep_owed_at = self._deep_owed_at, None
            self._deep_owed.clear()
            if owed_at is not None and self._last_deep < owed_at:
                self.request_resync(DEEP, deep=True)

    def _hold(self, path: str | None) -> None:
        if path is None:
            self._held_resync = True
        else:
            self._held.add(path)
        self._held_event.set()

    async def _eviction_loop(self) -> None:
        """Release held repairs, with exponential backoff while Redis evicts what those repairs wrote and is at its
        ``maxmemory`` (at most one batch per delay then); a burst that our writes did not cause, or one after which
        Redis has room again (someone lowered ``maxmemory`` for a moment), is released at once and resets the
        backoff. Without ``INFO`` (ACL) the evictions after our writes alone decide."""
        delays = Backoff(EVICTION_BACKOFF_S, EVICTION_BACKOFF_MAX_S, self._rng)
        while True:
            await self._held_event.wait()
            if self._thrashing and await self.engine.cache.at_memory_limit() is not False:
                delay_s = delays.next_s()
                self.state.evicting = True
                log.warning(
                    "Redis is evicting the cache's keys as they are repaired (maxmemory too small for %d+ modules?): "
                    "repairs of evicted keys wait %.1fs",
                    len(self._held),
                    delay_s,
                )
                await asyncio.sleep(delay_s)
            else:
                delays.reset()
                self.state.evicting = False
            self._held_event.clear()
            self._released_at = self._monotonic()
            self._released_write = self.engine.cache.writes_issued
            self._thrashing = False  # only what these repairs cause counts against the next release
            held, self._held = self._held, set()
            self.enqueue(held, EVICTED)
            if self._held_resync:
                self._held_resync = False
                self.request_resync(EVICTED)

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


settings_module = settings  # inside Watcher, ``settings`` is the parameter
