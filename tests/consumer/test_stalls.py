"""Attack-10: consumers that stall without dying, and rows recovery must survive (issue 10 items 3 and 4).

A consumer frozen past its lease (SIGSTOP here; a frozen container, a blocked event loop or a partitioned database
look the same from outside) keeps its executor running: its runs must end before their leases expire, so the
sweep that recovers them never starts a second run while the first is alive, and never records "consumer died
mid-run" for a run that goes on to finish its work. The witness is a Redis list every run appends to (RPUSH is
atomic, so the list's order is the order of the appends), with wall-clock times compared to the row's.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from modcache_consumer import consumer as consumer_module
from modcache_consumer import crypto, leases, serving
from testkit.consumers import ConsumerProcess
from testkit.ledger import LEDGER, Ledger
from testkit.polling import eventually

from .test_delivery import FAST_LEASES, process_env, publish, replies_on

# Notes "start A T", then "tick A T" every 50 ms for ``wait`` seconds (first attempt only: ``once``), then
# "end A T": A the attempt, T the wall clock.
TICKING = (
    LEDGER
    + """
import time
def run(url, key, once, wait, context):
    attempt = context.attempt
    note(url, key, f"start {attempt} {time.time()}")
    if redis.Redis.from_url(url).set(once, 1, nx=True):
        until = time.time() + wait
        while time.time() < until:
            note(url, key, f"tick {attempt} {time.time()}")
            time.sleep(0.05)
    note(url, key, f"end {attempt} {time.time()}")
    return attempt
"""
)
FROZEN_S = FAST_LEASES["lease_ttl_s"] * 3


@pytest.fixture
async def processes() -> AsyncIterator[list[ConsumerProcess]]:
    started: list[ConsumerProcess] = []
    yield started
    for process in started:
        if process.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.proc.pid, signal.SIGCONT)
        await process.stop()


def notes(entries: list[str]) -> list[tuple[str, int, float]]:
    return [(kind, int(attempt), float(at)) for kind, attempt, at in (e.split() for e in entries)]


@contextlib.asynccontextmanager
async def frozen(process: ConsumerProcess) -> AsyncIterator[None]:
    """The consumer process alone is stopped (its executor, a process of its own, is not), then resumed."""
    assert process.proc is not None
    os.kill(process.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.proc.pid, signal.SIGCONT)


async def start_ticking(
    harness: Any, processes: list[ConsumerProcess], tmp_path: Path, *, retries: int, **env: Any
) -> tuple[ConsumerProcess, Ledger, Any]:
    workflow_id = await harness.workflow(TICKING, retries_on_crash=retries)
    ledger = harness.ledger()
    # a short AMQP heartbeat: the broker hands what the frozen owner holds (its prefetched retry) to the survivor
    owner = ConsumerProcess(process_env(harness, amqp_heartbeat_s=1, **env), tmp_path / "owner.log")
    processes.append(owner)
    await owner.start()
    params = {**ledger.params, "once": ledger.params["key"] + ":once", "wait": 60.0}
    return owner, ledger, harness.request(workflow_id, params)


async def test_a_frozen_owners_run_ends_before_its_retry_starts(
    harness: Any, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    owner, ledger, request = await start_ticking(harness, processes, tmp_path, retries=1)
    async with replies_on(harness.settings.required("amqp_url")) as (replies, channel):
        await publish(channel, harness.settings.queue_name, request, replies.queue_name)
        await ledger.wait_for(2)  # started, and ticking
        async with frozen(owner), harness.consumer(**FAST_LEASES):  # the survivor recovers it
            row = await harness.wait_for_status(request.execution_id, "SUCCESS", timeout_s=60)
        await replies.wait_for_count(1)
        await harness.wait_for_replied(request.execution_id)
    await owner.stop()  # whatever of it was still alive is gone now: the ledger is complete
    seen = notes(await ledger.entries())
    retry_starts = next(i for i, (kind, attempt, _) in enumerate(seen) if (kind, attempt) == ("start", 2))
    assert all(attempt == 2 for _, attempt, _ in seen[retry_starts:]), seen  # nothing of run 1 after run 2 began
    assert ("end", 1) not in [(kind, attempt) for kind, attempt, _ in seen]
    assert (row["attempt"], row["result"]) == (2, "2")
    assert len(replies.bodies) == 1


async def test_a_frozen_owners_run_is_not_failed_as_dead_while_it_goes_on(
    harness: Any, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    owner, ledger, request = await start_ticking(harness, processes, tmp_path, retries=0)
    async with replies_on(harness.settings.required("amqp_url")) as (replies, channel):
        await publish(channel, harness.settings.queue_name, request, replies.queue_name)
        await ledger.wait_for(2)
        async with frozen(owner), harness.consumer(**FAST_LEASES):
            row = await harness.wait_for_status(request.execution_id, "FAILED", timeout_s=60)
        await replies.wait_for_count(1)
    await owner.stop()
    failed_at = row["finished_at"].timestamp()
    seen = notes(await ledger.entries())
    assert row["error"] == "consumer died mid-run"
    assert [kind for kind, _, _ in seen].count("end") == 0, seen  # it never finished its work...
    assert max(at for _, _, at in seen) < failed_at, (seen[-1], failed_at)  # ...nor did any after the verdict


async def test_an_owner_frozen_past_its_lease_retries_its_own_run_once_and_loses_nothing(
    harness: Any, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    """One consumer (the other replica is down): at wake-up its own sweep may take its run over before its renewal
    notices; the retry it republishes comes back to it while the stale run's handling may still be ending."""
    owner, ledger, request = await start_ticking(harness, processes, tmp_path, retries=1)
    async with replies_on(harness.settings.required("amqp_url")) as (replies, channel):
        await publish(channel, harness.settings.queue_name, request, replies.queue_name)
        await ledger.wait_for(2)
        async with frozen(owner):
            await asyncio.sleep(FROZEN_S)  # the fault's length (past the lease and a sweep), not a wait for an event
        row = await harness.wait_for_status(request.execution_id, "SUCCESS", timeout_s=30)
        await replies.wait_for_count(1)
        await harness.wait_for_replied(request.execution_id)
    seen = notes(await ledger.entries())
    assert (row["attempt"], row["result"]) == (2, "2")
    assert [(kind, attempt) for kind, attempt, _ in seen if kind != "tick"] == [("start", 1), ("start", 2), ("end", 2)]
    retry_starts = next(i for i, (kind, attempt, _) in enumerate(seen) if (kind, attempt) == ("start", 2))
    assert all(attempt == 2 for _, attempt, _ in seen[retry_starts:]), seen
    assert len(replies.bodies) == 1


