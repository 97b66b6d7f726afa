"""No busy loops, no request storms: an operator process at rest costs next to nothing, in every state.

``modcache operator`` runs as its own process (production timings) against the emulated API, which counts the
requests it sends (by its token); its CPU time comes from ``/proc``. Once a ModuleCache has settled Ready,
suspended, or stuck on a missing Secret (and poked once: a resync request), the process must stay under 5% of
one core and send at most a handful of requests over the window. The bounds are far above what an idle
operator uses (about 0.1% and one or two requests) and far below the failures they guard against (a
suspended ModuleCache spinning one full core; a missing Secret read about 15 times a second).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import psutil
import pytest

from modcache import keys, pgsource
from modcache_operator import names
from operatorkit.cluster import Cluster, cache_spec, emulated_api
from operatorkit.processes import OperatorProcess, operator_process

C = names.ConditionType
WINDOW_S = 6.0
SETTLE_S = 1.0
MAX_CPU_SHARE = 0.05
MAX_REQUESTS = 10


async def _ready(cluster: Cluster, prefix: str) -> None:
    await cluster.create_cache("main", cache_spec(prefix))
    await cluster.wait_for(lambda: cluster.ready("main"), "Ready", timeout_s=30)


async def _suspended(cluster: Cluster, prefix: str) -> None:
    await _ready(cluster, prefix)
    await cluster.patch_cache("main", {"spec": {"suspend": True}})
    await cluster.wait_for(lambda: cluster.condition("main", C.READY)[1] == names.Reason.SUSPENDED, "Suspended")


async def _missing_secret(cluster: Cluster, prefix: str) -> None:
    await cluster.create_cache("main", cache_spec(prefix, secret="absent"))
    reason = names.Reason.SECRET_NOT_FOUND
    await cluster.wait_for(lambda: cluster.condition("main", C.READY)[1] == reason, "SecretNotFound", timeout_s=30)
    await cluster.patch_cache("main", {"metadata": {"annotations": {names.RESYNC_ANNOTATION: "poke"}}})


STATES: dict[str, Callable[[Cluster, str], Awaitable[None]]] = {
    "ready": _ready,
    "suspended": _suspended,
    "missing secret": _missing_secret,
}


@pytest.fixture
async def api(source: pgsource.PgSource, database_url: str, redis_url: str) -> AsyncIterator[tuple[Cluster, str]]:
    for n in range(20):
        await source.put_module(f"pkg/mod_{n}.py", f"VALUE = {n}\n".encode())
    async with emulated_api() as (emulator, url):
        cluster = Cluster(emulator=emulator, operator=None, ports=None)  # type: ignore[arg-type]
        await cluster.apply_secret("urls", {"database": database_url, "redis": redis_url})
        yield cluster, url


@pytest.mark.parametrize("state", list(STATES))
async def test_an_operator_at_rest_uses_almost_no_cpu_and_few_requests(
    api: tuple[Cluster, str], keyspace: keys.KeySpace, tmp_path: Path, state: str
) -> None:
    cluster, url = api
    async with operator_process(url, tmp_path, name="op", leader_election=False) as operator:
        await operator.logged("ready: kopf is watching")
        await STATES[state](cluster, keyspace.prefix)
        await asyncio.sleep(SETTLE_S)  # let the last status write and its echo pass
        cpu_s, requests = await _measure(cluster, operator)
        share = cpu_s / WINDOW_S
        assert share < MAX_CPU_SHARE, f"{state}: {share:.1%} of a core over {WINDOW_S:.0f}s\n{operator.tail()}"
        assert len(requests) <= MAX_REQUESTS, f"{state}: {len(requests)} requests in {WINDOW_S:.0f}s: {requests[:20]}"
        assert await operator.terminate() == 0, operator.tail()


async def _measure(cluster: Cluster, operator: OperatorProcess) -> tuple[float, list[str]]:
    """CPU seconds the process used and the requests it sent during the window."""
    process = psutil.Process(operator.pid)
    token = f"Bearer {operator.token}"
    served_before = len(cluster.emulator.requests_log())
    before = process.cpu_times()
    await asyncio.sleep(WINDOW_S)  # the measurement: what the process does when nothing happens
    after = process.cpu_times()
    sent = [r for r in cluster.emulator.requests_log()[served_before:] if r.headers.get("Authorization") == token]
    cpu_s = (after.user - before.user) + (after.system - before.system)
    return cpu_s, [f"{r.method.value} {r.url.path}" for r in sent]
