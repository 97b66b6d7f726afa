"""The Lease elector against the emulated API: one leader at a time, client-go's record, and a leader that
cannot renew stops (its fence closes) within the renew deadline, whatever its call in flight does.

Each replica talks to the emulator with a token of its own, so a ``Fault`` can cut one off. The replicas'
"work" only records when its term began and when its fence closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from modcache_operator import credentials, fence, kube, leader
from operatorkit.cluster import ApiServer, api_server
from operatorkit.emulator import Fault

LEASE = ("coordination.k8s.io/v1/leases", "modcache-test", "modcache-operator")
FAST = {"lease_duration_s": 3.0, "renew_deadline_s": 2.0, "retry_period_s": 0.25, "stop_timeout_s": 5.0}
#: How late after its deadline a watchdog may fire on a busy machine.
SLACK_S = 0.5


class Replica:
    """One operator replica whose "work" records its terms: when each began, and when its fence closed."""

    def __init__(self, api: ApiServer, identity: str, timing: dict[str, float] = FAST) -> None:
        self.token = f"token-{identity}"
        self.api = kube.KubeApi(credentials=credentials.Credentials(server=api.url, token=self.token))
        self.working = asyncio.Event()
        self.stop = asyncio.Event()
        self.began: list[float] = []
        self.closed: list[float] = []
        self.elector = leader.Elector(
            api=self.api,
            lease=leader.LeaseConfig(namespace="modcache-test", identity=identity, **timing),
            work=self._work,
        )
        self.task: asyncio.Task[None] | None = None

    async def _work(self, term: fence.Fence, stop: asyncio.Event) -> None:
        self.began.append(time.monotonic())
        term.on_close(self, lambda: self.closed.append(time.monotonic()))
        self.working.set()
        try:
            await stop.wait()
        finally:
            self.working.clear()

    def start(self) -> None:
        self.task = asyncio.create_task(self.elector.run(self.stop))

    async def shutdown(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 30)
        await self.api.close()

    async def crash(self) -> None:
        """Vanish without stopping the work or releasing the Lease (a killed pod)."""
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.task = None


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with api_server() as server:
        yield server


@contextlib.asynccontextmanager
async def replicas(api: ApiServer, *names: str) -> AsyncIterator[list[Replica]]:
    started = [Replica(api, name) for name in names]
    try:
        yield started
    finally:
        for replica in started:
            with contextlib.suppress(Exception):
                await replica.shutdown()


def _spec(api: ApiServer) -> dict[str, Any]:
    try:
        return dict(api.emulator.objects[LEASE].raw.get("spec") or {})
    except (KeyError, ValueError):  # never created, or deleted
        return {}


async def _until(api: ApiServer, predicate: Any, what: str, timeout_s: float = 15) -> None:
    if not await api.emulator.until(predicate, timeout_s=timeout_s):
        pytest.fail(f"timed out waiting for: {what}")


async def _renewals(api: ApiServer, count: int) -> None:
    start = len(api.emulator.objects[LEASE].history)
    await _until(api, lambda: len(api.emulator.objects[LEASE].history) >= start + count, f"{count} renewals")


async def test_one_leader_then_a_handover_on_shutdown(api: ApiServer) -> None:
    async with replicas(api, "a", "b") as (a, b):
        a.start()
        await asyncio.wait_for(a.working.wait(), 10)
        b.start()
        await _renewals(api, 3)  # b has looked meanwhile, every retry period
        assert _spec(api)["holderIdentity"] == "a"
        assert not b.working.is_set(), "two leaders"

        started = time.monotonic()
        await a.shutdown()
        assert not a.working.is_set()
        await asyncio.wait_for(b.working.wait(), 10)
        assert time.monotonic() - started < FAST["lease_duration_s"], "released: no wait for expiry"
        assert _spec(api)["holderIdentity"] == "b"
        assert _spec(api)["leaseTransitions"] == 1, "a created it (0) and released it; b took it (+1)"


async def test_a_crashed_leader_is_replaced_once_its_lease_expires(api: ApiServer) -> None:
    async with replicas(api, "a", "b") as (a, b):
        a.start()
        await asyncio.wait_for(a.working.wait(), 10)
        b.start()
        acquired = _spec(api)["acquireTime"]
        await _renewals(api, 2)
        assert _spec(api)["acquireTime"] == acquired, "renewing keeps acquireTime"
        await a.crash()
        crashed = time.monotonic()
        await asyncio.wait_for(b.working.wait(), 15)
        assert time.monotonic() - crashed >= FAST["lease_duration_s"] - FAST["retry_period_s"] - SLACK_S
        assert _spec(api)["holderIdentity"] == "b"
        assert _spec(api)["leaseTransitions"] == 1
        assert _spec(api)["acquireTime"] != acquired
        assert b.elector.terms == 1


@pytest.mark.parametrize("fault", ["hang", "reset", 503])
async def test_a_leader_that_cannot_renew_closes_its_fence_before_a_standby_begins(
    api: ApiServer, fault: str | int
) -> None:
    async with replicas(api, "a", "b") as (a, b):
        a.start()
        await asyncio.wait_for(a.working.wait(), 10)
        b.start()
        await _renewals(api, 2)
        renewed = _spec(api)["renewTime"]
        api.emulator.faults.append(Fault(fault, token=a.token, plural="leases"))
        cut_at = time.monotonic()
        await asyncio.wait_for(b.working.wait(), 20)

        assert len(a.closed) == 1, "the leader's fence closed once"
        assert a.closed[0] < b.began[0], "the standby began while the old leader could still write"
        assert a.closed[0] - cut_at <= FAST["renew_deadline_s"] + SLACK_S, "the watchdog fired late"
        assert _spec(api)["renewTime"] != renewed
        assert _spec(api)["holderIdentity"] == "b"


async def test_a_standby_with_a_shorter_lease_setting_waits_for_the_duration_the_holder_wrote(api: ApiServer) -> None:
    """A rolling update can run replicas with different timings side by side: the standby must honour the
    holder's ``leaseDurationSeconds`` (its promise to stop within a shorter renew deadline), not its own."""
    slow = {**FAST, "lease_duration_s": 6.0, "renew_deadline_s": 4.0}
    a, b = Replica(api, "a", slow), Replica(api, "b")
    try:
        a.start()
        await asyncio.wait_for(a.working.wait(), 10)
        b.start()
        await _renewals(api, 2)
        assert _spec(api)["leaseDurationSeconds"] == 6
        api.emulator.faults.append(Fault("hang", token=a.token, plural="leases"))
        await asyncio.wait_for(b.working.wait(), 20)
        assert len(a.closed) == 1
        assert a.closed[0] < b.began[0], "the standby began while the old leader could still write"
    finally:
        for replica in (a, b):
            with contextlib.suppress(Exception):
                await replica.shutdown()


