"""``modcache operator`` as a process: flags, a real run against the emulated API, graceful stop, two replicas."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner

from modcache import keys, pgsource
from modcache.cli import main
from modcache_operator import names
from operatorkit.cluster import NAMESPACE, Cluster, emulated_api
from operatorkit.emulator import Emulator
from testkit.servers import free_port

MODCACHE = Path(sys.executable).parent / "modcache"
LEASE = ("coordination.k8s.io/v1/leases", NAMESPACE, "modcache-operator")


@pytest.mark.parametrize("args", [[], ["--namespace", "a", "--all-namespaces"]], ids=["neither", "both"])
def test_namespace_or_all_namespaces_is_required(args: list[str]) -> None:
    result = CliRunner().invoke(main.cli, ["operator", *args])
    assert result.exit_code == 2
    assert "give --namespace NS (repeatable) or --all-namespaces" in result.output


class Process:
    """``modcache operator`` in a child process, pointed at the emulator through a kubeconfig."""

    def __init__(self, kubeconfig: Path, log: Path) -> None:
        self.kubeconfig = kubeconfig
        self.log = log
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        args = [
            str(MODCACHE), "-v", "operator", "--namespace", NAMESPACE, "--kubeconfig", str(self.kubeconfig),
            "--leader-election", "--metrics-port", str(self.metrics_port), "--health-port", str(self.health_port),
            "--bind", "127.0.0.1",
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(*args, stdout=out, stderr=out)

    async def probe(self, path: str) -> int:
        try:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{self.health_port}{path}") as r:
                return r.status
        except aiohttp.ClientError:
            return 0

    async def wait_probe(self, path: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while await self.probe(path) != 200:
            assert self.proc is not None
            assert self.proc.returncode is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{path} never answered 200:\n{self.log.read_text()[-3000:]}"
            await asyncio.sleep(0.05)

    async def terminate(self, timeout_s: float = 30) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout_s)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[Cluster, Path]]:
    """The emulated API (no operator in-process) and a kubeconfig pointing at it."""
    async with emulated_api() as (emulator, url):
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            f"""apiVersion: v1
kind: Config
clusters: [{{name: kmock, cluster: {{server: "{url}"}}}}]
users: [{{name: test, user: {{token: test-token}}}}]
contexts: [{{name: test, context: {{cluster: kmock, user: test}}}}]
current-context: test
"""
        )
        yield Cluster(emulator=emulator, operator=None, ports=None), kubeconfig  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def operator_process(kubeconfig: Path, log: Path) -> AsyncIterator[Process]:
    process = Process(kubeconfig, log)
    await process.start()
    try:
        yield process
    finally:
        await process.kill()


def _holder(emulator: Emulator) -> str:
    try:
        return str(emulator.objects[LEASE].raw["spec"].get("holderIdentity") or "")
    except (KeyError, ValueError):
        return ""


async def test_two_replicas_one_writer_and_a_handover(
    api: tuple[Cluster, Path],
    tmp_path: Path,
    source: pgsource.PgSource,
    database_url: str,
    redis_url: str,
    keyspace: keys.KeySpace,
    redis_client: aioredis.Redis,
) -> None:
    cluster, kubeconfig = api
    await source.put_module("a.py", b"A = 1\n")
    await cluster.apply_secret("urls", {"database": database_url, "redis": redis_url})
    await cluster.create_cache("main", {
        "source": {"databaseUrlSecretRef": {"name": "urls", "key": "database"}},
        "cache": {"redisUrlSecretRef": {"name": "urls", "key": "redis"}},
        "keyPrefix": keyspace.prefix,
    })  # fmt: skip

    async with (
        operator_process(kubeconfig, tmp_path / "first.log") as first,
        operator_process(kubeconfig, tmp_path / "second.log") as second,
    ):
        await first.wait_probe("/readyz")
        await cluster.wait_for(lambda: cluster.ready("main"), "Ready True", timeout_s=30)
        await second.wait_probe("/readyz")  # a standby is ready too (helm --wait must not hang on it)
        leader = _holder(cluster.emulator)
        assert leader
        assert await first.probe("/healthz") == await second.probe("/healthz") == 200

        active, standby = (first, second) if _leads(first, leader) else (second, first)
        assert _leads(active, leader)
        assert await active.terminate() == 0, active.log.read_text()[-3000:]
        await cluster.wait_for(lambda: _holder(cluster.emulator) not in ("", leader), "the standby took over", 30)

        await redis_client.delete(keyspace.content("a.py"))
        await cluster.wait_for(lambda: cluster.status("main").get("totalRepairs") == 2, "repaired by the new leader")
        assert await standby.terminate() == 0, standby.log.read_text()[-3000:]
    assert _holder(cluster.emulator) == "", "a replica stopping gracefully releases the Lease"
    assert cluster.body("main")["metadata"]["finalizers"] == [names.FINALIZER]  # type: ignore[index]


def _leads(process: Process, holder: str) -> bool:
    return f"{holder} leads" in process.log.read_text()
