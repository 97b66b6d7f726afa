"""The consumer end to end on real PostgreSQL, Redis and RabbitMQ: results, replies, poison, idempotent
redelivery, the session defects of bifrost-contract.md (5) and cache readiness on the hot path."""

from __future__ import annotations

import asyncio
import datetime
import json
import urllib.request
import uuid
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa

from modcache import keys
from modcache_consumer import amqp
from modcache_consumer import consumer as consumer_module
from testkit.ledger import LEDGER

ECHO = "def run(**params):\n    return params\n"


async def test_an_execution_is_recorded_and_replied(harness) -> None:
    workflow_id = await harness.workflow(ECHO, name="echo")
    async with harness.consumer():
        reply = await harness.call(workflow_id, {"n": 1, "s": ["x"]})
    assert reply["status"] == "SUCCESS"
    assert reply["result"] == {"n": 1, "s": ["x"]}
    row = await harness.execution(uuid.UUID(reply["execution_id"]))
    assert row["status"] == "SUCCESS"
    assert json.loads(row["result"]) == {"n": 1, "s": ["x"]}
    assert json.loads(row["parameters"]) == {"n": 1, "s": ["x"]}
    assert (row["workflow_id"], row["workflow_name"], row["error"]) == (workflow_id, "echo", None)
    assert row["started_at"] <= row["finished_at"]
    assert row["duration_ms"] == reply["duration_ms"] >= 0


async def test_start_opens_the_database_session_and_stop_closes_it(harness) -> None:
    assert await harness.backends() == []
    async with harness.consumer():
        assert [r["state"] for r in await harness.backends()] == ["idle"]
    assert await harness.backends() == []


