"""Executor-side CPU per execution (issue 10, item 6): trivial executions through ``Executor.run``, 2 at a time
(no consumer, broker or database), measured per process from ``/proc``: the template with its reaped clones, the
kernel's workers (``kworker``/``ksoftirqd``/``rcu``: namespace teardown), the caller and the whole machine.
CPU time per execution holds up on a busy machine where rates do not; run the variants one after another.

    ./dev bench executor_cpu [--executions 600] [--concurrency 2] [--network none|host]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

from bench import _consumer_kit as kit
from bench.consumer_executor import _job, _NoSession
from modcache_consumer import executor

WARMUP = 50
_HZ = os.sysconf("SC_CLK_TCK")
_KERNEL_WORKERS = ("kworker", "ksoftirq", "rcu")


def _cpu_s(pid: int, *, reaped: bool = True) -> float:
    """user + system CPU of ``pid`` (and of its reaped children: the template's clones)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    used = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if reaped else 0)
    return used / _HZ


def _kernel_workers_s() -> float:
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if raw[raw.index("(") + 1 : raw.rindex(")")].startswith(_KERNEL_WORKERS):
            fields = raw.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / _HZ


def _machine_busy_s() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return (sum(int(x) for x in fields[1:4]) + sum(int(x) for x in fields[6:9])) / _HZ


async def run(args: argparse.Namespace) -> None:
    await kit.print_machine_info()
    the_executor = executor.Executor(policy=executor.Policy(network=args.network))
    await the_executor.start()
    assert the_executor.template_pid is not None
    template, isolation = the_executor.template_pid, the_executor.isolation
    slots = asyncio.Semaphore(args.concurrency)
    latencies: list[float] = []

    async def one() -> None:
        async with slots:
            started = time.perf_counter()
            outcome = await the_executor.run(_job(), timeout_s=30, session=_NoSession())
            assert outcome.result == 1, outcome.error
            latencies.append(time.perf_counter() - started)

    try:
        await asyncio.gather(*(one() for _ in range(WARMUP)))
        latencies.clear()
        before = (_cpu_s(template), _cpu_s(os.getpid(), reaped=False), _kernel_workers_s(), _machine_busy_s())
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(args.executions)))
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0.5)  # the last clones reaped, their namespaces torn down
        after = (_cpu_s(template), _cpu_s(os.getpid(), reaped=False), _kernel_workers_s(), _machine_busy_s())
    finally:
        await the_executor.close()
    per = [(b - a) / args.executions * 1000 for a, b in zip(before, after, strict=True)]
    print(f"executor: {isolation}; network {args.network}; load {os.getloadavg()[0]:.2f}")
    print(f"template + its clones: {per[0]:.2f} ms CPU per execution")
    print(f"caller (Executor.run): {per[1]:.2f} ms   kernel workers: {per[2]:.2f} ms   machine: {per[3]:.2f} ms")
    print(
        f"{args.executions / elapsed:.0f} executions/s; Executor.run p50 {statistics.median(latencies) * 1000:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="./dev bench executor_cpu")
    parser.add_argument("--executions", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--network", choices=("none", "host"), default="none")
    asyncio.run(run(parser.parse_args()))
