"""One ModuleCache's supervisor: decides from state what should run for it, and makes it so.

``Supervisor.run`` is what the kopf daemon awaits. Each pass of its loop looks at state, never at what woke it:

* the object kopf keeps current: generation, spec, ``suspend``, the resync annotation;
* the Secrets it names, read by name (GET: no list, no watch) when the generation changed since the last
  successful read and on a jittered period (``secret_recheck_s``, the rotation delay); a changed
  ``resourceVersion`` or content means a rotation and, if a value changed, a restarted watcher;
* its watcher: missing, crashed (restarted after a backoff), or running another configuration;
* the other ModuleCaches' key-prefix claims (``claims``): a younger one that overlaps is refused (PrefixConflict);
* the fence: once this replica may no longer write (the Lease is lost), nothing starts.

A wake-up (``poke``: kopf saw the object change, a claim changed, the watcher ended) only makes the next pass
come sooner, so none can be lost; a pass sleeps until its earliest deadline (a retry, the next Secret read) or
the heartbeat. Every failure path backs off with jitter up to ``retry_max_s``, and a new generation starts over.
What the supervisor decides, the ``reporter.Reporter`` writes into the status.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from modcache import errors, watcher, wiring
from modcache_operator import (
    backoff,
    claims,
    clock,
    fence,
    health,
    kube,
    names,
    prefixes,
    reporter,
    spec,
    status,
    statuswriter,
    tunables,
)

log = logging.getLogger(__name__)

R = names.Reason
#: The shortest sleep: a deadline a hair away is slept past, never approached by ever tinier sleeps.
MIN_SLEEP_S = 0.001


class Stopped(Protocol):
    """kopf's ``stopped`` flag of a daemon (or an asyncio.Event in tests)."""

    def is_set(self) -> bool: ...
    def wait(self) -> Awaitable[Any]: ...


class SecretReader(Protocol):
    def read_secret(self, namespace: str, name: str, *, field: str) -> Awaitable[kube.SecretData]: ...


#: ``application_name`` of the operator's PostgreSQL connections.
APPLICATION_NAME = "modcache-operator"


@dataclasses.dataclass
class Running:
    """The watcher of one resolved configuration, in a task that owns its connections (the core's wiring)."""

    resolved: spec.Resolved
    task: asyncio.Task[None] = dataclasses.field(init=False)
    current: watcher.Watcher | None = None  # once its connections are made
    error: BaseException | None = None

    def start(self, name: str, *, observer: watcher.Observer, on_done: Callable[[], None]) -> None:
        self.task = asyncio.create_task(self._run(observer), name=name)
        self.task.add_done_callback(lambda _: on_done())

    def request_resync(self, trigger: str = watcher.MANUAL) -> None:
        if self.current is not None:  # before it exists, its first full resync (on connect) is still to come
            self.current.request_resync(trigger)

    def listener_server_changes(self) -> int:
        """How often the watcher's listener reached another PostgreSQL server than before (a failover)."""
        return 0 if self.current is None else self.current.state.listener_server_changes

    def source_refusals(self) -> int:
        """PostgreSQL servers the watcher refused (another cluster, an older timeline: a stale former primary)."""
        return 0 if self.current is None else self.current.source_refusals()

    async def _run(self, observer: watcher.Observer) -> None:
        """The watcher, its failure kept here rather than in the task: when kopf stops, it re-raises whatever
        the tasks it outlived ended with, and an error that surfaced while cancelling must not fail the
        operator's shutdown."""
        settings, prune = self.resolved.settings(), self.resolved.spec.prune
        try:
            async with wiring.connect(settings, application_name=APPLICATION_NAME, prune=prune) as wired:
                self.current = wired.watcher(observer=observer)
                await self.current.run()
        except Exception as e:  # a crash, reported by the supervisor
            self.error = e


@dataclasses.dataclass(frozen=True)
class _Resolution:
    """The last successful read of the Secrets: for which generation, which Secret versions, and the result."""

    generation: int
    versions: dict[str, str]  # Secret name -> resourceVersion and a digest of its data
    resolved: spec.Resolved


