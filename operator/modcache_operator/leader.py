"""Leader election: at most one replica runs kopf (and so writes caches) at a time.

kopf's peering is a freeze protocol, not an election, so replicas campaign for a ``coordination.k8s.io`` Lease
with kubernetes-asyncio's ``LeaderElection`` + ``LeaseLock``. The leader runs ``work(stop)`` (kopf); when the
Lease is lost, that work is cancelled at once (another replica may already be writing) and the replica
campaigns again. On a graceful shutdown the leader stops its work, then releases the Lease, so a standby takes
over without waiting for the Lease to expire.

Overlaps stay harmless anyway: every cache write is fenced by the cache's generation (see ``rediscache``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable

from kubernetes_asyncio import client
from kubernetes_asyncio.leaderelection import electionconfig, leaderelection
from kubernetes_asyncio.leaderelection.resourcelock import leaselock

from modcache import errors

log = logging.getLogger(__name__)

Work = Callable[[asyncio.Event], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class LeaseConfig:
    namespace: str
    name: str = "modcache-operator"
    identity: str = dataclasses.field(default_factory=lambda: default_identity())
    lease_duration_s: float = 15.0  # a standby takes over this long after the leader vanished
    renew_deadline_s: float = 10.0  # the leader gives up if it could not renew for this long
    retry_period_s: float = 2.0  # how often the leader renews and standbys retry
    stop_timeout_s: float = 30.0  # how long a graceful stop of the work may take


def default_identity() -> str:
    """The pod name (``POD_NAME``, else ``HOSTNAME``) plus a random suffix: a restarted pod is a new candidate."""
    pod = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or socket.gethostname()
    return f"{pod}-{uuid.uuid4().hex[:6]}"


class Elector:
    """Runs ``work`` only while holding the Lease, until ``stop`` is set."""

    def __init__(self, *, api_client: client.ApiClient, lease: LeaseConfig, work: Work) -> None:
        self._api_client = api_client
        self.lease = lease
        self._work = work
        self._term: asyncio.Task[None] | None = None
        self._term_stop = asyncio.Event()
        self._failed: BaseException | None = None
        self._work_ended = asyncio.Event()
        self.terms = 0  # how many times this replica became the leader

    @property
    def leading(self) -> bool:
        return self._term is not None and not self._term.done()

    async def run(self, stop: asyncio.Event) -> None:
        """Campaign, lead, campaign again after losing the Lease; until ``stop`` (or the work failed)."""
        try:
            while not stop.is_set() and not self._work_ended.is_set():
                await self._campaign(stop)
        finally:
            await self._release()
        if self._work_ended.is_set() and not stop.is_set():
            raise RuntimeError(f"the operator stopped while leading: {self._failed!r}")

    async def _campaign(self, stop: asyncio.Event) -> None:
        election = asyncio.create_task(self._election().run(), name="modcache-leader-election")
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(self._work_ended.wait())]
        try:
            await asyncio.wait([election, *waits], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await self._stop_term()
            election.cancel()
            await asyncio.gather(election, *waits, return_exceptions=True)
        if stop.is_set() or self._work_ended.is_set():
            return
        error = election.exception() if election.done() and not election.cancelled() else None
        if error is not None:
            log.error("leader election failed (%s); retrying", errors.describe(error))
        else:
            log.warning("%s lost the Lease %s; campaigning again", self.lease.identity, self.lease.name)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), self.lease.retry_period_s)

    def _election(self) -> leaderelection.LeaderElection:
        lock = leaselock.LeaseLock(self.lease.name, self.lease.namespace, self.lease.identity, self._api_client)
        config = electionconfig.Config(
            lock,
            int(self.lease.lease_duration_s),  # it goes through str() and back through int()
            self.lease.renew_deadline_s,
            self.lease.retry_period_s,
            onstarted_leading=self._lead,
            onstopped_leading=self._stop_term,
        )
        return leaderelection.LeaderElection(config)

    async def _lead(self) -> None:
        self._term = asyncio.current_task()
        self._term_stop = asyncio.Event()
        self.terms += 1
        log.info("%s leads (Lease %s/%s)", self.lease.identity, self.lease.namespace, self.lease.name)
        try:
            await self._work(self._term_stop)
        except asyncio.CancelledError:
            raise  # the Lease was lost, or we are stopping
        except Exception as e:
            self._failed = e
            log.exception("the operator failed while leading")
        if not self._term_stop.is_set():
            self._work_ended.set()  # it ended by itself: give the Lease up rather than hold it idle

    async def _stop_term(self) -> None:
        """Stop the work: gracefully on shutdown, by cancellation if it overstays (or the Lease was lost)."""
        term, self._term = self._term, None
        if term is None or term.done():
            return
        self._term_stop.set()
        done, _ = await asyncio.wait([term], timeout=self.lease.stop_timeout_s)
        if not done:
            term.cancel()
            await asyncio.gather(term, return_exceptions=True)

    async def _release(self) -> None:
        """Give the Lease up if we hold it, so a standby need not wait for it to expire (best effort)."""
        api = client.CoordinationV1Api(self._api_client)
        with contextlib.suppress(client.ApiException, OSError):
            lease = await api.read_namespaced_lease(self.lease.name, self.lease.namespace)
            if lease.spec is not None and lease.spec.holder_identity == self.lease.identity:
                lease.spec.holder_identity = ""  # no holder: the next candidate takes it at once
                await api.replace_namespaced_lease(self.lease.name, self.lease.namespace, lease)
                log.info("%s released the Lease %s", self.lease.identity, self.lease.name)
