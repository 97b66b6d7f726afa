"""Operator CPU and Kubernetes API requests at steady state, per ModuleCache, beside another revision's.

``modcache operator`` runs as its own process against the emulated Kubernetes API (requests are counted where
they arrive), with a private PostgreSQL (embedded, ``max_connections`` 300: 100 ModuleCaches hold two
connections each) and a private Redis. For each scenario a fresh emulator and a fresh operator process; once the
scenario has settled, the operator's CPU time (user + system, from ``/proc``) and the requests it sent are
counted for ``--window`` seconds and scaled to an hour:

* ``ready x1`` / ``ready x100``: ModuleCaches over 100 modules each, Ready, nothing changing;
* ``suspended x1``: Ready, then ``spec.suspend: true``;
* ``missing Secret x1``: a ModuleCache naming a Secret that does not exist, poked once (a resync request).

``--baseline REF`` (default ``main``) runs the same scenarios with that git revision's code (its ``src/``,
``operator/`` and ``consumer/`` from ``git archive``) in the same run, on ``--baseline-python``'s dependencies
(default: this virtualenv's; a revision that needs other dependencies needs another interpreter, e.g. a
virtualenv made for it). ``--baseline ''`` measures only the working tree.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import kmock
import psutil

from bench import _operator_kit as kit
from bench import _support
from modcache import db, embedded
from modcache_operator import names

ROOT = Path(__file__).resolve().parents[1]
MODULES = 100
SETTLE_S = 5.0


@dataclasses.dataclass(frozen=True)
class Scenario:
    label: str
    caches: int
    prepare: Callable[[kit.Cluster, list[str]], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class Measured:
    cpu_s: float
    window_s: float
    requests: collections.Counter[str]

    def per_hour(self, value: float) -> float:
        return value * 3600 / self.window_s


def main() -> None:
    parser = argparse.ArgumentParser(prog="./dev bench operator_steady")
    parser.add_argument("--baseline", default="main", help="git revision to measure beside the working tree")
    parser.add_argument("--baseline-python", default=sys.executable, help="the interpreter to run it with")
    parser.add_argument("--window", type=float, default=120.0, help="seconds measured per scenario")
    parser.add_argument("--sizes", default="1,100", help="ModuleCache counts of the 'ready' scenario")
    args = parser.parse_args(sys.argv[1:])
    sizes = [int(n) for n in args.sizes.split(",")]
    asyncio.run(run(args.baseline, args.baseline_python, args.window, sizes))


async def run(baseline: str, baseline_python: str, window_s: float, sizes: list[int]) -> None:
    scenarios = [Scenario(f"ready x{n}", n, _ready) for n in sizes]
    scenarios[1:1] = [Scenario("suspended x1", 1, _suspended), Scenario("missing Secret x1", 1, _missing_secret)]
    with tempfile.TemporaryDirectory(prefix="modcache-bench-steady-") as tmp, _support.private_redis() as redis:
        codes = {"ours": (ROOT, sys.executable)}
        if baseline:
            codes[baseline] = (_export(baseline, Path(tmp) / "baseline"), baseline_python)
        with embedded.running(embedded.start_postgres(Path(tmp) / "pg" / "data")) as pg:
            database = await _database(pg.url)
            await _support.print_machine_info(database_url=database, redis_url=redis)
            await kit.load_modules(database, MODULES, 1024)
            print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; window {window_s:.0f}s")
            results: dict[tuple[str, str], Measured] = {}
            for scenario in scenarios:
                for who, (code, python) in codes.items():
                    measured = await _measure(code, python, scenario, database, redis, window_s, tmp)
                    results[who, scenario.label] = measured
                    _print_one(who, scenario, results[who, scenario.label])
            print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    _print_table(scenarios, list(codes), results)


def _export(revision: str, into: Path) -> Path:
    """The revision's source tree (``git archive``), to run beside the working tree."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


