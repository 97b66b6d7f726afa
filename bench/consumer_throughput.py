"""End-to-end throughput of a trivial workflow (publish -> worker -> result row -> reply) with 2 workers.

The consumer runs in a process of its own (as in production; this process only publishes and collects the
replies). Ours against the original plan's per-message design in the same run: the same consumer, with
``prepare`` preceded by the original plan's ``SELECT 1`` on one shared session and its full
``_sync_module_cache`` (every module with content, one EXISTS per module). Target: >= 200 executions/s on a
2-core machine.

    ./dev bench consumer_throughput [--executions 2000] [--concurrency 2] [--modules 200] [--plan-executions 300]
                                    [--no-celery] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import os
import signal
import sys
import time
import uuid
from typing import Any

import aio_pika
import asyncpg
import psutil
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from bench import _celery
from bench import _consumer_kit as kit
from modcache import keys
from modcache import settings as core_settings
from modcache_consumer import amqp, consumer, executions, loops, messages, settings, workflows

WARMUP = 50


class PlanConsumer(consumer.WorkflowExecutionConsumer):
    """Our consumer, plus what the original plan did per message before running anything."""

    async def start(self) -> None:
        await super().start()
        engine = create_async_engine(core_settings.sqlalchemy_url(self.settings.required("database_url")), pool_size=2)
        self._stack.push_async_callback(engine.dispose)
        self.plan = kit.PlanSession(
            sessions=async_sessionmaker(engine), client=self.redis, keyspace=self.settings.keyspace()
        )
        self._plan_lock = asyncio.Lock()

    async def prepare(
        self, request: messages.ExecutionRequest
    ) -> consumer.Admitted | executions.Record | executions.Busy:
        async with self._plan_lock:  # the original plan shared one AsyncSession between tasks; asyncpg forbids that
            await self.plan._sync_module_cache()  # starts with _get_db_session()'s SELECT 1
        return await super().prepare(request)


async def serve(kind: str, profile: str | None = None) -> None:
    """The consumer process: settings from MODCACHE_* (set by ``run``), until SIGTERM; with ``profile``, the
    consumer's event loop runs under cProfile and its statistics are written to that file at the end."""
    cls = PlanConsumer if kind == "plan" else consumer.WorkflowExecutionConsumer
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    profiler = cProfile.Profile(time.process_time) if profile else None  # CPU, not wall: load-proof
    async with cls(settings=settings.ConsumerSettings.from_env()):
        print("ready", flush=True)
        if profiler is not None:
            profiler.enable()
        await stop.wait()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)


def serve_main(kind: str, profile: str | None = None) -> None:
    """The consumer process on the event loop ``modcache consumer`` uses (``MODCACHE_EVENT_LOOP``)."""
    loops.run(serve(kind, profile), loop=settings.ConsumerSettings.from_env().event_loop)


async def run(args: argparse.Namespace) -> None:
    await kit.print_machine_info()
    print(f"workload: `def run(n): return n`, fresh processes, concurrency {args.concurrency}, {args.modules} modules")
    async with kit.scratch_database() as url, kit.scratch_keyspace() as keyspace:
        await kit.load_modules(url, args.modules)
        ours = await _throughput("ours", url, keyspace, args, args.executions)
        celery = None if args.no_celery else await _celery.throughput(url, args.executions, WARMUP)
        plan = await _throughput("plan", url, keyspace, args, args.plan_executions) if args.plan_executions else None
    print(f"modcache: {ours.rate:7.1f} executions/s   (n={args.executions})")
    if celery is not None:
        print(f"celery:   {celery:7.1f} executions/s   (n={args.executions}; prefork -c 2, acks_late, PG results)")
        print(f"ratio:    {ours.rate / celery:7.2f}x Celery   (target >= 2)")
    if plan is not None:
        print(f"plan:     {plan.rate:7.1f} executions/s   (n={args.plan_executions}; SELECT 1 + full sync per message)")
    print(f"consumer CPU: {ours.cpu_ms:.2f} ms per execution   (target <= 1.5; executors not included)")
    print(f"start latency (publish -> workflow started, idle): {kit.describe_ms(ours.latencies_s)}   (target p50 <= 5)")


@dataclasses.dataclass(frozen=True)
class Measured:
    rate: float
    cpu_ms: float
    latencies_s: list[float]