async def test_a_standby_cut_off_from_the_api_is_no_standby_until_it_is_answered_again(api: ApiServer) -> None:
    """Its readiness: a rolling update must not retire the leader for a replica that could never take over."""
    async with replicas(api, "a", "b") as (a, b):
        a.start()
        await asyncio.wait_for(a.working.wait(), 10)
        b.start()
        await _renewals(api, 2)
        assert b.elector.in_contact()
        assert not b.elector.leading
        cut = Fault("hang", token=b.token, plural="leases")
        api.emulator.faults.append(cut)
        await _until(api, lambda: not b.elector.in_contact(), "the cut-off standby admits it", timeout_s=10)
        api.emulator.faults.remove(cut)
        await _until(api, b.elector.in_contact, "the standby answered again", timeout_s=10)
        assert a.elector.leading
        assert not b.elector.leading


async def test_connection_resets_shorter_than_the_renew_deadline_end_no_term(api: ApiServer) -> None:
    async with replicas(api, "a") as (a,):
        a.start()
        await asyncio.wait_for(a.working.wait(), 10)
        reset = Fault("reset", token=a.token, plural="leases")
        api.emulator.faults.append(reset)
        await _until(api, lambda: reset.hits >= 3, "three renewals reset")
        api.emulator.heal()
        await _renewals(api, 2)
        assert a.closed == [], "a transient error ended the term"
        assert a.elector.terms == 1
        assert _spec(api)["holderIdentity"] == "a"


async def test_an_api_server_restart_shorter_than_the_renew_deadline_ends_no_term(api: ApiServer) -> None:
    async with replicas(api, "a") as (a,):
        a.start()
        await asyncio.wait_for(a.working.wait(), 10)
        await api.stop()
        await asyncio.sleep(FAST["renew_deadline_s"] / 2)  # the outage itself
        await api.start()
        await _renewals(api, 2)
        assert a.closed == [], "the restart ended the term"
        assert a.elector.terms == 1


async def test_a_standby_stops_at_once_even_while_its_lease_request_hangs(api: ApiServer) -> None:
    async with replicas(api, "a", "b") as (a, b):
        a.start()
        await asyncio.wait_for(a.working.wait(), 10)
        hang = Fault("hang", token=b.token, plural="leases")
        api.emulator.faults.append(hang)
        b.start()
        await _until(api, lambda: hang.hits >= 1, "the standby's request hanging")
        started = time.monotonic()
        await b.shutdown()
        assert time.monotonic() - started < 1.0, "stopping waited for the hung request"
        api.emulator.heal()


async def test_a_deleted_lease_is_created_again_without_ending_the_term(api: ApiServer) -> None:
    async with replicas(api, "a") as (a,):
        a.start()
        await asyncio.wait_for(a.working.wait(), 10)
        response = await api.emulator.delete(f"/apis/coordination.k8s.io/v1/namespaces/{LEASE[1]}/leases/{LEASE[2]}")
        assert response.status < 300
        await _until(api, lambda: _spec(api).get("holderIdentity") == "a", "the Lease created again by its holder")
        await _renewals(api, 2)
        assert a.closed == [], "a deleted Lease ended the term"
        assert a.elector.terms == 1
