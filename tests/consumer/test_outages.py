"""Attack-10 F10: PostgreSQL backends terminated over and over while executions arrive. An outage is never taken
for a bug: no execution fails without running, no outcome is replaced by "could not be stored", nothing is
poisoned, and every caller gets exactly one reply."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from typing import Any

import asyncpg

from .test_delivery import Replies, publish, replies_on

ECHO = "def run(n):\n    return n\n"
EXECUTIONS = 40


async def terminate_forever(database_url: str, rng: random.Random) -> int:
    """pg_terminate_backend on every consumer backend of this database, every 20-80 ms, until cancelled."""
    killed = 0
    conn = await asyncpg.connect(database_url)
    try:
        while True:
            killed += len(
                await conn.fetch(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name = 'modcache-consumer'"
                )
            )
            await asyncio.sleep(rng.uniform(0.02, 0.08))  # the fault's rhythm, not a wait for an event
    except asyncio.CancelledError:
        return killed
    finally:
        await conn.close()


async def test_terminated_backends_cost_no_execution_its_outcome_or_a_second_reply(harness: Any) -> None:
    workflow_id = await harness.workflow(ECHO)
    requests = [harness.request(workflow_id, {"n": n}) for n in range(EXECUTIONS)]
    async with harness.consumer() as running, replies_on(harness.settings.required("amqp_url")) as (replies, ch):
        terminator = asyncio.create_task(terminate_forever(harness.database_url, random.Random(10)))
        try:
            for request in requests:
                await publish(ch, harness.settings.queue_name, request, replies.queue_name)
            await replies.wait_for_count(EXECUTIONS, timeout_s=120)
        finally:
            terminator.cancel()
            killed = await terminator
        rows = await harness.wait_for_rows(
            "SELECT id, status, error, result FROM executions WHERE workflow_id = $1 AND replied_at IS NOT NULL",
            workflow_id,
            done=lambda rows: len(rows) == EXECUTIONS,
            timeout_s=60,
        )
        poisoned = running.metrics.poisoned._value.get()
    assert killed > 0
    assert sorted((r["status"], r["error"]) for r in rows) == [("SUCCESS", None)] * EXECUTIONS
    assert sorted(json.loads(r["result"]) for r in rows) == list(range(EXECUTIONS))
    assert poisoned == 0
    _assert_one_reply_each(replies, requests)


def _assert_one_reply_each(replies: Replies, requests: list[Any]) -> None:
    by_execution: dict[str, int] = {}
    for body in replies.bodies:
        with contextlib.suppress(KeyError, ValueError):
            key = json.loads(body)["execution_id"]
            by_execution[key] = by_execution.get(key, 0) + 1
    assert by_execution == {str(r.execution_id): 1 for r in requests}
