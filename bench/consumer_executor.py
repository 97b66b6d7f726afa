"""Per-execution overhead of a fresh, isolated process (issue 8) against the reused worker it replaced.

A trivial workflow (``def run(): return 1``) is executed again and again, one at a time, and the time of the
consumer's call is measured from the consumer's side (asyncio, as the consumer calls it), in the same run:

* reused worker (before): one long-lived process, the job over a pipe, the result back (``bench._reused_worker``);
* executor: ``Executor.run``, i.e. a spawn frame with two descriptors, a clone of the warm template into its own
  PID and mount namespaces as another uid with its limits, the job and result over its own channel, and the
  end of its process;
* executor, no namespaces: the same clone without them (what the namespaces and uid cost).

Target: <= 3 ms added at p50.

    ./dev bench consumer_executor [--runs 300]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from typing import Any

from bench import _consumer_kit as kit
from modcache_consumer import executor, protocol

TRIVIAL = "def run():\n    return 1\n"


class _NoSession:
    async def answer(self, frame: dict[str, Any]) -> dict[str, Any]:
        return {"op": "answer", "error": "no session in this benchmark"}


def _job() -> protocol.Job:
    return {
        "op": "run",
        "execution_id": str(uuid.uuid4()),
        "workflow": {"name": "bench", "path": "workflows/bench.py", "code": TRIVIAL, "function_name": "run"},
        "parameters": {},
        "config": {},
        "organization": None,
        "generation": 1,
    }


async def _reused(runs: int) -> list[float]:
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench._reused_worker", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert worker.stdin is not None
    assert worker.stdout is not None
    samples = []
    try:
        for n in range(runs + 20):
            started = time.perf_counter()
            worker.stdin.write(protocol.encode(_job()))
            await worker.stdin.drain()
            header = await worker.stdout.readexactly(protocol.HEADER.size)
            body = await worker.stdout.readexactly(protocol.frame_length(header, limit=1 << 24))
            assert protocol.decode(body)["result"] == 1
            if n >= 20:  # warm-up
                samples.append(time.perf_counter() - started)
    finally:
        worker.stdin.close()
        await worker.wait()
    return samples


ISOLATION: dict[str, list[float]] = {}


async def _fresh(runs: int, *, namespaces: bool = True) -> list[float]:
    the_executor = executor.Executor(namespaces=namespaces)
    await the_executor.start()
    samples = []
    inside = ISOLATION.setdefault("namespaces" if namespaces else "none", [])
    try:
        for n in range(runs + 20):
            started = time.perf_counter()
            outcome = await the_executor.run(_job(), timeout_s=30, session=_NoSession())
            assert outcome.result == 1, outcome.error
            if n >= 20:
                samples.append(time.perf_counter() - started)
                inside.append(sum(outcome.timings_ms.values()) / 1000)
    finally:
        print(f"  (executor isolation: {the_executor.isolation})")
        await the_executor.close()
    return samples


async def run(args: argparse.Namespace) -> None:
    await kit.print_machine_info()
    print(f"workload: {args.runs} executions of a trivial workflow, one at a time, timed from the consumer")
    rows = []
    for _ in range(args.rounds):  # interleaved rounds: a busy machine's noise falls on every variant alike
        rows.append(("reused worker (before issue 8)", await _reused(args.runs)))
        rows.append(("executor: fresh isolated process", await _fresh(args.runs)))
        rows.append(("executor: fresh process, no namespaces/uid", await _fresh(args.runs, namespaces=False)))
    merged: dict[str, list[float]] = {}
    for label, samples in rows:
        merged.setdefault(label, []).extend(samples)
    for label, samples in merged.items():
        print(f"{label:<46} {kit.describe_ms(samples)}")
    base = kit.percentile(merged["reused worker (before issue 8)"], 50)
    fresh = kit.percentile(merged["executor: fresh isolated process"], 50)
    print(f"added at p50: {(fresh - base) * 1000:.2f} ms (target <= 3 ms)")
    for kind, inside in ISOLATION.items():
        label = f"  inside the clone ({kind}): isolation + the run"
        print(f"{label:<46} {kit.describe_ms(inside)}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="./dev bench consumer_executor")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    asyncio.run(run(parser.parse_args()))
