"""``modcache operator`` as a process: flags, a real run against the emulated API, graceful stop, two replicas."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner

from modcache import keys, pgsource
from modcache.cli import main
from modcache_operator import names
from operatorkit.cluster import NAMESPACE, Cluster, cache_spec, emulated_api
from operatorkit.emulator import Emulator
from operatorkit.processes import OperatorProcess, operator_process

LEASE = ("coordination.k8s.io/v1/leases", NAMESPACE, "modcache-operator")


@pytest.mark.parametrize("args", [[], ["--namespace", "a", "--all-namespaces"]], ids=["neither", "both"])
def test_namespace_or_all_namespaces_is_required(args: list[str]) -> None:
    result = CliRunner().invoke(main.cli, ["operator", *args])
    assert result.exit_code == 2
    assert "give --namespace NS (repeatable) or --all-namespaces" in result.output


def test_lease_timings_must_leave_a_margin() -> None:
    args = ["operator", "-n", "x", "--leader-election", "--lease-namespace", "x", "--lease-duration-seconds", "5"]
    result = CliRunner().invoke(main.cli, [*args, "--renew-deadline-seconds", "5"])
    assert result.exit_code == 2
    assert "lease duration > renew deadline > retry period" in result.output


@pytest.fixture
async def api() -> AsyncIterator[tuple[Cluster, str]]:
    """The emulated API (no operator in-process) and its URL."""
    async with emulated_api() as (emulator, url):
        yield Cluster(emulator=emulator, operator=None, ports=None), url  # type: ignore[arg-type]


def _holder(emulator: Emulator) -> str:
    try:
        return str(emulator.objects[LEASE].raw["spec"].get("holderIdentity") or "")
    except (KeyError, ValueError):
        return ""


def _instances(cluster: Cluster) -> set[str]:
    """``reportingInstance`` of every event posted."""
    found = set()
    for (resource, _, _), obj in cluster.emulator.objects.items():
        if resource.plural == "events" and not obj.deleted:
            found.add(str(obj.raw.get("reportingInstance")))
    return found


async def test_two_replicas_one_writer_and_a_handover(
    api: tuple[Cluster, str],
    tmp_path: Path,
    source: pgsource.PgSource,
    database_url: str,
    redis_url: str,
    keyspace: keys.KeySpace,
    redis_client: aioredis.Redis,
) -> None:
    cluster, url = api
    await source.put_module("a.py", b"A = 1\n")
    await cluster.apply_secret("urls", {"database": database_url, "redis": redis_url})
    await cluster.create_cache("main", cache_spec(keyspace.prefix))

    async with operator_process(url, tmp_path, name="replica-1") as first:
        await first.logged(" leads ")
        await cluster.wait_for(lambda: cluster.ready("main"), "Ready True", timeout_s=30)
        async with operator_process(url, tmp_path, name="replica-2") as second:
            await second.logged("stands by")
            await _hand_over(cluster, first, second, redis_client, keyspace)
    assert _holder(cluster.emulator) == "", "a replica stopping gracefully releases the Lease"
    assert cluster.body("main")["metadata"]["finalizers"] == [names.FINALIZER]  # type: ignore[index]


async def _hand_over(
    cluster: Cluster,
    first: OperatorProcess,
    second: OperatorProcess,
    redis_client: aioredis.Redis,
    keyspace: keys.KeySpace,
) -> None:
    assert await second.probe("/readyz") == 200, "a standby is ready too (helm --wait must not hang on it)"
    await first.logged("ready: kopf is watching")
    assert await first.probe("/readyz") == 200
    assert await first.probe("/healthz") == await second.probe("/healthz") == 200
    assert _holder(cluster.emulator).startswith("replica-1-")
    assert _instances(cluster) == {"replica-1"}, "events name the pod that posted them"

    assert await first.terminate() == 0, first.tail()
    await second.logged(" leads ")
    await cluster.wait_for(lambda: _holder(cluster.emulator).startswith("replica-2-"), "the standby took over")

    await redis_client.delete(keyspace.content("a.py"))
    await cluster.wait_for(lambda: cluster.status("main").get("totalRepairs") == 2, "repaired by the new leader")
    await cluster.wait_for(lambda: "replica-2" in _instances(cluster), "an event from the new leader")
    assert await second.terminate() == 0, second.tail()