async def test_a_run_started_25_days_ago_does_not_stop_the_sweep_recovering_the_others(harness: Any) -> None:
    """A RUNNING row from before leases (Bifrost's "stays Running forever"), older than int4 milliseconds, beside
    an execution whose consumer died: both are failed by the first sweep (attack-10 F2: every sweep failed)."""
    workflow_id = await harness.workflow("def run():\n    return 1\n")
    ancient, orphan = uuid.uuid4(), uuid.uuid4()
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    await harness.sql(
        "INSERT INTO executions (id, workflow_id, status, parameters, started_at, updated_at) "
        "VALUES ($1, $3, 'RUNNING', '{}', $4, $4), "
        "($2, $3, 'RUNNING', '{}', now(), now())",
        ancient,
        orphan,
        workflow_id,
        long_ago,
    )
    await harness.sql(  # the orphan's owner died: its lease ran out
        "UPDATE executions SET lease_owner = 'dead:1:0', lease_token = 1, lease_expires_at = now() - interval '1 s', "
        "attempt = 1, max_attempts = 1 WHERE id = $1",
        orphan,
    )
    async with harness.consumer(**FAST_LEASES):
        rows = await harness.wait_for_rows(
            "SELECT id, status, error, duration_ms FROM executions WHERE id = ANY($1::uuid[]) ORDER BY id",
            [ancient, orphan],
            done=lambda rows: all(r["status"] == "FAILED" for r in rows),
            timeout_s=15.0,
        )
    by_id = {r["id"]: r for r in rows}
    assert by_id[orphan]["error"] == by_id[ancient]["error"] == "consumer died mid-run"
    assert by_id[ancient]["duration_ms"] == 2**31 - 1  # longer than the column can say: its maximum