async def test_get_db_session_gives_each_unit_its_own_session_and_ends_it(harness) -> None:
    async with harness.consumer() as consumer:

        async def unit() -> tuple[object, int]:
            async with consumer._get_db_session() as db:
                await db.execute(sa.text("SELECT pg_sleep(0.05)"))
                pid = (await db.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
                return db, pid

        (first, pid1), (second, pid2) = await asyncio.gather(unit(), unit())  # concurrently: never shared
        states = {r["pid"]: r["state"] for r in await harness.backends()}
    assert first is not second
    assert pid1 != pid2
    assert {states[pid1], states[pid2]} == {"idle"}  # both transactions ended with their block


async def test_a_malformed_message_is_poisoned_with_its_reason_and_the_consumer_carries_on(harness) -> None:
    workflow_id = await harness.workflow(ECHO)
    async with harness.consumer() as consumer:
        caller = await harness.caller()
        await caller.publish_raw(b"{not json")
        await caller.publish_raw(json.dumps({"execution_id": "x", "workflow_id": str(workflow_id)}).encode())
        poisoned = await harness.poisoned(2)
        reply = await harness.call(workflow_id, {"still": "alive"})
    assert [m.headers[keys.POISON_REASON_HEADER] for m in poisoned] == [
        "body is not JSON (Expecting property name enclosed in double quotes at line 1 column 2)",
        "execution_id: not a UUID",
    ]
    assert poisoned[0].body == b"{not json"
    assert reply["result"] == {"still": "alive"}
    assert consumer.metrics.poisoned._value.get() == 2


async def test_an_unknown_workflow_is_a_failed_execution(harness) -> None:
    unknown = uuid.uuid4()
    async with harness.consumer():
        reply = await harness.call(unknown)
    assert reply["status"] == "FAILED"
    assert reply["error"] == f"'{unknown}': no active workflow with this id"
    row = await harness.execution(uuid.UUID(reply["execution_id"]))
    assert (row["status"], row["error"], row["workflow_id"]) == ("FAILED", reply["error"], unknown)


async def test_an_internal_error_fails_the_execution_and_poisons_the_message_with_the_reason(harness) -> None:
    class Broken(consumer_module.WorkflowExecutionConsumer):  # a bug injected at our own seam
        async def prepare(self, request: Any) -> Any:
            raise LookupError("a bug")

    workflow_id = await harness.workflow(ECHO)
    request = harness.request(workflow_id)
    async with Broken(settings=harness.settings):
        await (await harness.caller()).publish(request, wait=False)
        (dead,) = await harness.poisoned(1)
    assert dead.headers[keys.POISON_REASON_HEADER] == "internal error: LookupError: a bug"
    row = await harness.wait_for_status(request.execution_id, "FAILED")
    assert row["error"] == "internal error: LookupError: a bug"


APPEND = LEDGER + "def run(url, key):\n    note(url, key, 'ran')\n    return 'done'\n"


async def test_redelivery_never_runs_a_finished_execution_again(harness) -> None:
    workflow_id = await harness.workflow(APPEND)
    ledger = harness.ledger()
    execution_id = uuid.uuid4()
    async with harness.consumer() as consumer:
        first = await harness.call(workflow_id, ledger.params, execution_id=execution_id)
        caller = await harness.caller()
        duplicate = harness.request(workflow_id, ledger.params, execution_id=execution_id)
        await caller.publish(duplicate)  # the first request again (same reply queue): its reply was sent already
        async with amqp.caller(harness.settings.required("amqp_url"), queue=harness.settings.queue_name) as other:
            request = harness.request(workflow_id, ledger.params, execution_id=execution_id)
            await other.publish(request)  # a new request for it: gets the stored outcome
            again = await other.result(execution_id, timeout_s=30)
        await consumer.idle()
        with pytest.raises(TimeoutError):
            await caller.result(execution_id, timeout_s=0.5)
    assert first["status"] == again["status"] == "SUCCESS", first["error"]
    assert again["result"] == "done"  # the stored outcome is replied
    assert await ledger.entries() == ["ran"]  # ...and the workflow ran once


#: The claim of a consumer that died (its lease expired a second ago), for the parameters ``$4`` (JSON).
DEAD_LEASE = (
    "INSERT INTO executions (id, workflow_id, status, started_at, lease_owner, lease_token, lease_expires_at, "
    "attempt, max_attempts, parameters) "
    "VALUES ($1, $2, 'RUNNING', now(), 'dead-consumer', 1, now() - interval '1 s', 1, $3, $4::jsonb)"
)


async def test_a_redelivered_run_whose_owner_died_is_retried_by_policy(harness) -> None:
    workflow_id = await harness.workflow(APPEND, retries_on_crash=1)
    ledger = harness.ledger()
    execution_id = uuid.uuid4()
    await harness.sql(DEAD_LEASE, execution_id, workflow_id, 2, json.dumps(ledger.params))
    async with harness.consumer():
        reply = await harness.call(workflow_id, ledger.params, execution_id=execution_id)
    assert reply["status"] == "SUCCESS"
    assert await ledger.entries() == ["ran"]
    row = await harness.execution(execution_id)
    assert (row["attempt"], row["lease_token"], row["lease_owner"]) == (2, 2, None)


async def test_a_redelivered_run_whose_owner_died_fails_by_default(harness) -> None:
    workflow_id = await harness.workflow(APPEND)
    ledger = harness.ledger()
    execution_id = uuid.uuid4()
    await harness.sql(DEAD_LEASE, execution_id, workflow_id, 1, json.dumps(ledger.params))
    async with harness.consumer():
        reply = await harness.call(workflow_id, ledger.params, execution_id=execution_id)
    assert (reply["status"], reply["error"]) == ("FAILED", "consumer died mid-run")
    assert await ledger.entries() == []  # not run again


async def test_a_redelivery_while_the_lease_is_live_is_acknowledged_and_not_run(harness) -> None:
    workflow_id = await harness.workflow(APPEND)
    ledger = harness.ledger()
    execution_id = uuid.uuid4()
    live = DEAD_LEASE.replace("now() - interval '1 s'", "now() + interval '1 min'")
    await harness.sql(live, execution_id, workflow_id, 1, json.dumps(ledger.params))
    async with harness.consumer() as consumer:
        caller = await harness.caller()
        await caller.publish(harness.request(workflow_id, ledger.params, execution_id=execution_id))
        other = {**ledger.params, "key": ledger.params["key"] + ":other"}
        after = await harness.call(workflow_id, other)  # its other work goes on
        await consumer.idle()
    assert after["status"] == "SUCCESS"
    assert await ledger.entries() == []
    assert (await harness.execution(execution_id))["status"] == "RUNNING"  # its owner's, until the sweep


async def test_twenty_concurrent_messages_are_all_recorded(harness) -> None:
    workflow_id = await harness.workflow("import time\ndef run(n):\n    time.sleep(0.1)\n    return n\n")
    async with harness.consumer(consumer_concurrency=5):
        replies = await asyncio.gather(*(harness.call(workflow_id, {"n": n}) for n in range(20)))
    assert sorted(r["result"] for r in replies) == list(range(20))
    assert {r["status"] for r in replies} == {"SUCCESS"}
    rows = await harness.sql("SELECT status, count(*) FROM executions GROUP BY status")
    assert [tuple(r) for r in rows] == [("SUCCESS", 20)]


async def test_prefetch_bounds_executions_in_flight_to_the_concurrency(harness) -> None:
    code = "import time\ndef run():\n    start = time.time()\n    time.sleep(0.3)\n    return [start, time.time()]\n"
    workflow_id = await harness.workflow(code)
    async with harness.consumer(consumer_concurrency=2):
        replies = await asyncio.gather(*(harness.call(workflow_id) for _ in range(6)))
    spans = [r["result"] for r in replies]
    overlap = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert overlap == 2  # the executor starts any number: only the prefetch of 2 held the rest back


async def test_pg_terminate_backend_between_messages_loses_nothing(harness) -> None:
    workflow_id = await harness.workflow(ECHO)
    async with harness.consumer() as consumer:
        first = await harness.call(workflow_id, {"n": 1})
        name = harness.database_url.rpartition("/")[2]
        killed = await harness.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
            name,
            "modcache-consumer",
        )
        second = await harness.call(workflow_id, {"n": 2})
        reconnects = consumer.metrics.db_reconnects._value.get()
    assert killed
    assert (first["status"], second["status"], second["result"]) == ("SUCCESS", "SUCCESS", {"n": 2})
    assert reconnects >= 1
    rows = await harness.sql("SELECT status FROM executions")
    assert [r["status"] for r in rows] == ["SUCCESS", "SUCCESS"]


