"""Fixtures for the consumer: a RabbitMQ vhost per session, unique queue names per test, and a harness.

RabbitMQ isolation: the session creates a vhost of its own with ``rabbitmqctl add_vhost`` (about 1.3 s, once)
and deletes it at the end, so nothing is left on the shared broker; inside it every test uses its own queue
name (and so its own dead-letter exchange and poison queue), deleted after the test. Without rabbitmqctl
(a remote broker), the default vhost is used with the same per-test names.

``harness`` bundles what consumer tests do: write workflows and modules, start consumers with small settings,
publish and await replies, read executions and pg_stat_activity.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aio_pika
import aio_pika.abc
import asyncpg
import pytest
import redis.asyncio as aioredis

from modcache import engine, keys, pgsource
from modcache_consumer import (
    amqp,
    consumer,
    crypto,
    database,
    executor,
    messages,
    protocol,
    readiness,
    serving,
    settings,
    workflows,
)
from testkit.ledger import Ledger


@pytest.fixture(scope="session")
def amqp_url(services: dict[str, str]) -> Iterator[str]:
    base = services["amqp"]
    vhost = f"modcache-test-{uuid.uuid4().hex[:8]}"
    if not _rabbitmqctl("add_vhost", vhost):
        yield base
        return
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, urllib.parse.urlsplit(base).username or "guest", ".*", ".*", ".*")
        yield _with_vhost(base, vhost)
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
async def queue_name(amqp_url: str) -> AsyncIterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}.workflow-executions"
    yield name
    await amqp.delete(amqp_url, amqp.Names.for_queue(name))


@pytest.fixture
def consumer_settings(
    database_url: str, redis_url: str, amqp_url: str, queue_name: str, keyspace: keys.KeySpace
) -> settings.ConsumerSettings:
    return test_settings(
        database_url=database_url, redis_url=redis_url, amqp_url=amqp_url, queue_name=queue_name, keyspace=keyspace
    )


def test_settings(
    *, database_url: str, redis_url: str, amqp_url: str, queue_name: str, keyspace: keys.KeySpace, **overrides: Any
) -> settings.ConsumerSettings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "amqp_url": amqp_url,
        "queue_name": queue_name,
        "key_prefix": keyspace.prefix,
        "cache_namespace": keyspace.prefix.removesuffix(keys.DEFAULT_PREFIX),
        "consumer_concurrency": 4,
        "drain_grace_s": 10.0,
        "terminate_grace_s": 1.0,
        "transient_retry_delay_s": 0.1,
        "worker_memory_limit_bytes": 512 * 1024**2,
        "health_host": "127.0.0.1",
        "health_port": 0,
        "secrets_key": "jXf5t0ZAmBKtAMlY0n0C4bqOpTq8bQ2kz9f8sJfQy3A=",
    }
    values.update(overrides)
    return settings.ConsumerSettings(**values)


test_settings.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


EXECUTIONS_CHANGED = "testkit_executions_changed"
#: A test-only trigger (idempotent): every write to ``executions`` is announced, so tests await rows, not poll.
ANNOUNCE_EXECUTIONS = f"""
CREATE OR REPLACE FUNCTION testkit_announce_execution() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('{EXECUTIONS_CHANGED}', NEW.id::text); RETURN NULL; END $$;
CREATE OR REPLACE TRIGGER testkit_announce_execution AFTER INSERT OR UPDATE ON executions
    FOR EACH ROW EXECUTE FUNCTION testkit_announce_execution();