async def test_a_row_lock_that_blocks_the_renewal_never_lets_two_runs_overlap(
    harness: Any, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    """Every process healthy; someone else (an admin's query, a report) holds the row's lock past the lease, so
    the owner's renewal waits and the lease runs out (attack-10 F6)."""
    # renewals 2 s apart: without the executor's lease deadline the first run would go on for up to 2 s after the
    # survivor's sweep took it over and started the retry
    slow_renewals = {"lease_ttl_s": 4.0, "lease_renew_interval_s": 2.0}
    _, ledger, request = await start_ticking(harness, processes, tmp_path, retries=1, **slow_renewals)
    async with replies_on(harness.settings.required("amqp_url")) as (replies, channel):
        await publish(channel, harness.settings.queue_name, request, replies.queue_name)
        await ledger.wait_for(2)
        locker = await asyncpg.connect(harness.database_url)
        try:
            async with harness.consumer(**FAST_LEASES):
                async with locker.transaction():
                    await locker.execute("SELECT 1 FROM executions WHERE id = $1 FOR UPDATE", request.execution_id)
                    await asyncio.sleep(2 * slow_renewals["lease_ttl_s"])  # the fault's length: held past the lease
                row = await harness.wait_for_status(request.execution_id, "SUCCESS", timeout_s=60)
            await replies.wait_for_count(1)
        finally:
            await locker.close()
    seen = notes(await ledger.entries())
    retry_starts = next(i for i, (kind, attempt, _) in enumerate(seen) if (kind, attempt) == ("start", 2))
    assert all(attempt == 2 for _, attempt, _ in seen[retry_starts:]), seen
    assert (row["attempt"], row["result"]) == (2, "2")


@pytest.mark.parametrize(("retries", "status"), [(0, "FAILED"), (1, "SUCCESS")])
async def test_an_executor_killed_mid_run_is_resolved_at_once_by_policy(
    harness: Any, retries: int, status: str
) -> None:
    """SIGKILL of the executor (the template) during a run, the consumer alive: its processes died with it; the
    policy applies now, not when the lease (30 s here) expires, and the reason says what happened (attack-10 F8)."""
    workflow_id = await harness.workflow(TICKING, retries_on_crash=retries)
    ledger = harness.ledger()
    request = harness.request(workflow_id, {**ledger.params, "once": ledger.params["key"] + ":once", "wait": 60.0})
    amqp_url = harness.settings.required("amqp_url")
    async with replies_on(amqp_url) as (replies, channel), harness.consumer(lease_sweep_interval_s=0.5) as running:
        await publish(channel, harness.settings.queue_name, request, replies.queue_name)
        await ledger.wait_for(2)
        template = running.executor.template_pid
        assert template is not None
        os.kill(template, signal.SIGKILL)
        row = await harness.wait_for_status(request.execution_id, status, timeout_s=10)  # the lease is 30 s
        await replies.wait_for_count(1)
    assert row["attempt"] == 1 + retries
    if status == "FAILED":
        assert row["error"].startswith("the executor was lost during the execution")
    assert ("end", 1) not in [(kind, attempt) for kind, attempt, _ in notes(await ledger.entries())]


class StuckReplies(consumer_module.WorkflowExecutionConsumer):
    """Replies to ``stuck-*`` queues never get through (a broker that takes them and never confirms, for as long
    as MODCACHE_REPLY_RETRY_S allows): the seam for replies that cannot be sent."""

    async def _send_reply(self, request: Any, outcome: Any, *, retry_s: float = 0.0) -> bool:
        if (request.reply_to or "").startswith("stuck-"):
            await asyncio.sleep(3600)
        return await super()._send_reply(request, outcome, retry_s=retry_s)


async def test_owed_replies_that_cannot_be_sent_do_not_hold_up_crash_recovery(harness: Any) -> None:
    """A sweep that took over owed replies which cannot be sent goes on sweeping: a run whose consumer died later
    is still resolved within a sweep interval (attack-10 F11: 20 s per unsendable reply, one after another)."""
    workflow_id = await harness.workflow("def run():\n    return 1\n")
    owed = [uuid.uuid4() for _ in range(3)]
    for execution_id in owed:  # finished, their replies owed by a consumer that died
        await harness.sql(
            "INSERT INTO executions (id, workflow_id, status, result, started_at, finished_at, reply_to, "
            "correlation_id, lease_owner, lease_token, lease_expires_at, attempt) VALUES ($1, $2, 'SUCCESS', '1', "
            "now(), now(), 'stuck-' || CAST($1 AS uuid)::text, CAST($1 AS uuid)::text, 'dead:1:0', 1, "
            "now() - interval '1 s', 1)",
            execution_id,
            workflow_id,
        )
    the_settings = harness.settings.model_copy(update=FAST_LEASES)
    async with StuckReplies(settings=the_settings) as running:
        await harness.wait_for_rows(  # the sweep took them over and is sending them
            "SELECT id FROM executions WHERE id = ANY($1::uuid[]) AND lease_owner = $2",
            owed,
            running._terms.owner,
            done=lambda rows: len(rows) == len(owed),
        )
        orphan = uuid.uuid4()
        await harness.sql(  # then a run whose consumer died
            "INSERT INTO executions (id, workflow_id, status, started_at, lease_owner, lease_token, lease_expires_at, "
            "attempt) VALUES ($1, $2, 'RUNNING', now(), 'dead:2:0', 1, now() - interval '1 s', 1)",
            orphan,
            workflow_id,
        )
        row = await harness.wait_for_status(orphan, "FAILED", timeout_s=5 * FAST_LEASES["lease_sweep_interval_s"])
    assert row["error"] == "consumer died mid-run"


async def test_a_row_lock_on_one_execution_costs_the_consumers_other_runs_nothing(
    harness: Any, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    """Someone holds one running execution's row lock past its lease: the consumer's other run goes on and ends
    once (attack-10b N1: the one renewal statement for all leases waited on that lock, and every other run of
    the consumer was stopped and failed 'consumer died mid-run')."""
    slow_renewals = {"lease_ttl_s": 4.0, "lease_renew_interval_s": 2.0}
    workflow_id = await harness.workflow(TICKING)
    ledger = harness.ledger()
    owner = ConsumerProcess(process_env(harness, **slow_renewals), tmp_path / "owner.log")
    processes.append(owner)
    await owner.start()
    locked_s = 2 * slow_renewals["lease_ttl_s"]
    locked, other = (
        harness.request(workflow_id, {**ledger.params, "once": f"{ledger.params['key']}:{name}", "wait": wait})
        for name, wait in (("locked", 60.0), ("other", locked_s + 3.0))
    )
    async with replies_on(harness.settings.required("amqp_url")) as (replies, channel):
        for request in (locked, other):
            await publish(channel, harness.settings.queue_name, request, replies.queue_name)
        await harness.wait_for_rows(
            "SELECT id FROM executions WHERE status = 'RUNNING'", done=lambda rows: len(rows) == 2
        )
        locker = await asyncpg.connect(harness.database_url)
        try:
            async with locker.transaction():
                await locker.execute("SELECT 1 FROM executions WHERE id = $1 FOR UPDATE", locked.execution_id)
                await asyncio.sleep(locked_s)  # the fault's length: held past the lease
        finally:
            await locker.close()
        row = await harness.wait_for_status(other.execution_id, "SUCCESS", "FAILED", timeout_s=60)
    assert (row["status"], row["attempt"], row["error"]) == ("SUCCESS", 1, None)


async def test_a_lease_extension_delayed_in_the_socket_does_not_move_the_deadline(executors: Any) -> None:
    """The executor stalls (SIGSTOP) while the consumer extends a run's lease; it reads that frame only after the
    extended deadline passed. The run must end at once, not that long after the frame was read (attack-10b N9: a
    relative deadline let a run outlive its lease by 4.4 s and overlap its retry)."""
    the_executor = await executors.start()
    job = executors.job("import time\ndef run():\n    time.sleep(60)\n", generation=await executors.guard.check())
    session = serving.Session(modules=executors.modules, config={}, secrets=crypto.Secrets([]))
    run = asyncio.create_task(the_executor.run(job, timeout_s=120, session=session, lease_until=leases.clock() + 4))
    await eventually(lambda: job["execution_id"] in the_executor._leased)  # the run was handed over
    template = the_executor.template_pid
    assert template is not None
    os.kill(template, signal.SIGSTOP)
    try:
        await the_executor.extend([job["execution_id"]], leases.clock() + 5.0)
        await asyncio.sleep(6.0)  # the stall's length (past the extended deadline), not a wait for an event
    finally:
        resumed = leases.clock()
        os.kill(template, signal.SIGCONT)
    outcome = await run
    assert outcome.lease_expired
    assert leases.clock() - resumed < 2.5  # not the 5 s a frame read late would have granted
