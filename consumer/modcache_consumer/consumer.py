"""``WorkflowExecutionConsumer``: the long-lived consumer of the durable ``workflow-executions`` queue.

Start order: the database (the persistent engine and pool), Redis, the executor (a warm template process
that clones a fresh, isolated process per execution), cache readiness, then the
broker (robust connection, prefetch = concurrency) and consuming; health last. ``stop`` runs it backwards:
stop consuming, drain in-flight executions within ``drain_grace_s`` (cancelling the rest: their messages are
redelivered), close the broker, the executor, Redis and finally the database.

Per message (``process_message``):

1. parse; a malformed message goes to the poison queue with the reason, and the consumer carries on;
2. one unit of work (``_get_db_session``: a session of its own, here in autocommit since its statements are
   independent and idempotent): the workflow, the organization and its configs (Redis first), and the claim of
   the execution (``executions.claim``; a finished execution is not run again, its stored outcome is replied);
3. ``_sync_module_cache``: the O(1) readiness check, which returns the generation the execution pins;
4. a fresh execution process runs it (``executor``), served modules and its own secrets over its private
   channel (``serving``; missing modules repaired on request, single-flight);
5. a second unit of work records the outcome; then the reply (if ``reply_to``) and the ack.

Every message is settled whatever happens while handling it (``_handle``): acknowledged, moved to the poison
queue with a reason header, or, for a service outage (TransientError), requeued after a pause. An unsettled
message would hold a prefetch slot until the connection closes, so an exception nobody expected (a bug, a
hostile body the pre-scan missed) poisons the message with ``internal error: ...`` and records the execution as
FAILED (best effort), so nothing stays RUNNING forever. A handler still running past ``handler_bound_s`` (a
wedged socket, a lost future) turns ``/livez`` to 503: only a restart frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aio_pika.abc
import aio_pika.exceptions
from sqlalchemy.ext.asyncio import AsyncSession

from modcache import engine, errors, pgsource, rediscache, wiring
from modcache_consumer import (
    amqp,
    configs,
    crypto,
    database,
    executions,
    executor,
    hardening,
    health,
    messages,
    metrics,
    protocol,
    readiness,
    serving,
    settings,
    workflows,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Everything an execution needs, read in the first unit of work."""

    workflow: workflows.WorkflowForExecution
    organization: configs.Organization | None
    config: configs.ConfigMap
    generation: int = 0  # of the module cache, pinned by the execution