"""


class Harness:
    """What a consumer test needs, wired to this test's database, key prefix and queue."""

    def __init__(
        self,
        *,
        settings: settings.ConsumerSettings,
        database_url: str,
        source: pgsource.PgSource,
        sync_engine: engine.Engine,
        redis_client: aioredis.Redis,
    ) -> None:
        self.settings = settings
        self.database_url = database_url
        self.source = source
        self.sync_engine = sync_engine
        self.redis = redis_client
        self.keyspace = settings.keyspace()
        self.database = database.Database(url=database_url, pool_size=2, application_name="modcache-test")
        self.workflows = workflows.Workflows(database=self.database)
        self._stack = contextlib.AsyncExitStack()
        self._caller: amqp.Caller | None = None
        self._caller_lock = asyncio.Lock()
        self._announcing = False  # the test trigger on executions is installed
        self._ledgers = False  # a ledger's workflows reach Redis: their consumer gives executions the host network

    async def close(self) -> None:
        await self._stack.aclose()
        await self.database.close()

    # -- writing the source of truth ----------------------------------------------------------------------

    async def workflow(self, code: str, *, function: str = "run", name: str | None = None, **options: Any) -> uuid.UUID:
        return await self.workflows.put(
            name or f"wf-{uuid.uuid4().hex[:8]}", code, function_name=function, path="workflows/test.py", **options
        )

    async def module(self, path: str, text: str, *, sync: bool = True) -> None:
        await self.source.put_module(path, text.encode())
        if sync:
            await self.sync_engine.apply_paths([path])

    async def converge(self) -> None:
        """A full sync with its status record, as the operator's watcher would leave it."""
        await self.sync_engine.full_resync()

    # -- running the consumer -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def consumer(self, **overrides: Any) -> AsyncIterator[consumer.WorkflowExecutionConsumer]:
        values = self.settings.model_dump()
        if self._ledgers:
            values["execution_network"] = "host"
        values.update(overrides)
        executor_environment = values.pop("executor_environment", None)
        the_settings = settings.ConsumerSettings(**values)
        async with consumer.WorkflowExecutionConsumer(
            settings=the_settings, executor_environment=executor_environment
        ) as running:
            yield running

    async def caller(self) -> amqp.Caller:
        async with self._caller_lock:
            if self._caller is None:
                connection = await aio_pika.connect(self.settings.required("amqp_url"))
                self._stack.push_async_callback(connection.close)
                caller = amqp.Caller(channel=await connection.channel(), names=self.names)
                await caller.start()
                self._caller = caller
        return self._caller

    @property
    def names(self) -> amqp.Names:
        return amqp.Names.for_queue(self.settings.queue_name)

    async def call(
        self,
        workflow_id: uuid.UUID,
        parameters: dict[str, Any] | None = None,
        *,
        organization_id: uuid.UUID | None = None,
        execution_id: uuid.UUID | None = None,
        timeout_s: float = 60.0,
    ) -> messages.RawReply:
        request = self.request(workflow_id, parameters, organization_id=organization_id, execution_id=execution_id)
        caller = await self.caller()
        await caller.publish(request)
        return await caller.result(request.execution_id, timeout_s=timeout_s)

    def request(
        self,
        workflow_id: uuid.UUID,
        parameters: dict[str, Any] | None = None,
        *,
        organization_id: uuid.UUID | None = None,
        execution_id: uuid.UUID | None = None,
    ) -> messages.ExecutionRequest:
        return messages.ExecutionRequest(
            execution_id=messages.ExecutionId(execution_id or uuid.uuid4()),
            workflow_id=messages.WorkflowId(workflow_id),
            organization_id=messages.OrganizationId(organization_id) if organization_id else None,
            parameters=parameters or {},
        )

    async def poisoned(self, count: int, *, timeout_s: float = 30.0) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """The next ``count`` messages of the poison queue (acknowledged), waiting for them."""
        connection = await aio_pika.connect(self.settings.required("amqp_url"))
        self._stack.push_async_callback(connection.close)
        channel = await connection.channel()
        queue = await channel.get_queue(self.names.poison)
        found: list[aio_pika.abc.AbstractIncomingMessage] = []
        async with asyncio.timeout(timeout_s), queue.iterator() as iterator:
            async for message in iterator:
                await message.ack()
                found.append(message)
                if len(found) == count:
                    break
        return found

    # -- reading state ------------------------------------------------------------------------------------

    def ledger(self) -> Ledger:
        """A Redis list workflows append to (executions cannot reach the test's files: their /tmp is private);
        consumers of this harness then give executions the host network (the default is none)."""
        self._ledgers = True
        return Ledger(self.redis, url=self.settings.required("redis_url"), key=f"{self.keyspace.prefix}ledger")

    async def sql(self, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.database_url)
        try:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args)
            return rows
        finally:
            await conn.close()

    async def execution(self, execution_id: uuid.UUID) -> asyncpg.Record | None:
        rows = await self.sql("SELECT * FROM executions WHERE id = $1", execution_id)
        return rows[0] if rows else None

    async def wait_for_status(self, execution_id: uuid.UUID, *statuses: str, timeout_s: float = 30.0) -> Any:
        """Until the executions row (another process writes it) reaches one of ``statuses``."""
        (row,) = await self.wait_for_rows(
            "SELECT * FROM executions WHERE id = $1",
            execution_id,
            done=lambda rows: bool(rows) and rows[0]["status"] in statuses,
            timeout_s=timeout_s,
        )
        return row

    async def wait_for_replied(self, execution_id: uuid.UUID, *, timeout_s: float = 30.0) -> None:
        """Until the consumer that replied marked the reply sent (nothing is owed any more)."""
        await self.wait_for_rows(
            "SELECT replied_at FROM executions WHERE id = $1",
            execution_id,
            done=lambda rows: bool(rows) and rows[0]["replied_at"] is not None,
            timeout_s=timeout_s,
        )

    async def wait_for_rows(
        self, query: str, *args: Any, done: Callable[[list[asyncpg.Record]], bool], timeout_s: float = 30.0
    ) -> list[asyncpg.Record]:
        """Run ``query`` again after every change of ``executions`` (announced by the test trigger, listened to
        before the first read, so no change falls in between) until ``done`` holds for its rows."""
        conn = await asyncpg.connect(self.database_url)
        changed = asyncio.Event()
        try:
            if not self._announcing:
                await conn.execute(ANNOUNCE_EXECUTIONS)
                self._announcing = True
            await conn.add_listener(EXECUTIONS_CHANGED, lambda *_: changed.set())
            async with asyncio.timeout(timeout_s):
                while True:
                    changed.clear()
                    rows: list[asyncpg.Record] = await conn.fetch(query, *args)
                    if done(rows):
                        return rows
                    await changed.wait()
        finally:
            await conn.close()

    async def backends(self, application_name: str = "modcache-consumer") -> list[asyncpg.Record]:
        name = self.database_url.rpartition("/")[2]
        return await self.sql(
            "SELECT pid, state, backend_start, xact_start FROM pg_stat_activity "
            "WHERE datname = $1 AND application_name = $2",
            name,
            application_name,
        )


