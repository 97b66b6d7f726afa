"""The CPU floor of a fresh process per execution, against the CPU budget that "2x Celery" leaves on this machine.

Throughput on a saturated machine is bounded by CPU: at a rate of R executions/s, everything that happens for an
execution (broker, consumer, database, executor, kernel) must fit in ``cores / R`` seconds of CPU. This bench
measures, in one run:

* Celery's rate (prefork ``-c 2``, ``acks_late``, PostgreSQL results; the same driver as ``consumer_throughput``)
  and so the budget per execution at twice that rate: ``cores / (2 x rate)``;
* the bare floor of a fresh isolated process: a warm template (``template.warm_up``, as the executor's) cloning
  into the execution's namespaces and exiting at once, no Python work in the clone (CPU from ``getrusage`` of the
  cloning process and its reaped clones; the kernel's deferred namespace clean-up is not included, so this is a
  lower bound);
* the executor's real cost: trivial executions one at a time through ``executor.Executor`` (the template's CPU
  with its reaped clones, ``psutil``), and what the whole machine spent meanwhile (``/proc/stat``, all processes
  and kernel threads: on a machine running nothing else, the executor's cost including the kernel's).

    ./dev bench consumer_floor [--executions 2000] [--clones 500] [--runs 300] [--no-celery]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid

import psutil

from bench import _celery
from bench import _consumer_kit as kit
from modcache_consumer import executor, protocol

WARMUP = 50
TRIVIAL = "def run():\n    return 1\n"

_CLONE_LOOP = """
import os, resource, sys
from modcache_consumer import sandbox, template
template.warm_up()
flags, n = int(sys.argv[1]), int(sys.argv[2])
def used():
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime
before = used()
for _ in range(n):
    pid = sandbox.clone(flags)
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
print((used() - before) / n)
"""


class _NoSession:
    async def answer(self, frame: dict[str, object]) -> dict[str, object]:
        return {"op": "answer", "error": "no session in this benchmark"}


def _clone_cpu_s(flags: int, n: int) -> float:
    """CPU seconds per clone+exit of a warm template with ``flags`` (namespaces need root or user namespaces)."""
    out = subprocess.run(
        [sys.executable, "-c", _CLONE_LOOP, str(flags), str(n)], check=True, capture_output=True, text=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def _machine_busy_s() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(fields[0:3]) + sum(fields[5:8])) / ticks  # user nice system + irq softirq steal


def _job() -> protocol.Job:
    return {
        "op": "run",
        "execution_id": str(uuid.uuid4()),
        "workflow": {"name": "floor", "path": "workflows/floor.py", "code": TRIVIAL, "function_name": "run"},
        "parameters": {},
        "config": {},
        "organization": None,
        "generation": 1,
    }


async def _executor_cpu_s(runs: int) -> tuple[float, float]:
    """(template + its clones, whole machine) CPU seconds per trivial execution, one at a time."""
    the_executor = executor.Executor()
    await the_executor.start()
    try:
        assert the_executor.template_pid is not None
        template = psutil.Process(the_executor.template_pid)
        for _ in range(20):  # warm-up
            await the_executor.run(_job(), timeout_s=30, session=_NoSession())
        own, machine = _tree_cpu_s(template), _machine_busy_s()
        for _ in range(runs):
            outcome = await the_executor.run(_job(), timeout_s=30, session=_NoSession())
            assert outcome.result == 1, outcome.error
        return (_tree_cpu_s(template) - own) / runs, (_machine_busy_s() - machine) / runs
    finally:
        await the_executor.close()


def _tree_cpu_s(process: psutil.Process) -> float:
    t = process.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


async def run(args: argparse.Namespace) -> None:
    await kit.print_machine_info()
    cores = os.cpu_count() or 1
    from modcache_consumer import sandbox

    plain = _clone_cpu_s(0, args.clones)
    isolated = _clone_cpu_s(sandbox.CLONE_EXECUTION, args.clones)
    template_s, machine_s = await _executor_cpu_s(args.runs)
    print(f"fork + exit of the warm template, no namespaces   {plain * 1000:6.2f} ms CPU   (n={args.clones})")
    print(f"clone + exit into the execution's namespaces      {isolated * 1000:6.2f} ms CPU   (n={args.clones})")
    print(f"executor, trivial execution: template + clone     {template_s * 1000:6.2f} ms CPU   (n={args.runs})")
    print(f"  the whole machine meanwhile (incl. kernel)      {machine_s * 1000:6.2f} ms CPU")
    if args.no_celery:
        return
    async with kit.scratch_database() as url:
        started = time.perf_counter()
        rate = await _celery.throughput(url, args.executions, WARMUP)
        took = time.perf_counter() - started
    budget = cores / (2 * rate)
    print(f"celery: {rate:7.1f} executions/s (n={args.executions}, {took:.0f} s with start-up)")
    print(f"budget at 2x Celery on {cores} cores: {budget * 1000:.2f} ms CPU per execution, for everything")
    share = f"{isolated / budget:.0%} of it; the executor alone {template_s / budget:.0%}"
    print(f"the bare isolated clone alone uses {share}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="./dev bench consumer_floor")
    parser.add_argument("--executions", type=int, default=2000)
    parser.add_argument("--clones", type=int, default=500)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--no-celery", action="store_true")
    asyncio.run(run(parser.parse_args()))
