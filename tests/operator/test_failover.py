"""Leadership on a misbehaving API server, with real operator processes, a private Redis and real PostgreSQL.

Two ``modcache operator --leader-election`` processes share one Lease (4 s duration, 2.5 s renew deadline,
0.5 s retry period). The test keeps changing a module in PostgreSQL, so the leader keeps writing to Redis, and
records every write Redis executes with the process that sent it (``MONITOR``). Then the API server misbehaves
for the leader only (its token): Lease requests that never get an answer, connections reset on every Lease
request, or the whole server restarting. At no instant may both processes write; a leader that cannot renew
stops writing within its renew deadline; a restart shorter than the deadline ends nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modcache import keys, pgsource
from operatorkit.cluster import NAMESPACE, ApiServer, Cluster, api_server, cache_spec
from operatorkit.emulator import Fault
from operatorkit.processes import FAST_LEASE, OperatorProcess, operator_process
from operatorkit.writers import WriteLog, recording
from testkit.servers import PrivateRedis, private_redis

LEASE = ("coordination.k8s.io/v1/leases", NAMESPACE, "modcache-operator")
_, RENEW_DEADLINE_S, _ = FAST_LEASE
#: How late after the renew deadline a write may still land (the event loop's delay, a script in flight).
STOP_SLACK_S = 1.0


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with api_server() as server:
        yield server


@pytest.fixture
def redis() -> AsyncIterator[PrivateRedis]:
    with private_redis() as server:
        yield server


@pytest.fixture
async def cluster(
    api: ApiServer, redis: PrivateRedis, source: pgsource.PgSource, database_url: str, keyspace: keys.KeySpace
) -> Cluster:
    """Secrets and one ModuleCache over 3 modules, on the private Redis; no operator yet."""
    for n in range(3):
        await source.put_module(f"pkg/mod_{n}.py", f"VALUE = {n}\n".encode())
    cluster = Cluster(emulator=api.emulator, operator=None, ports=None)  # type: ignore[arg-type]
    await cluster.apply_secret("urls", {"database": database_url, "redis": redis.url})
    await cluster.create_cache("main", cache_spec(keyspace.prefix, resyncInterval="1h"))
    return cluster


@contextlib.asynccontextmanager
async def changing(source: pgsource.PgSource) -> AsyncIterator[None]:
    """A module changed in PostgreSQL every 50 ms, so whoever leads keeps writing to Redis."""

    async def change_forever() -> None:
        for n in range(1_000_000):
            await source.put_module("pkg/mod_0.py", f"VALUE = {n}  # changed\n".encode())
            await asyncio.sleep(0.05)  # the pace of the writes, not a wait for a state

    task = asyncio.create_task(change_forever())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _lease(cluster: Cluster) -> dict[str, object]:
    return dict(cluster.emulator.objects[LEASE].raw["spec"])


async def _leader_and_standby(
    api: ApiServer, cluster: Cluster, tmp_path: Path, stack: contextlib.AsyncExitStack
) -> tuple[OperatorProcess, OperatorProcess]:
    first = await stack.enter_async_context(operator_process(api.url, tmp_path, name="replica-a"))
    await first.logged("replica-a")  # identity = pod name + suffix
    await first.logged(" leads ")
    await cluster.wait_for(lambda: cluster.ready("main"), "Ready under the first leader", timeout_s=30)
    second = await stack.enter_async_context(operator_process(api.url, tmp_path, name="replica-b"))
    await second.logged("stands by")
    return first, second


def _assert_one_writer_at_a_time(log: WriteLog, old: OperatorProcess, new: OperatorProcess, fault_at: float) -> None:
    old_writes, new_writes = log.by(old.pid), log.by(new.pid)
    assert old_writes, "the first leader never wrote: the test proves nothing"
    assert new_writes, "the new leader never wrote"
    last_old, first_new = max(w.at for w in old_writes), min(w.at for w in new_writes)
    assert last_old < first_new, f"both wrote: the old leader until {last_old:.3f}, the new one from {first_new:.3f}"
    assert last_old - fault_at <= RENEW_DEADLINE_S + STOP_SLACK_S, (
        f"the old leader kept writing {last_old - fault_at:.2f}s after its renewals began to fail"
    )


@pytest.mark.parametrize("fault", ["hang", "reset"])
async def test_a_leader_cut_off_from_the_lease_stops_writing_before_a_standby_takes_over(
    api: ApiServer,
    cluster: Cluster,
    redis: PrivateRedis,
    source: pgsource.PgSource,
    tmp_path: Path,
    fault: str,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        leader, standby = await _leader_and_standby(api, cluster, tmp_path, stack)
        assert _lease(cluster)["leaseTransitions"] == 0
        async with changing(source), recording(redis.url, redis.port, [leader.pid, standby.pid]) as log:
            await log.until(lambda: len(log.by(leader.pid)) >= 3)
            fault_at = time.time()
            api.emulator.faults.append(Fault(fault, token=leader.token, plural="leases"))
            await leader.logged("stepping down", timeout_s=RENEW_DEADLINE_S + 10)
            await standby.logged(" leads ", timeout_s=30)
            await log.until(lambda: len(log.by(standby.pid)) >= 3)
        _assert_one_writer_at_a_time(log, leader, standby, fault_at)
        assert str(_lease(cluster)["holderIdentity"]).startswith("replica-b")
        assert _lease(cluster)["leaseTransitions"] == 1, "client-go counts one transition per change of holder"
        api.emulator.heal()
        assert await standby.terminate() == 0, standby.tail()
        assert await leader.terminate() == 0, leader.tail()


async def test_an_api_server_restart_within_the_renew_deadline_ends_no_term(
    api: ApiServer, cluster: Cluster, redis: PrivateRedis, source: pgsource.PgSource, tmp_path: Path
) -> None:
    async with operator_process(api.url, tmp_path, name="replica-a") as leader:
        await leader.logged(" leads ")
        await cluster.wait_for(lambda: cluster.ready("main"), "Ready", timeout_s=30)
        before = _lease(cluster)

        await api.stop()
        await asyncio.sleep(1.0)  # the outage itself: shorter than the 2.5 s renew deadline
        await api.start()

        renewed = before["renewTime"]
        await cluster.wait_for(lambda: _lease(cluster)["renewTime"] != renewed, "a renewal after the restart")
        assert _lease(cluster)["holderIdentity"] == before["holderIdentity"]
        assert _lease(cluster)["leaseTransitions"] == before["leaseTransitions"]
        assert not [line for line in leader.lines if "stepping down" in line or "holds the Lease" in line]
        async with recording(redis.url, redis.port, [leader.pid]) as log:
            await source.put_module("pkg/after_restart.py", b"AFTER = 1\n")
            await log.until(lambda: any(w.key.endswith("after_restart.py") for w in log.by(leader.pid)))
        await cluster.wait_for(lambda: cluster.status("main").get("sourceModules") == 4, "the status after it")
        assert sum(" leads " in line for line in leader.lines) == 1, "one term throughout"
        assert await leader.terminate() == 0, leader.tail()


async def test_sigterm_after_a_lost_lease_exits_at_once(api: ApiServer, cluster: Cluster, tmp_path: Path) -> None:
    async with operator_process(api.url, tmp_path, name="replica-a") as leader:
        await leader.logged(" leads ")
        api.emulator.faults.append(Fault("hang", token=leader.token, plural="leases"))
        await leader.logged("stepping down", timeout_s=RENEW_DEADLINE_S + 10)
        started = time.monotonic()
        assert await leader.terminate(timeout_s=10) == 0, leader.tail()
        took_s = time.monotonic() - started
        assert took_s < 1.0, f"SIGTERM after a lost Lease took {took_s:.2f}s"
        api.emulator.heal()