@pytest.fixture
async def harness(
    consumer_settings: settings.ConsumerSettings,
    database_url: str,
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
) -> AsyncIterator[Harness]:
    h = Harness(
        settings=consumer_settings,
        database_url=database_url,
        source=source,
        sync_engine=sync_engine,
        redis_client=redis_client,
    )
    yield h
    await h.close()


class ExecutorHarness:
    """An executor on this test's key prefix, with module serving, repairs and readiness through the real engine."""

    def __init__(
        self, *, redis_client: aioredis.Redis, database_url: str, keyspace: keys.KeySpace, sync_engine: engine.Engine
    ) -> None:
        self.keyspace = keyspace
        self.sync_engine = sync_engine
        self.database = database.Database(url=database_url, pool_size=2, application_name="modcache-test-executor")
        self.guard = readiness.CacheGuard(engine=sync_engine, cache=sync_engine.cache, database=self.database)
        self.modules = serving.ModuleServer(client=redis_client, keyspace=keyspace, repair=self.guard.repair)
        self._stack = contextlib.AsyncExitStack()

    async def start(self, **options: Any) -> executor.Executor:
        limits = executor.Limits(
            memory_bytes=options.pop("memory_limit_bytes", 512 * 1024**2),
            max_result_bytes=options.pop("max_result_bytes", 1024**2),
            max_output_bytes=options.pop("max_output_bytes", 1024**2),
            processes=options.pop("processes", 64),
        )
        options = {"terminate_grace_s": 1.0, "teacher": self.modules, **options}
        the_executor = executor.Executor(limits=limits, **options)
        self._stack.push_async_callback(the_executor.close)
        await the_executor.start()
        return the_executor

    def job(
        self,
        code: str,
        parameters: dict[str, Any] | None = None,
        *,
        generation: int,
        function: str = "run",
        config: dict[str, Any] | None = None,
        organization: dict[str, Any] | None = None,
    ) -> protocol.Job:
        return {
            "op": "run",
            "execution_id": str(uuid.uuid4()),
            "workflow": {"name": "test", "path": "workflows/test.py", "code": code, "function_name": function},
            "parameters": parameters or {},
            "config": serving.withhold_secrets(config or {}),
            "organization": organization,
            "generation": generation,
        }

    async def run(
        self,
        the_executor: executor.Executor,
        code: str,
        parameters: dict[str, Any] | None = None,
        *,
        timeout_s: float = 30.0,
        function: str = "run",
        config: dict[str, Any] | None = None,
        secrets: crypto.Secrets | None = None,
    ) -> executor.Outcome:
        job = self.job(code, parameters, generation=await self.guard.check(), function=function, config=config)
        session = serving.Session(modules=self.modules, config=config or {}, secrets=secrets or crypto.Secrets([]))
        return await the_executor.run(job, timeout_s=timeout_s, session=session)

    async def close(self) -> None:
        await self._stack.aclose()
        await self.guard.close()
        await self.database.close()


@pytest.fixture
async def executors(
    redis_client: aioredis.Redis, database_url: str, keyspace: keys.KeySpace, sync_engine: engine.Engine
) -> AsyncIterator[ExecutorHarness]:
    h = ExecutorHarness(
        redis_client=redis_client, database_url=database_url, keyspace=keyspace, sync_engine=sync_engine
    )
    yield h
    await h.close()


def _rabbitmqctl(*args: str) -> bool:
    if shutil.which("rabbitmqctl") is None:
        return False
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, timeout=60, check=False)
    return done.returncode == 0


def _with_vhost(url: str, vhost: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(vhost, safe="")))