async def test_an_idle_consumer_holds_no_transaction_and_never_blocks_a_migration(harness) -> None:
    workflow_id = await harness.workflow(ECHO)
    async with harness.consumer() as consumer:
        await asyncio.gather(*(harness.call(workflow_id, {"n": n}) for n in range(8)))
        await consumer.idle()  # replied, then marked so
        states = [(r["state"], r["xact_start"]) for r in await harness.backends()]
        conn = await asyncpg.connect(harness.database_url)
        try:
            await conn.execute("SET lock_timeout = '2s'")
            await conn.execute("ALTER TABLE workflows ADD COLUMN migrated_at timestamptz")  # needs an exclusive lock
        finally:
            await conn.close()
        after = await harness.call(workflow_id, {"n": "after the migration"})
    assert states
    assert set(states) == {("idle", None)}
    assert after["status"] == "SUCCESS"


async def test_backend_count_stays_flat_over_500_messages(harness) -> None:
    workflow_id = await harness.workflow("def run(n):\n    return n\n")
    async with harness.consumer(consumer_concurrency=4) as consumer:
        await asyncio.gather(*(harness.call(workflow_id, {"n": n}) for n in range(50)))  # warm-up
        warm = {(r["pid"], r["backend_start"]) for r in await harness.backends()}
        for start in range(0, 500, 100):
            replies = await asyncio.gather(*(harness.call(workflow_id, {"n": n}) for n in range(start, start + 100)))
            assert {r["status"] for r in replies} == {"SUCCESS"}
        after = {(r["pid"], r["backend_start"]) for r in await harness.backends()}
        # The pool may still grow to its size after the warm-up (it opens connections as concurrency needs
        # them), but never replaces one and never opens more than it holds: no churn in 550 messages.
        opened = consumer.metrics.db_connections._value.get()
    assert warm <= after
    assert len(after) <= 5  # pool_size = concurrency + 1
    assert opened == len(after)