async def _database(admin: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(admin)
    try:
        await conn.execute('CREATE DATABASE "steady"')
    finally:
        await conn.close()
    url = f"{admin.rpartition('/')[0]}/steady"
    await db.upgrade(url)
    return url


async def _measure(
    code: Path, python: str, scenario: Scenario, database: str, redis: str, window_s: float, tmp: str
) -> Measured:
    async with kit.emulated_api() as (emulator, url):
        cluster = kit.Cluster(emulator=emulator, operator=None, ports=None)  # type: ignore[arg-type]
        await cluster.apply_secret("urls", {"database": database, "redis": redis})
        prefixes = [f"steady{n}:{scenario.label.split()[0]}:" for n in range(scenario.caches)]
        async with _operator(code, python, url, Path(tmp)) as process:
            try:
                await scenario.prepare(cluster, prefixes)
            except TimeoutError:
                log = (Path(tmp) / "operator.log").read_text().splitlines()
                print("\n".join(log[-40:]), file=sys.stderr)
                raise
            await asyncio.sleep(SETTLE_S)
            before_cpu, before_requests = _cpu_s(process), len(emulator.requests_log())
            started = time.monotonic()
            await asyncio.sleep(window_s)
            cpu_s, elapsed_s = _cpu_s(process) - before_cpu, time.monotonic() - started
            requests = collections.Counter(_kind(r) for r in emulator.requests_log()[before_requests:])
    await _forget(redis, prefixes)
    return Measured(cpu_s=cpu_s, window_s=elapsed_s, requests=requests)


@contextlib.asynccontextmanager
async def _operator(code: Path, python: str, api_url: str, tmp: Path) -> AsyncIterator[psutil.Process]:
    health_port = _support.free_port()
    args = [
        python, "-c", "from modcache.cli.main import main; main()",
        "operator", "--namespace", kit.NAMESPACE, "--bind", "127.0.0.1",
        "--kubeconfig", str(kit.kubeconfig(api_url, tmp / "kubeconfig")),
        "--health-port", str(health_port), "--metrics-port", str(_support.free_port()),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(code / d) for d in ("src", "operator", "consumer"))}
    with (tmp / "operator.log").open("ab") as log:
        proc = await asyncio.create_subprocess_exec(*args, stdout=log, stderr=log, env=env, cwd=tmp)
    try:
        await kit.until_ready(health_port)
        yield psutil.Process(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _ready(cluster: kit.Cluster, prefixes: list[str]) -> None:
    for n, prefix in enumerate(prefixes):
        await cluster.create_cache(f"c{n}", kit.spec(prefix))
    await cluster.wait_for(lambda: all(cluster.ready(f"c{n}") for n in range(len(prefixes))), "all Ready", 900)


async def _suspended(cluster: kit.Cluster, prefixes: list[str]) -> None:
    await _ready(cluster, prefixes)
    await cluster.patch_cache("c0", {"spec": {"suspend": True}})
    await cluster.wait_for(lambda: cluster.condition("c0", names.ConditionType.READY)[1] == "Suspended", "Suspended")


async def _missing_secret(cluster: kit.Cluster, prefixes: list[str]) -> None:
    spec = kit.spec(prefixes[0])
    spec["source"] = {"databaseUrlSecretRef": {"name": "absent", "key": "database"}}
    await cluster.create_cache("c0", spec)
    reason = names.ConditionType.READY
    await cluster.wait_for(lambda: cluster.condition("c0", reason)[1] == "SecretNotFound", "SecretNotFound")
    poke = {"metadata": {"annotations": {names.RESYNC_ANNOTATION: "poke"}}}
    await cluster.patch_cache("c0", poke)


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _kind(request: kmock.Request) -> str:
    """Method and resource of a request, e.g. ``GET secrets``, ``PATCH modulecaches/status``, ``WATCH leases``."""
    method = "WATCH" if request.action == kmock.action.WATCH else request.method.value
    plural = request.resource.plural if request.resource is not None else request.url.path
    return f"{method} {plural}{'/' + request.subresource if request.subresource else ''}"


async def _forget(redis: str, prefixes: list[str]) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis)
    try:
        for prefix in prefixes:
            doomed = [k async for k in client.scan_iter(match=f"{prefix}*", count=10_000)]
            if doomed:
                await client.delete(*doomed)
    finally:
        await client.aclose()


def _print_one(who: str, scenario: Scenario, m: Measured) -> None:
    top = ", ".join(f"{kind} {n}" for kind, n in m.requests.most_common(4)) or "none"
    print(
        f"{scenario.label:18} {who:6}: CPU {m.cpu_s / m.window_s * 100:6.2f}% of a core, "
        f"{sum(m.requests.values())} requests in {m.window_s:.0f}s ({top})",
        flush=True,
    )


def _print_table(scenarios: list[Scenario], codes: list[str], results: dict[tuple[str, str], Measured]) -> None:
    print("\nper ModuleCache, scaled to an hour:")
    print("| scenario | code | CPU share | CPU s/h per ModuleCache | API requests/h per ModuleCache |")
    print("| --- | --- | --- | --- | --- |")
    for scenario in scenarios:
        for who in codes:
            m = results[who, scenario.label]
            cpu_h, requests_h = m.per_hour(m.cpu_s), m.per_hour(sum(m.requests.values()))
            print(
                f"| {scenario.label} | {who} | {m.cpu_s / m.window_s * 100:.2f}% | {cpu_h / scenario.caches:.1f} "
                f"| {requests_h / scenario.caches:.0f} |"
            )