async def _throughput(kind: str, url: str, keyspace: keys.KeySpace, args: argparse.Namespace, n: int) -> Measured:
    profile = args.profile if kind == "ours" else None
    async with kit.scratch_queue() as queue:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MODCACHE_")},
            "MODCACHE_DATABASE_URL": url,
            "MODCACHE_REDIS_URL": kit.REDIS_URL,
            "MODCACHE_AMQP_URL": kit.AMQP_URL,
            "MODCACHE_QUEUE_NAME": queue,
            "MODCACHE_KEY_PREFIX": keyspace.prefix,
            "MODCACHE_CONSUMER_CONCURRENCY": str(args.concurrency),
            "MODCACHE_HEALTH_PORT": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            f"import bench.consumer_throughput as b; b.serve_main({kind!r}, {profile!r})",
            env=env,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            assert (await asyncio.wait_for(process.stdout.readline(), 120)) == b"ready\n", "the consumer did not start"
            elapsed, workflow_id, cpu_s = await _drive(url, queue, n, psutil.Process(process.pid))
            latencies = await _latencies(url, queue, args.latency_samples) if kind == "ours" else []
        finally:
            process.send_signal(signal.SIGTERM)
            await process.wait()
    await _check_rows(url, workflow_id, n + WARMUP)
    print(f"  {kind}: consumer process CPU {cpu_s / n * 1000:.2f} ms per execution (executors not included)")
    return Measured(rate=n / elapsed, cpu_ms=cpu_s / n * 1000, latencies_s=latencies)


async def _drive(url: str, queue: str, n: int, consumer_process: psutil.Process) -> tuple[float, uuid.UUID, float]:
    from modcache_consumer import database

    db = database.Database(url=url, pool_size=1)
    try:
        workflow_id = await workflows.Workflows(database=db).put(
            f"trivial-{uuid.uuid4().hex[:6]}", "def run(n):\n    return n\n", function_name="run"
        )
    finally:
        await db.close()
    connection = await aio_pika.connect(kit.AMQP_URL)
    try:
        caller = amqp.Caller(channel=await connection.channel(), names=amqp.Names.for_queue(queue))
        await caller.start()
        await _burst(caller, workflow_id, WARMUP)
        started, cpu = time.perf_counter(), _cpu_s(consumer_process)
        await _burst(caller, workflow_id, n)
        return time.perf_counter() - started, workflow_id, _cpu_s(consumer_process) - cpu
    finally:
        await connection.close()


async def _latencies(url: str, queue: str, samples: int) -> list[float]:
    """Publish -> the workflow's first line, one execution at a time (the consumer is idle for each)."""
    workflow_id = await _put(url, "import time\ndef run():\n    return time.time()\n")
    connection = await aio_pika.connect(kit.AMQP_URL)
    try:
        caller = amqp.Caller(channel=await connection.channel(), names=amqp.Names.for_queue(queue))
        await caller.start()
        found = []
        for _ in range(samples + 5):
            request = messages.ExecutionRequest(
                execution_id=messages.ExecutionId(uuid.uuid4()), workflow_id=messages.WorkflowId(workflow_id)
            )
            published = time.time()
            await caller.publish(request)
            reply = await caller.result(request.execution_id, timeout_s=60)
            found.append(float(reply["result"]) - published)
            await asyncio.sleep(0.02)  # idle between samples
        return found[5:]
    finally:
        await connection.close()


async def _put(url: str, code: str) -> uuid.UUID:
    from modcache_consumer import database

    db = database.Database(url=url, pool_size=1)
    try:
        return await workflows.Workflows(database=db).put(f"bench-{uuid.uuid4().hex[:6]}", code, function_name="run")
    finally:
        await db.close()


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def _burst(caller: amqp.Caller, workflow_id: uuid.UUID, n: int) -> None:
    requests = [
        messages.ExecutionRequest(
            execution_id=messages.ExecutionId(uuid.uuid4()),
            workflow_id=messages.WorkflowId(workflow_id),
            parameters={"n": i},
        )
        for i in range(n)
    ]
    await asyncio.gather(*(caller.publish(r) for r in requests))
    replies: list[Any] = await asyncio.gather(*(caller.result(r.execution_id, timeout_s=600) for r in requests))
    failed = [r for r in replies if r["status"] != "SUCCESS"]
    assert not failed, failed[:3]


async def _check_rows(url: str, workflow_id: uuid.UUID, expected: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        done = await conn.fetchval(
            "SELECT count(*) FROM executions WHERE workflow_id = $1 AND status = 'SUCCESS'", workflow_id
        )
    finally:
        await conn.close()
    assert done == expected, f"{done} result rows, expected {expected}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="./dev bench consumer_throughput")
    parser.add_argument("--executions", type=int, default=2000)
    parser.add_argument("--plan-executions", type=int, default=0)
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--no-celery", action="store_true", help="modcache only (no Celery virtualenv needed)")
    parser.add_argument("--concurrency", type=int, default=2, help="executions at once (2 executors, as Celery -c 2)")
    parser.add_argument("--modules", type=int, default=200)
    parser.add_argument("--profile", metavar="FILE", help="cProfile the consumer process; pstats written to FILE")
    asyncio.run(run(parser.parse_args()))
