"""Leader election against the emulated API: one leader at a time, hand-over on shutdown, takeover on loss."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest
from kubernetes_asyncio import client

from modcache_operator import fence, kube, leader
from operatorkit.cluster import NAMESPACE, emulated_api
from operatorkit.emulator import Emulator

#: The shortest timings kubernetes-asyncio accepts (lease > renew deadline > 1.2 x retry >= 1.2 s).
FAST = {"lease_duration_s": 3.0, "renew_deadline_s": 2.0, "retry_period_s": 1.0, "stop_timeout_s": 5.0}


class Replica:
    """One operator replica whose "work" only records that it leads."""

    def __init__(self, api_client: client.ApiClient, identity: str) -> None:
        self.working = asyncio.Event()
        self.stop = asyncio.Event()
        self.elector = leader.Elector(
            api=kube.KubeApi(api_client=api_client),
            lease=leader.LeaseConfig(namespace=NAMESPACE, identity=identity, **FAST),
            work=self._work,
        )
        self.task: asyncio.Task[None] | None = None

    async def _work(self, _fence: fence.Fence, stop: asyncio.Event) -> None:
        self.working.set()
        try:
            await stop.wait()
        finally:
            self.working.clear()

    def start(self) -> None:
        self.task = asyncio.create_task(self.elector.run(self.stop))

    async def shutdown(self) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 30)

    async def crash(self) -> None:
        """Vanish without stopping the work or releasing the Lease (a killed pod)."""
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def api() -> AsyncIterator[tuple[Emulator, client.ApiClient]]:
    async with emulated_api() as (emulator, url):
        api_client = client.ApiClient(client.Configuration(host=url))
        try:
            yield emulator, api_client
        finally:
            await api_client.close()


def _holder(emulator: Emulator) -> str | None:
    key = ("coordination.k8s.io/v1/leases", NAMESPACE, "modcache-operator")
    try:
        return str(emulator.objects[key].raw["spec"].get("holderIdentity") or "") or None
    except (KeyError, ValueError):
        return None


async def _until(predicate: Callable[[], bool], what: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)


async def _renewals(emulator: Emulator, count: int) -> None:
    """Wait until the Lease has been renewed ``count`` more times."""
    key = ("coordination.k8s.io/v1/leases", NAMESPACE, "modcache-operator")
    start = len(emulator.objects[key].history)
    await _until(lambda: len(emulator.objects[key].history) >= start + count, f"{count} renewals")


async def test_one_leader_then_a_handover_on_shutdown(api: tuple[Emulator, client.ApiClient]) -> None:
    emulator, api_client = api
    a, b = Replica(api_client, "a"), Replica(api_client, "b")
    a.start()
    await asyncio.wait_for(a.working.wait(), 10)
    b.start()
    try:
        await _renewals(emulator, 3)  # b has tried meanwhile, every retry period
        assert _holder(emulator) == "a"
        assert not b.working.is_set(), "two leaders"

        started = time.monotonic()
        await a.shutdown()
        assert not a.working.is_set()
        await asyncio.wait_for(b.working.wait(), 10)
        assert time.monotonic() - started < FAST["lease_duration_s"], "released: no wait for expiry"
        assert _holder(emulator) == "b"
    finally:
        with contextlib.suppress(Exception):
            await b.shutdown()


async def test_a_crashed_leader_is_replaced_once_its_lease_expires(api: tuple[Emulator, client.ApiClient]) -> None:
    emulator, api_client = api
    a, b = Replica(api_client, "a"), Replica(api_client, "b")
    a.start()
    await asyncio.wait_for(a.working.wait(), 10)
    b.start()
    try:
        await a.crash()
        await asyncio.wait_for(b.working.wait(), 15)
        assert _holder(emulator) == "b"
        assert b.elector.terms == 1
    finally:
        await b.shutdown()
