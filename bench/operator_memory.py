"""Operator RSS with one ModuleCache over 100,000 modules x 4 KiB (target <= 200 MB), vs. loading them naively.

``modcache operator`` runs as its own process against the emulated Kubernetes API, with real PostgreSQL and
Redis. Its RSS is sampled every 20 ms: idle, while it fills a cold cache (400 MB of content written), and during
a no-drift full resync (asked for with the resync annotation). The naive approach, in the same run: one process
that reads every row with its content (the original plan's way), as the operator would if it did not stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench import _operator_kit as kit
from modcache_operator import names

MODULES = 100_000
MODULE_BYTES = 4096
TARGET_MB = 200
MODCACHE = Path(sys.executable).parent / "modcache"


def main() -> None:
    asyncio.run(run())


async def run() -> None:
    print(await kit.machine_info())
    async with kit.scratch_database() as database, kit.scratch_prefix() as prefix, kit.emulated_api() as api:
        emulator, api_url = api
        started = time.perf_counter()
        await kit.load_modules(database, MODULES, MODULE_BYTES)
        print(f"loaded {MODULES:,} modules x {MODULE_BYTES} B in {time.perf_counter() - started:.1f}s")
        cluster = kit.Cluster(emulator=emulator, operator=None, ports=None)  # type: ignore[arg-type]
        await cluster.apply_secret("urls", {"database": database, "redis": kit.service_url("redis")})
        with tempfile.TemporaryDirectory() as tmp:
            ours = await _measure_operator(cluster, api_url, Path(tmp), prefix)
        naive_mb = _naive_rss_mb(database)
    idle, fill, fill_s, verify, verify_s = ours
    print(f"ours : idle {idle:.0f} MB; cold fill peak {fill:.0f} MB ({fill_s:.1f}s to Ready with {MODULES:,} cached);")
    print(f"       no-drift full resync peak {verify:.0f} MB ({verify_s:.2f}s to lastHandledReconcileAt)")
    print(f"naive: {naive_mb:.0f} MB (every row with content in memory)")
    verdict = "OK" if max(fill, verify) <= TARGET_MB else "OVER"
    print(f"target: operator peak <= {TARGET_MB} MB -> {verdict} ({max(fill, verify):.0f} MB)")


async def _measure_operator(
    cluster: kit.Cluster, api_url: str, tmp: Path, prefix: str
) -> tuple[float, float, float, float, float]:
    health_port, metrics_port = _free_port(), _free_port()
    args = [
        str(MODCACHE), "operator", "--namespace", kit.NAMESPACE, "--no-leader-election", "--bind", "127.0.0.1",
        "--kubeconfig", str(kit.kubeconfig(api_url, tmp / "kubeconfig")),
        "--health-port", str(health_port), "--metrics-port", str(metrics_port),
    ]  # fmt: skip
    log = (tmp / "operator.log").open("wb")
    proc = await asyncio.create_subprocess_exec(*args, stdout=log, stderr=log)
    try:
        process = psutil.Process(proc.pid)
        await kit.until_ready(health_port)
        idle = _rss_mb(process)
        await cluster.create_cache("main", kit.spec(prefix, resyncInterval="1h"))
        started = time.perf_counter()
        fill = await _peak_until(process, lambda: cluster.status("main").get("cachedModules") == MODULES)
        fill_s = time.perf_counter() - started
        token = "bench-verify"
        await cluster.patch_cache("main", {"metadata": {"annotations": {names.RESYNC_ANNOTATION: token}}})
        started = time.perf_counter()
        verify = await _peak_until(process, lambda: cluster.status("main").get("lastHandledReconcileAt") == token)
        verify_s = time.perf_counter() - started
        return idle, fill, fill_s, verify, verify_s
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await proc.wait()
        log.close()


async def _peak_until(process: psutil.Process, done: object, timeout_s: float = 300) -> float:
    peak, deadline = 0.0, time.monotonic() + timeout_s
    while not done():  # type: ignore[operator]
        peak = max(peak, _rss_mb(process))
        if time.monotonic() > deadline:
            raise TimeoutError("the operator did not finish in time")
        await asyncio.sleep(0.02)
    return max(peak, _rss_mb(process))


def _rss_mb(process: psutil.Process) -> float:
    return float(process.memory_info().rss) / 2**20


def _naive_rss_mb(database: str) -> float:
    code = (
        "import asyncio, asyncpg, psutil\n"
        "async def main():\n"
        f"    conn = await asyncpg.connect({database!r})\n"
        '    rows = await conn.fetch("SELECT path, content, content_hash FROM workspace_files")\n'
        "    print(psutil.Process().memory_info().rss / 2**20, len(rows))\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(out.split()[0])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