async def test_partial_expiry_with_no_operator_running_still_imports(harness, redis_client: aioredis.Redis) -> None:
    await harness.module("modules/billing.py", "RATE = 3\n")
    await harness.converge()
    workflow_id = await harness.workflow("from modules.billing import RATE\ndef run(x):\n    return x * RATE\n")
    await redis_client.delete(harness.keyspace.content("modules/billing.py"))  # expired; the index survives
    async with harness.consumer() as consumer:
        reply = await harness.call(workflow_id, {"x": 2})
        repairs = consumer.metrics.cache_repairs.labels(kind="path")._value.get()
    assert (reply["status"], reply["result"]) == ("SUCCESS", 6), reply["error"]
    assert repairs == 1
    assert await redis_client.exists(harness.keyspace.content("modules/billing.py"))


async def test_a_lost_cache_is_converged_once_before_running(harness, redis_client: aioredis.Redis) -> None:
    await harness.module("modules/billing.py", "RATE = 3\n", sync=False)
    workflow_id = await harness.workflow("from modules.billing import RATE\ndef run():\n    return RATE\n")
    async with harness.consumer() as consumer:  # the cache was empty: start converged it
        assert consumer.metrics.cache_repairs.labels(kind="full")._value.get() == 1
        doomed = [k async for k in redis_client.scan_iter(match=f"{harness.keyspace.prefix}*")]
        await redis_client.delete(*doomed)  # FLUSH-like loss while running
        replies = await asyncio.gather(*(harness.call(workflow_id) for _ in range(5)))
        full = consumer.metrics.cache_repairs.labels(kind="full")._value.get()
    assert [r["result"] for r in replies] == [3] * 5
    assert full == 2  # five messages, one shared full resync


async def test_a_module_changed_between_two_executions_is_seen_by_the_second(harness) -> None:
    await harness.module("modules/billing.py", "RATE = 1\n")
    await harness.converge()
    workflow_id = await harness.workflow("import modules.billing\ndef run():\n    return modules.billing.RATE\n")
    async with harness.consumer():
        first = await harness.call(workflow_id)
        await harness.module("modules/billing.py", "RATE = 2\n")  # what the operator's watcher would write
        second = await harness.call(workflow_id)
    assert [first["result"], second["result"]] == [1, 2]


async def test_timeout_is_recorded(harness) -> None:
    workflow_id = await harness.workflow("import time\ndef run():\n    time.sleep(30)\n", timeout_seconds=1)
    async with harness.consumer():
        reply = await harness.call(workflow_id)
    assert reply["status"] == "TIMEOUT"
    assert reply["error"].startswith("the execution exceeded its 1 s timeout")
    assert (await harness.execution(uuid.UUID(reply["execution_id"])))["status"] == "TIMEOUT"


async def test_a_worker_crash_is_a_failed_execution_and_the_next_one_runs(harness) -> None:
    crash = await harness.workflow("import os\ndef run():\n    os._exit(7)\n")
    fine = await harness.workflow(ECHO)
    async with harness.consumer():
        crashed = await harness.call(crash)
        after = await harness.call(fine, {"ok": True})
    assert crashed["status"] == "FAILED"
    assert "exited with code 7 during the execution" in crashed["error"]
    assert after["result"] == {"ok": True}


async def test_a_syntax_error_in_a_module_fails_naming_the_module_path(harness) -> None:
    await harness.module("modules/broken.py", "def oops(:\n")
    await harness.converge()
    workflow_id = await harness.workflow("import modules.broken\ndef run():\n    return 1\n")
    async with harness.consumer():
        reply = await harness.call(workflow_id)
    assert reply["status"] == "FAILED"
    assert reply["error"].splitlines()[0] == "SyntaxError: invalid syntax (modules/broken.py, line 1)"
    row = await harness.execution(uuid.UUID(reply["execution_id"]))
    assert "modules/broken.py" in row["error"]