class WorkflowExecutionConsumer:
    def __init__(
        self,
        *,
        settings: settings.ConsumerSettings,
        meters: metrics.Metrics | None = None,
        executor_environment: dict[str, str] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.metrics = meters or metrics.Metrics()
        self._executor_environment = executor_environment
        self._monotonic = monotonic
        self._names = amqp.Names.for_queue(settings.queue_name)
        self._stack = contextlib.AsyncExitStack()
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._started_at: dict[asyncio.Task[Any], float] = {}  # monotonic start of each in-flight handler
        self._limits = messages.Limits(
            max_bytes=settings.max_message_bytes,
            max_depth=settings.max_message_depth,
            max_number_digits=settings.max_message_number_digits,
        )
        self._running: dict[uuid.UUID, asyncio.Future[messages.Outcome]] = {}
        self._drained = asyncio.Event()
        self._drained.set()
        self._consuming = False
        self._db_ok = self._cache_ok = True
        self.health_port: int | None = None
        self.metrics_port: int | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._replies: aio_pika.abc.AbstractChannel | None = None
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bring everything up in order; on failure, whatever started is stopped again. First of all the
        process makes itself non-dumpable: its memory and environment hold every credential."""
        if not hardening.make_non_dumpable():
            log.warning("could not make the consumer non-dumpable (not Linux?): same-uid processes can read it")
        try:
            await self._start_storage()
            await self._start_executor()
            await self._sync_module_cache()
            await self._start_broker()
            await self._start_health()
        except BaseException:
            await self._stack.aclose()
            raise
        log.info("consuming %s (concurrency %d)", self._names.queue, self.settings.consumer_concurrency)

    async def stop(self) -> None:
        await self._stack.aclose()

    async def __aenter__(self) -> WorkflowExecutionConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _start_storage(self) -> None:
        s = self.settings
        self.database = database.Database(
            url=wiring.database_dsn(s, s.required("database_url")),
            pool_size=s.pool_size,
            pool_timeout_s=s.db_pool_timeout_s,
            ping_after_idle_s=s.db_ping_after_idle_s,
            observer=self.metrics,
        )
        self._stack.push_async_callback(self.database.close)
        await self.database.start()
        s.required("redis_url")
        self.redis, close_redis = wiring.make_redis(s)  # one node, a Sentinel's master or a Cluster
        self._stack.push_async_callback(close_redis)
        cache = rediscache.RedisCache(
            client=self.redis,
            keyspace=s.keyspace(),
            ttl_s=s.ttl_s,
            ttl_jitter_ratio=s.ttl_jitter_ratio,
            check_batch_size=s.check_batch_size,
        )
        source = pgsource.PgSource(engine=self.database.engine, max_module_bytes=s.max_module_bytes)
        sync_engine = engine.Engine(source=source, cache=cache, fetch_batch_size=s.fetch_batch_size)
        self.guard = readiness.CacheGuard(
            engine=sync_engine, cache=cache, database=self.database, observer=self.metrics
        )
        self._stack.push_async_callback(self.guard.close)
        self.workflows = workflows.Workflows(database=self.database)
        self.configs = configs.ConfigResolver(
            database=self.database,
            client=self.redis,
            secrets=crypto.Secrets(s.encryption_keys()),
            ttl_s=s.config_cache_ttl_s,
            namespace=s.cache_namespace,
        )

    async def _start_executor(self) -> None:
        s = self.settings
        self.modules = serving.ModuleServer(client=self.redis, keyspace=s.keyspace(), repair=self.guard.repair)
        self.secrets = crypto.Secrets(s.encryption_keys())
        self.executor = executor.Executor(
            socket_path=s.executor_socket,
            limits=executor.Limits(
                memory_bytes=s.worker_memory_limit_bytes,
                processes=s.execution_max_processes,
                file_bytes=s.execution_max_file_bytes,
                tmp_bytes=s.execution_tmp_bytes,
                max_result_bytes=s.max_result_bytes,
                max_output_bytes=s.max_output_bytes,
            ),
            terminate_grace_s=s.terminate_grace_s,
            start_timeout_s=s.worker_start_timeout_s,
            uid_base=s.execution_uid_base,
            allow_shared_uid=s.executor_allow_shared_uid,
            execution_network=s.execution_network,
            environment=self._executor_environment,
            teacher=self.modules,
            observer=self.metrics,
        )
        self._stack.push_async_callback(self.executor.close)
        await self.executor.start()

    async def _start_broker(self) -> None:
        s = self.settings
        self._connection = await amqp.connect(
            s.required("amqp_url"),
            name=f"modcache-consumer {s.queue_name} {os.getpid()}",
            reconnect_interval_s=s.amqp_reconnect_interval_s,
        )
        self._stack.push_async_callback(self._connection.close)
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        self._channel = await self._connection.channel()
        self._replies = await self._connection.channel(publisher_confirms=False)  # best effort: never waits
        await self._channel.set_qos(prefetch_count=self.settings.consumer_concurrency)
        queue = await amqp.declare(self._channel, self._names)
        tag = await queue.consume(self._on_message)
        self._consuming = True
        self._stack.push_async_callback(self._stop_consuming, queue, tag)

    def _on_reconnect(self, *_: object) -> None:
        log.warning("reconnected to RabbitMQ; consuming %s again", self._names.queue)
        self.metrics.broker_reconnects.inc()

    async def _start_health(self) -> None:
        s = self.settings
        if s.health_port is not None:
            self.health_port = await self._serve_http(s.health_port)
        if s.metrics_port is not None and (s.metrics_port == 0 or s.metrics_port != s.health_port):
            self.metrics_port = await self._serve_http(s.metrics_port)  # 0 twice: two listeners on free ports
        else:
            self.metrics_port = self.health_port

    async def _serve_http(self, port: int) -> int:
        server = health.HealthServer(
            host=self.settings.health_host,
            port=port,
            live=self.liveness,
            ready=self.readiness,
            metrics=self.metrics.exposition,
        )
        bound = await server.start()
        self._stack.push_async_callback(server.close)
        return bound

    async def _stop_consuming(self, queue: aio_pika.abc.AbstractQueue, tag: str) -> None:
        """Stop taking messages, then give in-flight ones ``drain_grace_s`` before cancelling them."""
        self._consuming = False
        with contextlib.suppress(OSError, aio_pika.exceptions.AMQPError, RuntimeError):
            await queue.cancel(tag)
        try:
            await asyncio.wait_for(self._drained.wait(), self.settings.drain_grace_s)
        except TimeoutError:
            log.warning(
                "%d execution(s) still running after the grace period; they will be redelivered", len(self._in_flight)
            )
            for task in list(self._in_flight):
                task.cancel()
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    # -- health ---------------------------------------------------------------------------------------------

    def liveness(self) -> list[str]:
        """Answering at all proves the event loop runs, and every service failure is retried, not fatal; but a
        handler running past ``handler_bound_s`` is wedged (every legitimate wait has a shorter timeout) and
        holds its prefetch slot until Kubernetes restarts the consumer."""
        if not self._started_at:
            return []
        running_s = self._monotonic() - min(self._started_at.values())
        bound_s = self.settings.handler_bound_s
        if running_s <= bound_s:
            return []
        return [
            f"a message handler has been running for {running_s:.0f} s, longer than {bound_s:.0f} s "
            "(MODCACHE_HANDLER_STUCK_AFTER_S)"
        ]

    def readiness(self) -> list[str]:
        problems = []
        if not self._consuming:
            problems.append("not consuming")
        if self._connection is None or not self._connection.connected.is_set():
            problems.append("RabbitMQ connection down")
        if not self._db_ok:
            problems.append("PostgreSQL unavailable at the last attempt")
        if not self._cache_ok:
            problems.append("module cache unavailable at the last attempt")
        return problems

    # -- the original plan's names -----------------------------------------------------------------------------------

    @asynccontextmanager
    async def _get_db_session(self) -> AsyncIterator[AsyncSession]:
        """A unit of work on the persistent engine: a session of its own, one transaction, ended on exit."""
        async with self.database.session() as db:
            yield db

    async def _sync_module_cache(self) -> int:
        """O(1) cache readiness (generation + sync marker), converging only if the cache was lost; returns the
        generation executions pin. Not a per-message full sync: see ``readiness``."""
        try:
            generation = await self.guard.check()
        except errors.TransientError:
            self._cache_ok = False
            raise
        self._cache_ok = True
        return generation

    # -- messages -------------------------------------------------------------------------------------------

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        """Hand the message to a task of our own: aio-pika cancels its callback tasks when the connection
        drops, and an execution must not die with the connection (its outcome is still recorded)."""
        task = asyncio.create_task(self._handle(message))
        self._in_flight.add(task)
        self._started_at[task] = self._monotonic()
        self._drained.clear()
        self.metrics.in_flight.inc()
        task.add_done_callback(self._handled)

    def _handled(self, task: asyncio.Task[None]) -> None:
        self.metrics.in_flight.dec()
        self._in_flight.discard(task)
        self._started_at.pop(task, None)
        if not self._in_flight:
            self._drained.set()
        if not task.cancelled() and task.exception() is not None:  # _handle settles everything: a bug if here
            log.error("a message handler failed", exc_info=task.exception())

    async def _handle(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        """Settle ``message`` whatever happens. Cancellation (drain) leaves it unsettled on purpose: the broker
        redelivers it when the channel closes."""
        try:
            await self._handle_settling(message)
        except Exception as e:
            if message.processed:  # settled already; what failed came after (nothing left to do for it)
                log.exception("message %s: failure after it was settled", message.message_id or "-")
                return
            log.exception("message %s: unexpected failure; poisoning it", message.message_id or "-")
            await self._poison(message, f"internal error: {errors.describe(e)}")

    async def _handle_settling(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            request = messages.parse(
                message.body, reply_to=message.reply_to, correlation_id=message.correlation_id, limits=self._limits
            )
        except messages.Malformed as e:
            await self._poison(message, e.reason)
            return
        try:
            outcome = await self.process_message(request)
        except errors.TransientError as e:
            log.warning("execution %s postponed: %s", request.execution_id, e)
            await asyncio.sleep(self.settings.transient_retry_delay_s)
            self.metrics.requeued.inc()
            await _settle(message.nack(requeue=True))
            return
        except Exception as e:
            log.exception("execution %s: unexpected failure; poisoning its message", request.execution_id)
            await self._record_internal_error(request, e)
            await self._poison(message, f"internal error: {errors.describe(e)}")
            return
        if request.reply_to:
            assert self._replies is not None
            body = json.dumps(outcome.reply(request.execution_id)).encode()
            await amqp.reply(self._replies, request.reply_to, request.correlation_id, body)
        await _settle(message.ack())

    async def _record_internal_error(self, request: messages.ExecutionRequest, error: Exception) -> None:
        outcome = messages.Outcome(messages.Status.FAILED, error=f"internal error: {errors.describe(error)}")
        try:
            await self.record(request, outcome)
        except Exception as e:  # the database may be the problem: the dead-lettered message still tells
            log.warning("execution %s: could not record the failure: %s", request.execution_id, errors.describe(e))

    async def _poison(self, message: aio_pika.abc.AbstractIncomingMessage, reason: str) -> None:
        """Move ``message`` to the poison queue with ``reason``; if that fails, dead-letter it (same queue, via
        the DLX, without the reason header): either way its prefetch slot is freed."""
        log.warning("message %s moved to %s: %s", message.message_id or "-", self._names.poison, reason)
        self.metrics.poisoned.inc()
        assert self._channel is not None
        try:
            await amqp.poison(self._channel, self._names, message, reason)
        except Exception as e:  # whatever broke the republish, the reject below still settles
            log.warning("could not republish to the poison queue (%s); dead-lettering instead", errors.describe(e))
            await _settle(message.reject(requeue=False))
            return
        await _settle(message.ack())

    async def process_message(self, request: messages.ExecutionRequest) -> messages.Outcome:
        """Run one execution end to end; returns the outcome stored for it (which may be an earlier one).

        A redelivery of an execution this consumer is still running (the broker connection dropped and the
        unacknowledged message came back) waits for that run instead of starting a second one.
        """
        running = self._running.get(request.execution_id)
        if running is not None:
            log.info("execution %s is already running here; waiting for it", request.execution_id)
            return await asyncio.shield(running)
        done: asyncio.Future[messages.Outcome] = asyncio.get_running_loop().create_future()
        self._running[request.execution_id] = done
        try:
            outcome = await self._process(request)
        except BaseException as e:
            done.set_exception(e if isinstance(e, Exception) else errors.TransientError("interrupted"))
            done.exception()  # retrieved: a waiter, if any, gets it too
            raise
        finally:
            del self._running[request.execution_id]
        done.set_result(outcome)
        return outcome

    async def _process(self, request: messages.ExecutionRequest) -> messages.Outcome:
        prepared = await self.prepare(request)
        if isinstance(prepared, executions.Record):
            return prepared.outcome  # finished already (redelivery) or failed before running
        outcome = await self._execute(request, prepared)
        self.metrics.executions.labels(status=outcome.status.value).inc()
        return await self.record(request, outcome)

    async def prepare(self, request: messages.ExecutionRequest) -> Prepared | executions.Record:
        """Everything before the execution: the first unit of work, then the O(1) cache readiness check."""
        prepared = await self._unit(lambda db: self._prepare(db, request))
        if isinstance(prepared, executions.Record):
            return prepared
        return dataclasses.replace(prepared, generation=await self._sync_module_cache())

    async def record(self, request: messages.ExecutionRequest, outcome: messages.Outcome) -> messages.Outcome:
        """The second unit of work: store ``outcome`` unless one is stored already; returns the stored one."""
        stored = await self._unit(lambda db: executions.finish(db, request, outcome))
        return stored.outcome

    async def _prepare(self, db: AsyncSession, request: messages.ExecutionRequest) -> Prepared | executions.Record:
        try:
            workflow = await self.workflows.get_workflow_for_execution(request.workflow_id, db=db)
            organization = await self._organization(db, request, workflow)
            if workflow.code is None:
                raise errors.InputError(workflow.name, "the workflow has no code")
        except errors.InputError as e:
            outcome = messages.Outcome(messages.Status.FAILED, error=str(e), duration_ms=0)
            self.metrics.executions.labels(status=outcome.status.value).inc()
            return await executions.finish(db, request, outcome)
        org_id = organization.id if organization else None
        finished = await executions.claim(db, request, workflow_name=workflow.name, organization_id=org_id)
        if finished is not None:
            log.info("execution %s already %s; not running it again", request.execution_id, finished.status.value)
            return finished
        scope = configs.GLOBAL if organization is None else f"ORG:{organization.id}"
        config = await self.configs.load_config_for_scope(scope, db=db)
        return Prepared(workflow=workflow, organization=organization, config=config)

    async def _organization(
        self, db: AsyncSession, request: messages.ExecutionRequest, workflow: workflows.WorkflowForExecution
    ) -> configs.Organization | None:
        owner, asked = workflow.organization_id, request.organization_id
        if owner is not None and asked is not None and owner != asked:
            raise errors.InputError(workflow.name, "the workflow belongs to another organization")
        org_id = asked or owner
        if org_id is None:
            return None
        organization = await self.configs.get_organization(org_id, db=db)
        if organization is None:
            raise errors.InputError(str(org_id), "no such organization")
        if not organization.is_active:
            raise errors.InputError(str(org_id), "the organization is inactive")
        return organization

    async def _execute(self, request: messages.ExecutionRequest, prepared: Prepared) -> messages.Outcome:
        workflow = prepared.workflow
        assert workflow.code is not None
        job: protocol.Job = {
            "op": "run",
            "execution_id": str(request.execution_id),
            "workflow": {
                "name": workflow.name,
                "path": workflow.path,
                "code": workflow.code,
                "function_name": workflow.function_name,
            },
            "parameters": request.parameters,
            "config": serving.withhold_secrets(prepared.config),
            "organization": prepared.organization.to_raw() if prepared.organization else None,
            "generation": prepared.generation,
        }
        timeout_s = min(float(workflow.timeout_seconds), self.settings.execution_timeout_s)
        started = self._monotonic()
        session = serving.Session(modules=self.modules, config=prepared.config, secrets=self.secrets)
        result = await self.executor.run(job, timeout_s=timeout_s, session=session)
        elapsed_s = self._monotonic() - started
        self.metrics.duration.observe(elapsed_s)
        return messages.Outcome(
            status=result.status, result=result.result, error=result.error, duration_ms=round(elapsed_s * 1000)
        )

    async def _unit(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        try:
            result = await self.database.run(work, autocommit=True)
        except errors.SourceUnavailable:
            self._db_ok = False
            raise
        self._db_ok = True
        return result


async def _settle(settling: Any) -> None:
    """Ack/nack/reject; if the channel died meanwhile, the broker redelivers and claims make that safe."""
    try:
        await settling
    except (OSError, aio_pika.exceptions.AMQPError, RuntimeError) as e:
        log.warning("could not settle a message (it will be redelivered): %s", errors.describe(e))
