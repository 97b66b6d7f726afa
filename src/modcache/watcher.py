"""Watch mode: keep one cache converged continuously.

Four cooperating loops under one TaskGroup:

* **listener** -- a dedicated asyncpg connection LISTENs on ``keys.NOTIFY_CHANNEL``; it reconnects with
  jittered exponential backoff, and after every (re)connect asks for a full resync, because notifications sent
  while it was away are lost;
* **keyspace** -- a Redis pub/sub subscription to ``del``/``expired``/``evicted`` key events; a module content
  key that disappears is repaired at once. ``notify-keyspace-events`` is enabled (merged with what is set) when
  the server permits; otherwise the watcher runs on the timer alone and says so;
* **applier** -- drains the paths queued by the two above and converges them with ``Engine.apply_paths``;
  whatever piled up while a batch ran becomes the next batch, so bursts coalesce with no added delay;
* **resync** -- a full resync on request (connect, reconnect, manual, TRUNCATE) or every
  ``resync_interval_s`` (jittered); failures retry sooner, with backoff.

An ``Observer`` hears about every sync and every connectivity change; the CLI logs them, the operator turns them
into status conditions, events and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
from collections.abc import Iterable
from typing import Any, Protocol

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from modcache import engine, errors, keys, plan, settings

log = logging.getLogger(__name__)

# Why a sync ran (a bounded set: used as a metrics label).
CONNECT, RECONNECT, PERIODIC, MANUAL, NOTIFY, KEYSPACE, RETRY = (
    "connect", "reconnect", "periodic", "manual", "notify", "keyspace", "retry",
)  # fmt: skip

KEYSPACE_EVENTS = ("del", "expired", "evicted")
_KEYSPACE_FLAGS = "Egxe"  # keyevent channel + generic (del) + expired + evicted
DEEP_EVERY = 12  # every Nth full resync also SCANs for content keys nobody indexed


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
class Backoff:
    """Full-jitter exponential backoff."""

    initial_s: float
    max_s: float
    rng: random.Random
    attempt: int = 0

    def next_s(self) -> float:
        self.attempt += 1
        return self.rng.uniform(0, min(self.max_s, self.initial_s * 2**self.attempt))

    def reset(self) -> None:
        self.attempt = 0


@dataclasses.dataclass
class State:
    """What the watcher knows right now (read by the operator's status writer)."""

    listener_connected: bool = False
    keyspace_active: bool | None = None  # None: not yet known
    full_resyncs: int = 0
    last_full: plan.Report | None = None
    last_error: str | None = None


class Watcher:
    def __init__(
        self,
        *,
        engine: engine.Engine,
        settings: settings.Settings,
        listen_dsn: str,
        redis_client: aioredis.Redis,
        observer: Observer | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.state = State()
        self._listen_dsn = _asyncpg_dsn(listen_dsn)
        self._redis = redis_client
        self._keyspace = engine.cache.keyspace
        self._observer = observer or LoggingObserver()
        self._rng = rng or random.Random()
        self._resync_wanted = asyncio.Event()
        self._resync_trigger = MANUAL
        self._pending: dict[str, str] = {}
        self._pending_event = asyncio.Event()

    async def run(self) -> None:
        """Run until cancelled (or until a loop fails unexpectedly, which is raised)."""
        loops = {
            "modcache-resync": self._resync_loop(),
            "modcache-listener": self._listen_loop(),
            "modcache-keyspace": self._keyspace_loop(),
            "modcache-applier": self._apply_loop(),
        }
        tasks = [asyncio.create_task(coro, name=name) for name, coro in loops.items()]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            await _stop(tasks)

    def request_resync(self, trigger: str = MANUAL) -> None:
        """Ask for a full resync as soon as the current one (if any) is done."""
        self._resync_trigger = trigger
        self._resync_wanted.set()

    def enqueue(self, paths: Iterable[str], trigger: str) -> None:
        """Ask for these paths to be converged soon (coalesced with whatever else is waiting)."""
        for path in paths:
            self._pending.setdefault(path, trigger)
        if self._pending:
            self._pending_event.set()

    # -- full resyncs ----------------------------------------------------------------------------------------

    async def _resync_loop(self) -> None:
        backoff = Backoff(1.0, self.settings.resync_interval_s, self._rng)
        delay_s = self._interval_s()
        while True:
            trigger = await self._wait_for_resync(delay_s)
            try:
                deep = self.state.full_resyncs % DEEP_EVERY == 0
                report = await self.engine.full_resync(deep=deep)
            except errors.TransientError as e:
                self.state.last_error = str(e)
                self._observer.on_sync_failed(e, trigger)
                delay_s = backoff.next_s()
                self._resync_trigger = RETRY
                continue
            backoff.reset()
            delay_s = self._interval_s()
            self.state.full_resyncs += 1
            self.state.last_full = report
            self.state.last_error = None
            self._observer.on_sync(report, trigger)

    async def _wait_for_resync(self, delay_s: float) -> str:
        try:
            await asyncio.wait_for(self._resync_wanted.wait(), delay_s)
        except TimeoutError:
            return RETRY if self._resync_trigger == RETRY else PERIODIC
        self._resync_wanted.clear()
        return self._resync_trigger

    def _interval_s(self) -> float:
        jitter = self.settings.resync_jitter_ratio
        return self.settings.resync_interval_s * self._rng.uniform(1 - jitter, 1 + jitter)

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
            self._observer.on_sync(report, trigger)

    # -- PostgreSQL LISTEN -----------------------------------------------------------------------------------

    async def _listen_loop(self) -> None:
        backoff = Backoff(0.2, self.settings.listener_backoff_max_s, self._rng)
        connected_before = False
        while True:
            detail = await self._listen_once(backoff, RECONNECT if connected_before else CONNECT)
            connected_before |= self.state.listener_connected
            self.state.listener_connected = False
            self._observer.on_listener(False, detail)
            await asyncio.sleep(backoff.next_s())

    async def _listen_once(self, backoff: Backoff, trigger: str) -> str:
        """Connect, LISTEN, ask for a resync, and hold the connection until it fails; returns why it ended."""
        conn: Any = None
        try:
            conn = await asyncpg.connect(
                self._listen_dsn, timeout=10, server_settings={"application_name": "modcache-listener"}
            )
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(keys.NOTIFY_CHANNEL, self._on_notify)
            backoff.reset()
            self.state.listener_connected = True
            self._observer.on_listener(True, f"listening on {keys.NOTIFY_CHANNEL}")
            self.request_resync(trigger)
            await self._hold(conn, lost)
            return "connection lost"
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            return errors.describe(e)
        finally:
            if conn is not None:
                conn.terminate()

    async def _hold(self, conn: Any, lost: asyncio.Event) -> None:
        """Wait until the connection dies; after an idle spell, ping it to catch half-open sockets."""
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), self.settings.listener_keepalive_s)
                return
            await conn.execute("SELECT 1", timeout=5)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            data = json.loads(payload)
            paths = data.get("paths", [])
            if data.get("resync") or not all(isinstance(p, str) for p in paths):
                raise ValueError("asks for a resync")
        except (ValueError, AttributeError, TypeError):
            self.request_resync(NOTIFY)
            return
        self.enqueue(paths, NOTIFY)

    # -- Redis keyspace events -------------------------------------------------------------------------------

    async def _keyspace_loop(self) -> None:
        backoff = Backoff(0.2, self.settings.listener_backoff_max_s, self._rng)
        subscribed_before = False
        while True:
            try:
                problem = await self._enable_keyspace_events()
                if problem is not None:
                    self._keyspace_unavailable(problem)
                    await asyncio.sleep(self.settings.resync_interval_s)  # try again later; the timer covers us
                    continue
                await self._follow_events(backoff, resync=subscribed_before)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
                self._keyspace_changed(False, errors.describe(e))
            subscribed_before = subscribed_before or bool(self.state.keyspace_active)
            await asyncio.sleep(backoff.next_s())

    async def _follow_events(self, backoff: Backoff, *, resync: bool) -> None:
        db = self._redis.connection_pool.connection_kwargs.get("db", 0)
        channels = [f"__keyevent@{db}__:{event}" for event in KEYSPACE_EVENTS]
        async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(*channels)
            backoff.reset()
            self._keyspace_changed(True, f"subscribed to {', '.join(KEYSPACE_EVENTS)} events")
            if resync:
                self.request_resync(RECONNECT)  # events published while we were away are lost
            async for message in pubsub.listen():
                key = message.get("data")
                path = self._keyspace.path_of(key) if isinstance(key, str) else None
                if path is not None:
                    self.enqueue([path], KEYSPACE)

    async def _enable_keyspace_events(self) -> str | None:
        """Turn on the key events we need (keeping any others); None if on, else why not."""
        try:
            current = (await self._redis.config_get("notify-keyspace-events")).get("notify-keyspace-events", "")
            wanted = merged_keyspace_flags(str(current))
            if wanted != current:
                await self._redis.config_set("notify-keyspace-events", wanted)
        except redis.exceptions.ResponseError as e:  # CONFIG disabled, renamed or not permitted (ACL)
            return f"cannot enable notify-keyspace-events ({errors.describe(e)}); repairing on the timer alone"
        return None

    def _keyspace_unavailable(self, problem: str) -> None:
        if self.state.keyspace_active is not False:
            log.warning("%s", problem)
        self._keyspace_changed(False, problem)

    def _keyspace_changed(self, active: bool, detail: str) -> None:
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


def merged_keyspace_flags(current: str) -> str:
    """``current`` plus the flags modcache needs, without dropping any already set."""
    have = set(current)
    if "A" in have:
        have |= set("g$lshzxetd")
    missing = [flag for flag in _KEYSPACE_FLAGS if flag not in have]
    return current + "".join(missing)


def _asyncpg_dsn(url: str) -> str:
    return settings.asyncpg_dsn(url)  # module-level: inside Watcher, `settings` is the parameter
