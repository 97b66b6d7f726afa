"""Faults on private servers (never the shared ones): PostgreSQL restarts under a running consumer, and the
broker drops the consumer's connection."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from modcache import db, embedded, engine, keys, pgsource, rediscache
from testkit.ledger import LEDGER
from testkit.polling import eventually


class PrivatePostgres:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = embedded.free_port()
        self.server: embedded.Server | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def start(self) -> None:
        self.server = await asyncio.to_thread(embedded.start_postgres, self.data_dir, port=self.port)

    async def stop(self) -> None:
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
            self.server = None


@pytest.fixture
async def private_pg(tmp_path: Path) -> AsyncIterator[PrivatePostgres]:
    server = PrivatePostgres(tmp_path / "pg" / "data")
    await server.start()
    await db.upgrade(server.url)
    yield server
    await server.stop()


@pytest.fixture
async def pg_harness(
    private_pg: PrivatePostgres,
    harness: Any,
    redis_url: str,
    keyspace: keys.KeySpace,
    redis_client: aioredis.Redis,
) -> AsyncIterator[Any]:
    """The usual harness, but on the private PostgreSQL."""
    source = pgsource.PgSource(engine=db.make_engine(private_pg.url))
    cache = rediscache.RedisCache.from_url(redis_url, keyspace=keyspace)
    settings = harness.settings.model_copy(update={"database_url": private_pg.url})
    on_private = type(harness)(
        settings=settings,
        database_url=private_pg.url,
        source=source,
        sync_engine=engine.Engine(source=source, cache=cache),
        redis_client=redis_client,
    )
    yield on_private
    await on_private.close()
    await cache.close()
    await source.close()


async def test_a_postgresql_restart_loses_no_message(pg_harness: Any, private_pg: PrivatePostgres) -> None:
    workflow_id = await pg_harness.workflow("def run(n):\n    return n\n")
    async with pg_harness.consumer(transient_retry_delay_s=0.2) as consumer:
        before = await pg_harness.call(workflow_id, {"n": 1})
        await private_pg.stop()
        caller = await pg_harness.caller()
        during = pg_harness.request(workflow_id, {"n": 2})
        await caller.publish(during)
        await eventually(lambda: "PostgreSQL unavailable at the last attempt" in consumer.readiness())
        await private_pg.start()
        recovered = await caller.result(during.execution_id, timeout_s=60)
        after = await pg_harness.call(workflow_id, {"n": 3})
        requeued = consumer.metrics.requeued._value.get()
        assert consumer.readiness() == []
    assert [r["result"] for r in (before, recovered, after)] == [1, 2, 3]
    assert requeued >= 1
    rows = await pg_harness.sql("SELECT status FROM executions")
    assert [r["status"] for r in rows] == ["SUCCESS"] * 3


def _broker_connection(vhost: str, name: str) -> str | None:
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "--no-table-headers", "list_connections", "-p", vhost, "pid", "client_properties"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return next((line.split("\t")[0] for line in listing.splitlines() if name in line), None)


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl to close a connection")
async def test_the_consumer_reconnects_when_the_broker_drops_its_connection(harness: Any, amqp_url: str) -> None:
    workflow_id = await harness.workflow("def run(n):\n    return n\n")
    vhost = urllib.parse.unquote(urllib.parse.urlsplit(amqp_url).path[1:]) or "/"
    async with harness.consumer(amqp_reconnect_interval_s=0.2) as consumer:
        before = await harness.call(workflow_id, {"n": 1})
        name = f"modcache-consumer {harness.settings.queue_name} "
        pid = await asyncio.to_thread(_broker_connection, vhost, name)
        assert pid is not None
        await asyncio.to_thread(
            subprocess.run, ["rabbitmqctl", "-q", "close_connection", pid, "test"], check=True, timeout=60
        )
        await eventually(lambda: consumer.metrics.broker_reconnects._value.get() == 1)
        assert consumer.readiness() == []
        after = await harness.call(workflow_id, {"n": 2})
        replaced = await asyncio.to_thread(_broker_connection, vhost, name)
    assert (before["result"], after["result"]) == (1, 2)
    assert replaced not in (None, pid)


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl to close a connection")
async def test_a_message_redelivered_while_it_still_runs_is_not_run_twice(harness: Any, amqp_url: str) -> None:
    code = (
        LEDGER + "import time\ndef run(url, key):\n    note(url, key, 'ran')\n    time.sleep(1.5)\n    return 'done'\n"
    )
    workflow_id = await harness.workflow(code)
    ledger = harness.ledger()
    vhost = urllib.parse.unquote(urllib.parse.urlsplit(amqp_url).path[1:]) or "/"
    async with harness.consumer(amqp_reconnect_interval_s=0.2) as consumer:
        caller = await harness.caller()
        request = harness.request(workflow_id, ledger.params)
        await caller.publish(request)
        await harness.wait_for_status(request.execution_id, "RUNNING")
        pid = await asyncio.to_thread(_broker_connection, vhost, f"modcache-consumer {harness.settings.queue_name} ")
        assert pid is not None
        await asyncio.to_thread(
            subprocess.run, ["rabbitmqctl", "-q", "close_connection", pid, "test"], check=True, timeout=60
        )
        reply = await caller.result(request.execution_id, timeout_s=30)
        await consumer.idle()  # the redelivery was settled too
    assert (reply["status"], reply["result"]) == ("SUCCESS", "done")
    assert await ledger.entries() == ["ran"]
