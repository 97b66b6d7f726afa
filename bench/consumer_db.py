"""Database overhead per message: ours vs. the original plan's persistent-session design, in the same run.

Per message, both do the same lookups (workflow, organization and configs through ConfigResolver's Redis cache)
and the same execution claim and outcome write. What differs:

* ours: ``WorkflowExecutionConsumer.prepare`` (one short unit of work on the pooled engine, then the O(1)
  cache readiness check) and ``record`` (a second unit);
* the original plan's: one AsyncSession kept for the consumer's life, ``SELECT 1`` before each message
  (``_get_db_session``), the lookups on that session, and ``_sync_module_cache``: every module row with its
  content, then one EXISTS round trip per module (the claim and write go through units as in ours); measured
  also without the module sync, to show the cost of the session design alone.

No worker runs: this measures what the consumer spends around an execution. Prints p50/p99 per message, new
PostgreSQL connections per 1,000 messages after warm-up, and the backend state the original plan's session leaves.

    ./dev bench consumer_db [--modules 1000] [--messages 1000] [--plan-messages 200]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from bench import _consumer_kit as kit
from modcache import settings as core_settings
from modcache_consumer import consumer, executions, messages, settings

WARMUP = 20


async def run(args: argparse.Namespace) -> None:
    await kit.print_machine_info()
    print(f"workload: {args.modules} modules of 4 KiB; a trivial workflow; org + 3 configs cached in Redis")
    async with kit.scratch_database() as url, kit.scratch_keyspace() as keyspace, kit.scratch_queue() as queue:
        await kit.load_modules(url, args.modules)
        the_settings = settings.ConsumerSettings(
            database_url=url,
            redis_url=kit.REDIS_URL,
            amqp_url=kit.AMQP_URL,
            queue_name=queue,
            key_prefix=keyspace.prefix,
            cache_namespace=keyspace.prefix.removesuffix("bifrost:module:"),
            consumer_concurrency=4,
            health_port=None,
        )
        async with consumer.WorkflowExecutionConsumer(settings=the_settings) as ours:
            workflow_id = await ours.workflows.put("bench", "def run():\n    return 1\n", function_name="run")
            org = await ours.configs.put_organization("Acme")
            for key in ("region", "tier", "owner"):
                await ours.configs.set_config(key, "x", organization_id=org)
            request = _requests(workflow_id, org)
            ours_s, ours_new = await _measure(lambda: _ours(ours, next(request)), args.messages, ours)
            bare_s, bare_new, _ = await _plan(ours, url, request, args.messages, keyspace, sync=False)
            plan_s, plan_new, plan_state = await _plan(ours, url, request, args.plan_messages, keyspace, sync=True)
    per_k = 1000 / args.messages
    print(
        f"ours  (unit-of-work sessions, O(1) readiness): {kit.describe_ms(ours_s)}   "
        f"new connections per 1,000 messages: {ours_new * per_k:.0f}"
    )
    print(
        f"original plan's session (shared, SELECT 1)    : {kit.describe_ms(bare_s)}   "
        f"new connections per 1,000 messages: {bare_new * per_k:.0f}"
    )
    print(
        f"plan  (shared session, SELECT 1 + full sync) : {kit.describe_ms(plan_s)}   "
        f"new connections per 1,000 messages: {plan_new * 1000 / args.plan_messages:.0f}"
    )
    print(
        f"speed-up at p50: {kit.percentile(plan_s, 50) / kit.percentile(ours_s, 50):.0f}x; "
        f"the original plan's session backend between messages: {plan_state!r}"
    )


def _requests(workflow_id: uuid.UUID, org: uuid.UUID):  # type: ignore[no-untyped-def]
    while True:
        yield messages.ExecutionRequest(
            execution_id=messages.ExecutionId(uuid.uuid4()),
            workflow_id=messages.WorkflowId(workflow_id),
            organization_id=messages.OrganizationId(org),
        )


async def _ours(ours: consumer.WorkflowExecutionConsumer, request: messages.ExecutionRequest) -> None:
    admitted = await ours.prepare(request)
    assert isinstance(admitted, consumer.Admitted)
    await ours.record(admitted.lease, messages.Outcome(messages.Status.SUCCESS, result=1, duration_ms=0))
    ours.leases.drop(request.execution_id)


async def _measure(one, count: int, ours: consumer.WorkflowExecutionConsumer) -> tuple[list[float], float]:  # type: ignore[no-untyped-def]
    for _ in range(WARMUP):
        await one()
    opened = ours.metrics.db_connections._value.get()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await one()
        samples.append(time.perf_counter() - started)
    return samples, ours.metrics.db_connections._value.get() - opened


async def _plan(ours, url, request, count, keyspace, *, sync):  # type: ignore[no-untyped-def]
    engine = create_async_engine(
        core_settings.sqlalchemy_url(url), pool_size=5, connect_args={"server_settings": {"application_name": "plan"}}
    )
    connects = 0

    def on_connect(*_: object) -> None:
        nonlocal connects
        connects += 1

    sa.event.listen(engine.sync_engine, "connect", on_connect)
    plan = kit.PlanSession(
        sessions=async_sessionmaker(engine, expire_on_commit=False), client=ours.redis, keyspace=keyspace
    )
    await plan.start()

    async def one() -> None:
        req = next(request)
        db = await plan._get_db_session()
        await ours.workflows.get_workflow_for_execution(req.workflow_id, db=db)
        organization = await ours.configs.get_organization(req.organization_id, db=db)
        await ours.configs.load_config_for_scope(f"ORG:{organization.id}", db=db)
        if sync:
            await plan._sync_module_cache()
        outcome = messages.Outcome(messages.Status.SUCCESS)
        terms = ours.leases.terms
        claim = await ours.database.run(
            lambda unit: executions.claim(unit, req, terms=terms, workflow_name="bench"), autocommit=True
        )
        assert isinstance(claim, executions.Lease)
        await ours.database.run(lambda unit: executions.finish_leased(unit, [(claim, outcome)], terms=terms))

    try:
        for _ in range(WARMUP // 4):
            await one()
        before = connects
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            await one()
            samples.append(time.perf_counter() - started)
        state = await _backend_state(url, "plan")
        return samples, connects - before, state
    finally:
        await plan.stop()
        await engine.dispose()


async def _backend_state(url: str, application_name: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        states = await conn.fetch("SELECT state FROM pg_stat_activity WHERE application_name = $1", application_name)
    finally:
        await conn.close()
    return ", ".join(sorted(r["state"] for r in states)) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(prog="./dev bench consumer_db")
    parser.add_argument("--modules", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--plan-messages", type=int, default=200)
    asyncio.run(run(parser.parse_args()))
