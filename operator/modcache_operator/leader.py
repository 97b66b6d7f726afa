"""Leader election: at most one replica runs kopf, and so writes caches, at any instant.

kopf's peering is a freeze protocol, not an election, and kubernetes-asyncio's ``LeaderElection`` reads the
wall clock and treats a reset connection as the end of the term; so this is a small Lease elector of our own
with client-go's semantics (``tools/leaderelection``):

* a candidate GETs the ``coordination.k8s.io`` Lease, creates it when missing, and takes it over when it has no
  holder or its record has not changed for the ``leaseDurationSeconds`` the holder wrote (never less than its own
  ``lease_duration_s``: replicas of a rolling update may differ) *as measured on the candidate's own monotonic
  clock* since it first saw that record (clocks of different machines are never compared); every write carries
  the ``resourceVersion`` it read, so when two candidates race, the API server lets one win (409 for the other);
* the holder renews every ``retry_period_s`` (``renewTime`` now, ``acquireTime`` kept; ``leaseTransitions`` grows
  by one whenever the holder changes), with its cached copy first and a fresh GET only after a conflict;
* a **watchdog** on the monotonic clock, independent of the call in flight, closes the term's ``fence.Fence`` the
  moment ``renew_deadline_s`` has passed since the start of the last successful renewal: every watcher is
  cancelled in that instant, then kopf stops. A standby can acquire no earlier than ``lease_duration_s`` after
  it saw that renewal, which is later than the start of it, so the old holder stopped writing
  ``lease_duration_s - renew_deadline_s`` (5 s by default) before anyone else may start;
* connection errors, timeouts and 5xx answers are retried within the deadline; every call's timeout is bounded
  by the time left, so a hung request cannot hold the term past it;
* on a graceful stop the holder stops its work, then releases the Lease (no holder), so a standby takes over
  within a retry period instead of waiting for the Lease to expire.

Overlaps stay harmless anyway: every cache write is fenced by the cache's generation (see ``rediscache``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import random
import socket
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from modcache import errors
from modcache_operator import backoff, clock, fence, kube

log = logging.getLogger(__name__)

#: What a leader runs: ``work(fence, stop)`` until ``stop`` is set; it must write nothing once ``fence`` closes.
Work = Callable[[fence.Fence, asyncio.Event], Coroutine[Any, Any, None]]


#: A release is a courtesy on the way out (the Lease expires anyway): SIGTERM must not wait longer for it.
RELEASE_TIMEOUT_S = 1.0
#: A standby honours a holder's longer ``leaseDurationSeconds`` up to this multiple of its own setting.
MAX_HONOURED_FACTOR = 10


@dataclasses.dataclass(frozen=True)
class LeaseConfig:
    namespace: str
    name: str = "modcache-operator"
    identity: str = dataclasses.field(default_factory=lambda: default_identity())
    lease_duration_s: float = 15.0  # a standby takes over this long after it last saw the Lease renewed
    renew_deadline_s: float = 10.0  # the leader stops writing if it could not renew for this long
    retry_period_s: float = 2.0  # how often the leader renews and standbys look
    stop_timeout_s: float = 30.0  # how long a graceful stop of the work may take

    def __post_init__(self) -> None:
        if not self.lease_duration_s > self.renew_deadline_s > self.retry_period_s > 0:
            raise ValueError("a Lease needs lease duration > renew deadline > retry period > 0")


def default_identity() -> str:
    """The pod name (``POD_NAME``, else ``HOSTNAME``) plus a random suffix: a restarted pod is a new candidate."""
    return f"{pod_name()}-{uuid.uuid4().hex[:6]}"


def pod_name() -> str:
    return os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or socket.gethostname()


class LeaseApi(Protocol):
    def read_lease(self, namespace: str, name: str, *, timeout_s: float) -> Awaitable[kube.Lease | None]: ...
    def write_lease(self, lease: kube.Lease, *, create: bool, timeout_s: float) -> Awaitable[kube.Lease]: ...


class Elector:
    """Runs ``work`` only while holding the Lease, until ``stop`` is set."""

    def __init__(
        self,
        *,
        api: LeaseApi,
        lease: LeaseConfig,
        work: Work,
        clock: clock.Clock = clock.SYSTEM,
        rng: random.Random | None = None,
    ) -> None:
        self._api = api
        self.lease = lease
        self._work = work
        self._clock = clock
        self._rng = rng or random.Random()
        self._cached: kube.Lease | None = None  # the Lease as we last read or wrote it
        self._observed: tuple[object, ...] | None = None  # the record as last seen, and since when
        self._observed_at = 0.0
        self._renewed_at = 0.0  # start of our last successful acquire/renew
        self._holding = False  # our last write made us the holder, and no term was lost since
        self._fence: fence.Fence | None = None
        self._complaint: str | None = None
        self._reported_holder: str | None = None
        self.terms = 0  # how many times this replica became the leader
        self._answered_at: float | None = None  # when the API last answered a campaign attempt (monotonic)

    @property
    def leading(self) -> bool:
        return self._fence is not None and self._fence.open

    def in_contact(self) -> bool:
        """Whether a standby can take over when needed: the API answered its last attempt, within the renew
        deadline. A replica that never reached the API (egress policy, CA, token) is no standby at all, and
        must not count as ready in a rolling update that then retires the working leader."""
        answered = self._answered_at
        return answered is not None and self._clock.monotonic() - answered <= self.lease.renew_deadline_s

    async def run(self, stop: asyncio.Event) -> None:
        """Campaign, lead, campaign again after losing the Lease; until ``stop`` (or the work failed)."""
        try:
            while not stop.is_set() and await self._acquire(stop):
                failure = await self._lead(stop)
                if failure is not None:
                    raise RuntimeError(f"the operator stopped while leading: {failure}")
        finally:
            await self._release()

    # -- campaigning ------------------------------------------------------------------------------------------

    async def _acquire(self, stop: asyncio.Event) -> bool:
        """Try every retry period (jittered) until this replica holds the Lease (True) or ``stop`` (False)."""
        while not stop.is_set():
            attempt = asyncio.create_task(self._attempt(timeout_s=self.lease.renew_deadline_s))
            if not await _unless_stopped(attempt, stop):
                return False
            if attempt.result():
                return True
            pause_s = backoff.jittered(self.lease.retry_period_s, self._rng, spread=0.2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause_s)
        return False

    async def _attempt(self, *, timeout_s: float) -> bool | None:
        """``_try``, with trouble logged (once per kind, not every retry period): None if it failed."""
        try:
            held = await self._try(timeout_s=timeout_s)
        except Exception as e:  # a transient error, a rejection, a malformed answer: try again next period
            complaint = errors.describe(e)
            if complaint != self._complaint:
                log.warning("leader election: %s; retrying every %.1fs", complaint, self.lease.retry_period_s)
                self._complaint = complaint
            return None
        self._complaint = None
        self._answered_at = self._clock.monotonic()
        return held

    async def _try(self, *, timeout_s: float) -> bool:
        """client-go's tryAcquireOrRenew: True if this replica holds the Lease afterwards."""
        started = self._clock.monotonic()
        if self.leading and self._cached is not None:
            with contextlib.suppress(kube.LeaseConflict):  # fast path: renew our own copy; a conflict reads anew
                renewed = await self._write(self._renewed(self._cached), create=False, timeout_s=timeout_s)
                return self._wrote(renewed, started)
        current = await self._api.read_lease(
            self.lease.namespace, self.lease.name, timeout_s=self._left(started, timeout_s)
        )
        if current is None:
            created = await self._write(self._fresh(), create=True, timeout_s=self._left(started, timeout_s))
            return self._wrote(created, started)
        self._observe(current)
        holder = str((current.get("spec") or {}).get("holderIdentity") or "")
        expired = self._clock.monotonic() > self._observed_at + self._honoured_duration_s(current)
        if holder and holder != self.lease.identity and not expired:
            self._report(holder)
            return False
        claimed = self._renewed(current) if holder == self.lease.identity else self._taken_over(current)
        return self._wrote(await self._write(claimed, create=False, timeout_s=self._left(started, timeout_s)), started)

    def _report(self, holder: str) -> None:
        if holder != self._reported_holder:
            log.info("%s stands by: the Lease %s is held by %s", self.lease.identity, self.lease.name, holder)
            self._reported_holder = holder

    # -- leading ----------------------------------------------------------------------------------------------

    async def _lead(self, stop: asyncio.Event) -> str | None:
        """One term: the work runs while renewals succeed; None, or why the work ended by itself."""
        term = fence.Fence()
        self._fence, self.terms, self._reported_holder = term, self.terms + 1, None
        lost, term_stop = asyncio.Event(), asyncio.Event()
        log.info("%s leads (Lease %s/%s)", self.lease.identity, self.lease.namespace, self.lease.name)
        # Created before the work (kopf) starts, so kopf counts them as not its own and leaves them alone.
        keepers = [
            asyncio.create_task(self._watchdog(term, lost), name="modcache-lease-watchdog"),
            asyncio.create_task(self._renew_forever(term, lost), name="modcache-lease-renewer"),
        ]
        work = asyncio.create_task(self._work(term, term_stop), name="modcache-leader-work")
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(lost.wait())]
        try:
            await asyncio.wait([work, *waits], return_when=asyncio.FIRST_COMPLETED)
            term_stop.set()  # kopf stops gracefully; the renewer keeps the Lease meanwhile
            done, _ = await asyncio.wait([work], timeout=self.lease.stop_timeout_s)
            if not done:
                log.warning("the operator did not stop within %.0fs; cancelling it", self.lease.stop_timeout_s)
        finally:
            term.close()
            for task in [work, *keepers, *waits]:
                task.cancel()
            await asyncio.gather(work, *keepers, *waits, return_exceptions=True)
        if lost.is_set():
            self._holding = False  # we may not hold it any more: never "release" it on someone else's behalf
            return None
        if stop.is_set():
            return None
        return "it ended by itself" if work.cancelled() or work.exception() is None else repr(work.exception())

    async def _watchdog(self, term: fence.Fence, lost: asyncio.Event) -> None:
        """Close the fence once the renew deadline has passed, whatever the renewal in flight is doing."""
        while True:
            left_s = self._renewed_at + self.lease.renew_deadline_s - self._clock.monotonic()
            if left_s <= 0.001:  # a sleep this short can end just before the deadline, again and again
                log.error(
                    "%s could not renew the Lease within %.1fs: stopped writing, stepping down",
                    self.lease.identity,
                    self.lease.renew_deadline_s,
                )
                term.close()
                lost.set()
                return
            await asyncio.sleep(left_s)

    async def _renew_forever(self, term: fence.Fence, lost: asyncio.Event) -> None:
        while term.open:
            await asyncio.sleep(self.lease.retry_period_s)
            left_s = self._renewed_at + self.lease.renew_deadline_s - self._clock.monotonic()
            if left_s <= 0:
                return  # the watchdog steps down
            if await self._attempt(timeout_s=left_s) is False:
                log.warning("%s: another replica holds the Lease %s now", self.lease.identity, self.lease.name)
                term.close()
                lost.set()
                return

    # -- the record (a Lease as the API serves it: plain JSON) ------------------------------------------------

    def _fresh(self) -> kube.Lease:
        meta = {"name": self.lease.name, "namespace": self.lease.namespace}
        return {"metadata": meta, "spec": self._spec(acquired=_micro_time(self._clock.now()), transitions=0)}

    def _renewed(self, current: kube.Lease) -> kube.Lease:
        spec = current.get("spec") or {}
        acquired = spec.get("acquireTime") or _micro_time(self._clock.now())
        transitions = int(spec.get("leaseTransitions") or 0)
        return {"metadata": current["metadata"], "spec": self._spec(acquired=acquired, transitions=transitions)}

    def _taken_over(self, current: kube.Lease) -> kube.Lease:
        transitions = int((current.get("spec") or {}).get("leaseTransitions") or 0) + 1
        spec = self._spec(acquired=_micro_time(self._clock.now()), transitions=transitions)
        return {"metadata": current["metadata"], "spec": spec}

    def _spec(self, *, acquired: str, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.lease.identity,
            "leaseDurationSeconds": int(self.lease.lease_duration_s),
            "acquireTime": acquired,
            "renewTime": _micro_time(self._clock.now()),
            "leaseTransitions": transitions,
        }

    async def _write(self, lease: kube.Lease, *, create: bool, timeout_s: float) -> kube.Lease:
        written = await self._api.write_lease(lease, create=create, timeout_s=timeout_s)
        self._cached = written
        return written

    def _wrote(self, written: kube.Lease, started: float) -> bool:
        self._observe(written)
        self._renewed_at, self._holding = started, True
        return True

    def _observe(self, lease: kube.Lease) -> None:
        """Remember the record and, if it changed, when we first saw it (client-go's observedTime)."""
        spec = lease.get("spec") or {}
        record = (
            (lease.get("metadata") or {}).get("resourceVersion"),
            spec.get("holderIdentity"),
            spec.get("renewTime"),
        )
        if record != self._observed:
            self._observed, self._observed_at = record, self._clock.monotonic()
        self._cached = lease

    def _honoured_duration_s(self, lease: kube.Lease) -> float:
        """How long a record must stay unchanged before it is expired: the ``leaseDurationSeconds`` its holder
        wrote (as client-go: its promise to stop within a shorter renew deadline), never less than our own
        setting (a record edited to 1 s must not invite a takeover), and at most ``MAX_HONOURED_FACTOR`` times it
        (a record edited to a year must not freeze the election)."""
        own = self.lease.lease_duration_s
        written = (lease.get("spec") or {}).get("leaseDurationSeconds")
        if isinstance(written, bool) or not isinstance(written, int | float) or not written > 0:
            return own
        return min(max(float(written), own), own * MAX_HONOURED_FACTOR)

    def _left(self, started: float, timeout_s: float) -> float:
        return max(0.1, started + timeout_s - self._clock.monotonic())

    async def _release(self) -> None:
        """Give the Lease up if we hold it, so a standby need not wait for it to expire (best effort)."""
        lease = self._cached
        if not self._holding or lease is None:
            return
        now = _micro_time(self._clock.now())
        transitions = int((lease.get("spec") or {}).get("leaseTransitions") or 0)
        released = {
            "holderIdentity": "",
            "leaseDurationSeconds": 1,
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }
        try:
            await self._api.write_lease(
                {"metadata": lease["metadata"], "spec": released},
                create=False,
                timeout_s=min(self.lease.retry_period_s, RELEASE_TIMEOUT_S),
            )
        except errors.ModcacheError as e:
            log.warning("%s could not release the Lease %s: %s", self.lease.identity, self.lease.name, e)
            return
        self._holding = False
        log.info("%s released the Lease %s", self.lease.identity, self.lease.name)


def _micro_time(moment: datetime.datetime) -> str:
    """A metav1.MicroTime: RFC 3339 in UTC with microseconds."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def _unless_stopped(attempt: asyncio.Task[Any], stop: asyncio.Event) -> bool:
    """Wait for ``attempt`` unless ``stop`` comes first (then cancel it): whether it finished."""
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([attempt, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not attempt.done():
            attempt.cancel()
        await asyncio.gather(attempt, stopping, return_exceptions=True)
    return not attempt.cancelled()