class Supervisor:
    def __init__(
        self,
        *,
        namespace: str,
        name: str,
        body: statuswriter.ObjectView,
        secrets: SecretReader,
        reporter: reporter.Reporter,
        claims: claims.Registry,
        fence: fence.Fence,
        liveness: health.Liveness,
        tunables: tunables.Tunables = tunables.DEFAULT,
        clock: clock.Clock = clock.SYSTEM,
        rng: random.Random | None = None,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self._body = body
        self._secrets = secrets
        self.reporter = reporter
        self._claims = claims
        self._fence = fence
        self._liveness = liveness
        self._tunables = tunables
        self._clock = clock
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._running: Running | None = None
        self._resolution: _Resolution | None = None
        self._next_read_at = 0.0
        self._retry_at = 0.0
        self._backoff = backoff.Backoff(tunables.retry_initial_s, tunables.retry_max_s, self._rng)
        self._backoff_generation: int | None = None
        self._complaint: str | None = None
        self._started_at = clock.monotonic()

    @property
    def owner(self) -> prefixes.Owner:
        return (self.namespace, self.name)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def poke(self) -> None:
        """Something this supervisor looks at may have changed: look again now rather than at the next deadline."""
        self._wake.set()

    async def run(self, stopped: Stopped) -> None:
        """Supervise until ``stopped`` is set, then stop the watcher (bounded) and return."""
        self._claims.subscribe(self.owner, self.poke)
        self._fence.on_close(self, self._halt)
        writer = asyncio.create_task(self.reporter.writer.write_forever(), name=f"modcache-status-{self.key}")
        try:
            while not stopped.is_set():
                self._wake.clear()
                self._beat()
                delay_s = await self._step()
                await self._sleep(stopped, delay_s)
        finally:
            await self._stop_watcher()
            self._claims.unsubscribe(self.owner)
            self._fence.forget(self)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            self._liveness.forget(self.key)

    # -- one pass ---------------------------------------------------------------------------------------------

    async def _step(self) -> float:
        """Make what runs match the state; how long until something is due again."""
        generation = _generation(self._body)
        if generation != self._backoff_generation:  # a new spec deserves a prompt first try
            self._backoff_generation, self._retry_at = generation, 0.0
            self._backoff.reset()
        try:
            parsed = spec.parse(self._body.spec)
        except spec.SpecProblem as e:
            await self._idle()
            self.reporter.failed(generation, status.Problem(e.condition_reason, str(e)))
            return self._tunables.heartbeat_s  # only a new generation can fix the spec
        if parsed.suspend or not self._fence.open:
            await self._idle()
            if parsed.suspend:
                self.reporter.suspended(generation)
            return self._tunables.heartbeat_s
        await self._reap(generation)
        now = self._clock.monotonic()
        if now < self._retry_at:
            return self._until(self._retry_at)
        if self._resolution is None or self._resolution.generation != generation or now >= self._next_read_at:
            try:
                self._resolution = await self._resolve(parsed, generation)
            except errors.ModcacheError as e:
                return await self._resolve_failed(e, generation)
            self._complaint = None
        return await self._converge(self._resolution, generation)

    async def _resolve(self, parsed: spec.CacheSpec, generation: int) -> _Resolution:
        """Read each named Secret once; rebuild the configuration only if the spec or a Secret changed."""
        read: dict[str, kube.SecretData] = {}
        for ref in parsed.secret_refs():
            if ref.name not in read:
                read[ref.name] = await self._secrets.read_secret(self.namespace, ref.name, field=ref.field)
        self._next_read_at = self._clock.monotonic() + backoff.jittered(self._tunables.secret_recheck_s, self._rng)
        versions = {name: f"{secret.resource_version}:{_digest(secret.data)}" for name, secret in read.items()}
        previous = self._resolution
        if previous is not None and previous.versions == versions and previous.resolved.spec == parsed:
            return dataclasses.replace(previous, generation=generation)
        if previous is not None and previous.versions != versions:
            log.info("%s: a Secret it reads changed (rotation); re-resolving", self.key)
        values = {
            ref.field: spec.secret_value(ref, self.namespace, read[ref.name].data) for ref in parsed.secret_refs()
        }
        listen = parsed.listen_database
        resolved = spec.Resolved(
            spec=parsed,
            database_url=values[parsed.database.field],
            listen_database_url=values[listen.field] if listen is not None else None,
            redis_url=values[parsed.redis.field],
        )
        resolved.settings()  # raises SpecProblem for a bad URL, naming the field
        return _Resolution(generation=generation, versions=versions, resolved=resolved)

    async def _resolve_failed(self, error: errors.ModcacheError, generation: int) -> float:
        delay_s = self._backoff.next_s()
        self._retry_at = self._clock.monotonic() + delay_s
        message = self.reporter.scrub(str(error))
        if isinstance(error, spec.SpecProblem):
            await self._idle()  # a configuration that cannot be used must not keep the old one running
            self._resolution = None
            self.reporter.failed(generation, status.Problem(error.condition_reason, message))
        elif self._running is not None and not self._running.task.done():
            self._complain(f"{message}; the running watcher carries on", delay_s)
            return min(delay_s, self._tunables.heartbeat_s)
        else:
            await self._stop_watcher()
            self._claims.withdraw(self.owner, settled=False)  # younger ones keep waiting for our claim (bounded)
            self.reporter.failed(generation, status.Problem(R.SYNC_FAILED, message))
        self._complain(message, delay_s)
        return min(delay_s, self._tunables.heartbeat_s)

    def _complain(self, message: str, delay_s: float) -> None:
        """A warning when a failure starts or changes; the retries of the same failure only at debug level."""
        level = logging.DEBUG if message == self._complaint else logging.WARNING
        log.log(level, "%s: %s (retrying in %.1fs)", self.key, message, delay_s)
        self._complaint = message

    async def _converge(self, resolution: _Resolution, generation: int) -> float:
        resolved = resolution.resolved
        claim = prefixes.Claim(
            owner=self.owner,
            created=str(self._body.metadata.get("creationTimestamp") or ""),
            endpoint=prefixes.endpoint(resolved.redis_url.get_secret_value()),
            prefix=resolved.spec.key_prefix,
        )
        self._claims.claim(claim)
        blocker = self._claims.blocker(self.owner)
        if blocker is not None:
            await self._stop_watcher()
            self.reporter.failed(generation, status.Problem(R.PREFIX_CONFLICT, _conflict(claim, blocker)))
            return self._tunables.heartbeat_s  # a change of the claims pokes us
        if self._watching(resolved):
            self.reporter.unchanged(generation)
        elif (waiting := self._waiting_for(claim)) is not None:
            self.reporter.failed(generation, status.Problem(R.STARTING, waiting))
            return self._tunables.heartbeat_s
        else:
            await self._stop_watcher()
            self._start_watcher(resolved, generation)
        self.reporter.request_resync(_resync_token(self._body))
        if self.reporter.facts.synced:
            self._backoff.reset()
        return self._until(self._next_read_at)

    def _until(self, deadline: float) -> float:
        """How long to sleep towards ``deadline``: at most a heartbeat, at least ``MIN_SLEEP_S``."""
        return max(MIN_SLEEP_S, min(self._tunables.heartbeat_s, deadline - self._clock.monotonic()))

    def _waiting_for(self, claim: prefixes.Claim) -> str | None:
        """Why this winner must not start yet: an older one may still claim, or a refused one still writes."""
        if self._clock.monotonic() - self._started_at < self._tunables.elder_wait_s:
            elder = self._claims.elder(self.owner, claim.created, claim.prefix)
            if elder is not None:
                return (
                    f"waiting for the older ModuleCache {'/'.join(elder)} (overlapping keyPrefix) to read its Secrets"
                )
        other = self._claims.still_running(self.owner)
        if other is not None:
            return f"waiting for {other.describe()} to stop writing to Redis {claim.endpoint.describe()}"
        return None

    # -- the watcher ------------------------------------------------------------------------------------------

    def _watching(self, resolved: spec.Resolved) -> bool:
        running = self._running
        return (
            running is not None and not running.task.done() and running.resolved.fingerprint() == resolved.fingerprint()
        )

    def _start_watcher(self, resolved: spec.Resolved, generation: int) -> None:
        self._running = Running(resolved=resolved)
        self._running.start(f"modcache-watcher-{self.key}", observer=self.reporter, on_done=self.poke)
        self.reporter.watcher = self._running
        self._claims.running(self.owner, True)
        self.reporter.watching(generation, resolved)
        log.info("%s: watching %s -> %s", self.key, *resolved.endpoints())

    async def _reap(self, generation: int) -> None:
        """A watcher that ended by itself crashed: close it, and back off before the next start."""
        running = self._running
        if running is None or not running.task.done():
            return
        error = _innermost(running.error)
        detail = errors.describe(error) if error is not None else "stopped unexpectedly"
        await self._stop_watcher()
        delay_s = self._backoff.next_s()
        self._retry_at = self._clock.monotonic() + delay_s
        message = self.reporter.scrub(f"the sync loop failed: {detail}")
        log.warning("%s: %s (restarting in %.1fs)", self.key, message, delay_s)
        self.reporter.failed(generation, status.Problem(R.SYNC_FAILED, message))

    async def _stop_watcher(self) -> None:
        """Cancel the watcher; its task closes its connections, all within ``stop_timeout_s``."""
        running, self._running = self._running, None
        if running is None:
            return
        self.reporter.watcher = None
        running.task.cancel()
        done, _ = await asyncio.wait([running.task], timeout=self._tunables.stop_timeout_s)
        if not done:
            log.warning("%s: the watcher did not stop within %.0fs", self.key, self._tunables.stop_timeout_s)
        self._claims.running(self.owner, False)

    async def _idle(self) -> None:
        """Nothing may run: no watcher, no claim."""
        if self._running is not None:
            log.info("%s: stopping the watcher", self.key)
        await self._stop_watcher()
        self._claims.withdraw(self.owner)

    def _halt(self) -> None:
        """The fence closed (the Lease is lost): cancel the watcher in this very instant; the loop tidies up."""
        if self._running is not None:
            self._running.task.cancel()
        self.poke()

    # -- liveness and sleeping --------------------------------------------------------------------------------

    def _beat(self) -> None:
        running = self._running
        if running is not None and not running.task.done():
            allowed_s = 2 * running.resolved.spec.resync_interval_s + self._tunables.watcher_grace_s
            if self._clock.monotonic() - self.reporter.last_activity_at > allowed_s:
                log.error("%s: the watcher reported nothing for %.0fs; not beating", self.key, allowed_s)
                return
        allowed_silence_s = 3 * self._tunables.heartbeat_s + self._tunables.retry_max_s
        self._liveness.beat(self.key, allowed_silence_s=allowed_silence_s)

    async def _sleep(self, stopped: Stopped, delay_s: float) -> None:
        async def until_stopped() -> None:
            await stopped.wait()

        waits = [asyncio.create_task(until_stopped()), asyncio.create_task(self._wake.wait())]
        try:
            await asyncio.wait(waits, timeout=delay_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)


def _conflict(mine: prefixes.Claim, blocker: prefixes.Claim) -> str:
    return (
        f"keyPrefix {mine.prefix!r} overlaps {blocker.describe()} on Redis {mine.endpoint.describe()}; "
        "the older ModuleCache keeps it: change one keyPrefix or the Redis database"
    )


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _innermost(error: BaseException | None) -> BaseException | None:
    """The first real error inside (nested) exception groups, which is what a person needs to read."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def _generation(body: statuswriter.ObjectView) -> int:
    return int(body.metadata.get("generation") or 0)


def _resync_token(body: statuswriter.ObjectView) -> str | None:
    token = (body.metadata.get("annotations") or {}).get(names.RESYNC_ANNOTATION)
    return str(token) if token else None