async def test_org_configs_and_secrets_reach_the_workflow(harness) -> None:
    code = (
        "def run(context):\n"
        "    return [context.organization['name'], context.get_config('region'), context.get_config('api_key')]\n"
    )
    workflow_id = await harness.workflow(code)
    async with harness.consumer() as consumer:
        org = await consumer.configs.put_organization("Acme")
        await consumer.configs.set_config("region", "eu")
        await consumer.configs.set_config("region", "us", organization_id=org)
        await consumer.configs.set_config("api_key", "hunter2", config_type="secret", organization_id=org)
        reply = await harness.call(workflow_id, organization_id=org)
        inactive = await consumer.configs.put_organization("Gone", is_active=False)
        refused = await harness.call(workflow_id, organization_id=inactive)
    assert reply["result"] == ["Acme", "us", "hunter2"]
    assert refused["status"] == "FAILED"
    assert refused["error"] == f"'{inactive}': the organization is inactive"


async def test_health_endpoints_and_metrics(harness) -> None:
    workflow_id = await harness.workflow(ECHO)
    async with harness.consumer(metrics_port=0) as consumer:
        await harness.call(workflow_id)
        await consumer.idle()  # replied, then marked so
        health = f"http://127.0.0.1:{consumer.health_port}"
        paths = [
            f"{health}/livez",
            f"{health}/healthz",
            f"{health}/readyz",
            f"http://127.0.0.1:{consumer.metrics_port}/metrics",
        ]
        live, healthz, ready, metrics = await asyncio.gather(*(asyncio.to_thread(_get, url) for url in paths))
    assert live == healthz == ready == (200, "ok\n")
    assert metrics[0] == 200
    assert 'modcache_executions_total{status="SUCCESS"} 1.0' in metrics[1]
    assert "modcache_execution_duration_seconds_count 1.0" in metrics[1]
    assert "modcache_executions_in_flight 0.0" in metrics[1]
    assert consumer.readiness() == ["not consuming", "RabbitMQ connection down", "executor unavailable"]


async def test_stop_drains_in_flight_executions(harness) -> None:
    workflow_id = await harness.workflow("import time\ndef run():\n    time.sleep(0.5)\n    return 'finished'\n")
    async with harness.consumer():
        caller = await harness.caller()
        request = harness.request(workflow_id)
        await caller.publish(request)
        await harness.wait_for_status(request.execution_id, "RUNNING")
    row = await harness.execution(request.execution_id)  # stop() returned only after it finished
    assert (row["status"], json.loads(row["result"])) == ("SUCCESS", "finished")
    assert (await caller.result(request.execution_id, timeout_s=5))["status"] == "SUCCESS"


async def test_an_execution_cut_off_by_the_grace_period_is_recovered_by_policy(harness) -> None:
    code = (
        LEDGER
        + "import time\ndef run(url, key, wait):\n    note(url, key, 'start')\n    time.sleep(wait)\n    return 'ok'\n"
    )
    workflow_id = await harness.workflow(code, retries_on_crash=1)
    ledger = harness.ledger()
    caller = await harness.caller()
    request = harness.request(workflow_id, {**ledger.params, "wait": 1.5})
    async with harness.consumer(drain_grace_s=0.2):
        await caller.publish(request)
        await ledger.wait_for(1)  # its code runs
    row = await harness.execution(request.execution_id)
    assert row["status"] == "RUNNING"  # not finished, not lost: its lease was released for the next sweep
    assert row["lease_expires_at"] <= datetime.datetime.now(datetime.UTC)
    async with harness.consumer(lease_sweep_interval_s=0.2):
        reply = await caller.result(request.execution_id, timeout_s=30)
    assert reply["status"] == "SUCCESS"
    assert await ledger.entries() == ["start", "start"]
    assert (await harness.execution(request.execution_id))["attempt"] == 2


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
