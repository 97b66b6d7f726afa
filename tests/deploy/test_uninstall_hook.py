"""The chart's pre-delete hook script, run as its own process against kmock's Kubernetes API emulator over HTTP:
it deletes the ModuleCache while the operator still runs, waits for the operator to release it, and removes only
the operator's finalizer when nobody does, so ``helm uninstall`` never leaves a ModuleCache hanging."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "helm" / "modcache" / "files" / "release-modulecache.py"
NAMESPACE, NAME = "apps", "r1-modcache"
RESOURCE = "modcache.dev/v1alpha1/modulecaches"
PATH = f"/apis/modcache.dev/v1alpha1/namespaces/{NAMESPACE}/modulecaches"
FINALIZER = "modcache.dev/finalizer"
WAIT_S = 30.0


@contextlib.asynccontextmanager
async def emulated_api(tmp_path: Path) -> AsyncIterator[tuple[kmock.KubernetesEmulator, Path]]:
    """The emulator serving ModuleCaches, and a kubeconfig pointing at it."""
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        with warnings.catch_warnings():  # kmock 0.8 reads its bundled file with a deprecated importlib call
            warnings.simplefilter("ignore", DeprecationWarning)
            emulator.resources.load_bundled()
        emulator.resources[RESOURCE] = kmock.ResourceInfo(
            kind="ModuleCache",
            namespaced=True,
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
            subresources={"status"},
        )
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": str(server.url).rstrip("/")}}],
                    "users": [{"name": "hook", "user": {"token": "hook-token"}}],
                    "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "hook"}}],
                    "current-context": "kmock",
                }
            )
        )
        yield emulator, kubeconfig


def stored(emulator: kmock.KubernetesEmulator) -> dict[str, Any] | None:
    key = (kmock.resource(RESOURCE), NAMESPACE, NAME)
    if key not in emulator.objects or emulator.objects[key].deleted:
        return None
    body: dict[str, Any] = emulator.objects[key].raw
    return body


async def create(emulator: kmock.KubernetesEmulator, finalizers: list[str]) -> None:
    body = {
        "apiVersion": "modcache.dev/v1alpha1",
        "kind": "ModuleCache",
        "metadata": {"name": NAME, "namespace": NAMESPACE, "finalizers": finalizers},
        "spec": {"keyPrefix": "bifrost:module:"},
    }
    response = await emulator.post(PATH, json=body)
    assert response.status < 300, await response.text()


async def run_hook(kubeconfig: Path, timeout_s: float) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env |= {
        "KUBECONFIG": str(kubeconfig),
        "MODCACHE_CLEANUP_NAMESPACE": NAMESPACE,
        "MODCACHE_CLEANUP_NAME": NAME,
        "MODCACHE_CLEANUP_TIMEOUT_S": str(timeout_s),
        "MODCACHE_CLEANUP_POLL_S": "0.05",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), WAIT_S)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def operator_releases(emulator: kmock.KubernetesEmulator) -> None:
    """What the operator does on deletion: stop the loop, then remove its finalizer."""
    deadline = time.monotonic() + WAIT_S
    while not (stored(emulator) or {}).get("metadata", {}).get("deletionTimestamp"):
        assert time.monotonic() < deadline, "the hook never deleted the ModuleCache"
        await asyncio.sleep(0.02)
    headers = {"Content-Type": "application/merge-patch+json"}
    response = await emulator.patch(f"{PATH}/{NAME}", json={"metadata": {"finalizers": None}}, headers=headers)
    assert response.status < 300, await response.text()


async def test_the_hook_deletes_the_module_cache_and_waits_for_the_operator(tmp_path: Path) -> None:
    async with emulated_api(tmp_path) as (emulator, kubeconfig):
        await create(emulator, [FINALIZER])
        operator = asyncio.create_task(operator_releases(emulator))
        code, out = await run_hook(kubeconfig, timeout_s=WAIT_S)
        await operator
        assert code == 0, out
        assert "released by the operator" in out
        assert stored(emulator) is None


async def test_without_an_operator_the_hook_removes_only_the_operators_finalizer(tmp_path: Path) -> None:
    async with emulated_api(tmp_path) as (emulator, kubeconfig):
        await create(emulator, ["example.org/keep", FINALIZER])
        started = time.monotonic()
        code, out = await run_hook(kubeconfig, timeout_s=1)
        assert code == 0, out
        assert time.monotonic() - started >= 1  # it waited for the operator first
        assert f"removed its finalizer {FINALIZER}" in out
        left = stored(emulator)
        assert left is not None  # another controller's finalizer still holds it: not ours to remove
        assert left["metadata"]["finalizers"] == ["example.org/keep"]
        assert left["metadata"]["deletionTimestamp"]


async def test_without_an_operator_a_module_cache_held_only_by_it_is_gone(tmp_path: Path) -> None:
    async with emulated_api(tmp_path) as (emulator, kubeconfig):
        await create(emulator, [FINALIZER])
        code, out = await run_hook(kubeconfig, timeout_s=0.5)
        assert code == 0, out
        assert stored(emulator) is None


async def test_a_module_cache_already_gone_is_fine(tmp_path: Path) -> None:
    async with emulated_api(tmp_path) as (_, kubeconfig):
        code, out = await run_hook(kubeconfig, timeout_s=WAIT_S)
        assert code == 0, out
        assert "nothing to delete" in out


async def test_an_unreachable_api_fails_the_hook_loudly(tmp_path: Path) -> None:
    async with emulated_api(tmp_path) as (_, kubeconfig):
        config = yaml.safe_load(kubeconfig.read_text())
    # The emulator is stopped now: its port refuses connections.
    code, out = await run_hook(kubeconfig, timeout_s=1)
    assert config["clusters"][0]["cluster"]["server"].startswith("http://")
    assert code != 0
    assert "Traceback" in out or "Error" in out


@pytest.fixture(autouse=True)
def _script_exists() -> None:
    assert SCRIPT.is_file()
