"""``WorkflowExecutionConsumer``: the long-lived consumer of the durable ``workflow-executions`` queue.

Start order: the database (the persistent engine and pool), Redis, the executor (a warm template process
that clones a fresh, isolated process per execution), cache readiness, then the
broker (robust connection, prefetch = concurrency) and consuming; health last. ``stop`` runs it backwards:
stop consuming, drain in-flight executions within ``drain_grace_s`` (cancelling the rest and releasing their
leases: the next sweep applies their crash policy), stop the lease tasks, close the broker, the executor,
Redis and finally the database.

Per message (``_handle`` -> ``_deliver``; docs/consumer.md has the why):

1. parse; a malformed message goes to the poison queue with the reason, and the consumer carries on;
2. ``read_ahead``, read-only, so it may run while both executors are still busy with earlier messages: one unit
   of work (``_get_db_session``: a session of its own, here in autocommit since its statements are independent
   and idempotent) reads the workflow, the organization and its configs (Redis first); then
   ``_sync_module_cache``, the O(1) readiness check, which returns the generation the execution pins;
3. an execution slot (a message waiting longer than ``delivery_hold_s`` for one is requeued; what was read for
   it is read again if the wait took longer than ``READ_AHEAD_FRESH_S``), then the claim
   (``executions.claim``): a lease for this consumer, or the finished record (replied from storage, never run
   again), or Busy (someone holds a live lease: acknowledged, its owner replies);
4. the ack: PostgreSQL owns the execution from here on (``leases`` renews it; a crash is recovered by the sweep
   according to the workflow's policy, never by a redelivery, and never by the broker's ``consumer_timeout``);
5. a fresh execution process runs it (``_execute`` -> ``executor``), served modules and its own secrets over
   its private channel (``serving``); stopped if the lease is lost;
6. the execution slot is freed (the next message's run can start); the outcome, fenced by the lease token and
   group-committed; the reply (confirmed, retried through a broker restart); the "replied" mark, which ends
   the lease.

Every message is settled whatever happens while handling it (``_handle``): acknowledged, moved to the poison
queue with a reason header, or, for a service outage (TransientError), requeued after a pause. An unsettled
message would hold a prefetch slot until the connection closes, so an exception nobody expected (a bug, a
hostile body the pre-scan missed) poisons the message with ``internal error: ...`` and records the execution as
FAILED (best effort), so nothing stays RUNNING forever. A handler still running past ``handler_bound_s`` (a
wedged socket, a lost future) turns ``/livez`` to 503: only a restart frees its slot.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions
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
    headerguard,
    health,
    leases,
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

#: The AMQP client failing this often within the window (not the broker going away: the client itself, on what it
#: was sent) fails /livez: something it cannot decode keeps coming back, and the queue is stalled.
CLIENT_FAILURES_LIMIT = 3
CLIENT_FAILURES_WINDOW_S = 300.0

#: What ``read_ahead`` read for a message is used only if its slot became free within this (else read again).
READ_AHEAD_FRESH_S = 1.0


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Everything an execution needs, read in the first unit of work."""

    workflow: workflows.WorkflowForExecution
    organization: configs.Organization | None
    config: configs.ConfigMap
    generation: int = 0  # of the module cache, pinned by the execution
    attempt: int = 1  # which run of the execution this is (retries by crash policy count up)


@dataclasses.dataclass(frozen=True)
class Admitted:
    """An execution this consumer claimed: its lease (renewed while it runs) and what the executor needs."""

    lease: executions.Lease
    prepared: Prepared
    lease_until: float = math.inf  # leases.clock(): the lease is surely valid until then


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
        self._owed: set[asyncio.Task[None]] = set()  # replies a sweep took over, sent beside the sweep loop
        self._terms = executions.Terms(
            owner=executions.Owner(f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"),
            lease_s=settings.lease_ttl_s,
            unowned_s=settings.execution_timeout_s + settings.terminate_grace_s + settings.lease_ttl_s,
        )
        self._slots = asyncio.Semaphore(settings.consumer_concurrency)
        self._ahead: dict[uuid.UUID, Prepared] = {}  # read_ahead's result for a message that got its slot
        # Claimed or running here (a second delivery must not claim again) -> set once that handling has ended.
        self._mine: dict[uuid.UUID, asyncio.Event] = {}
        # being prepared here: a second delivery meanwhile waits for that one's decision (a finished execution's
        # stored outcome is still owed to a new caller: it must not be taken for Busy)
        self._preparing: dict[uuid.UUID, asyncio.Future[None]] = {}
        self._runs: dict[uuid.UUID, asyncio.Task[messages.Outcome | None]] = {}  # leased runs: cancelled if lost
        self._lost: set[uuid.UUID] = set()  # runs cancelled because their lease was lost
        self._replying: set[uuid.UUID] = set()  # replies being sent (a duplicate delivery must not send another)
        self._started_at: dict[asyncio.Task[Any], float] = {}  # monotonic start of each in-flight handler
        self._client_failures: collections.deque[tuple[float, str]] = collections.deque(maxlen=CLIENT_FAILURES_LIMIT)
        self._limits = messages.Limits(
            max_bytes=settings.max_message_bytes,
            max_depth=settings.max_message_depth,
            max_number_digits=settings.max_message_number_digits,
        )
        self._drained = asyncio.Event()
        self._drained.set()
        self._consuming = False
        self._db_ok = self._cache_ok = True
        self.health_port: int | None = None
        self.metrics_port: int | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._replies: aio_pika.abc.AbstractChannel | None = None
        self._direct_replies: amqp.DirectReplies | None = None  # replies to direct reply-to addresses
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
            command_timeout_s=s.db_command_timeout_s,
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
            policy=executor.Policy(
                allow_shared_uid=s.executor_allow_shared_uid,
                network=s.execution_network,
                max_timeout_s=s.execution_timeout_s,
            ),
            environment=self._executor_environment,
            teacher=self.modules,
            observer=self.metrics,
        )
        self._stack.push_async_callback(self.executor.close)
        await self.executor.start()
        watch = asyncio.create_task(self._watch_executor())
        self._stack.push_async_callback(_finish, watch)

    async def _watch_executor(self) -> None:
        """Connect to the executor again (restart it, in child mode) as soon as it is lost, so that readiness and
        the check before each claim see it back without waiting for a message to try."""
        while True:
            await self.executor.lost()
            # shielded: a stop that cancels this task lets a connection being made finish (executor.close,
            # which waits for it, then closes it), instead of leaving its socket and child half-made
            connecting = asyncio.ensure_future(self.executor.connect())
            connecting.add_done_callback(_retrieve)
            try:
                await asyncio.shield(connecting)
            except errors.TransientError as e:
                log.warning("the executor is unavailable: %s", e)
                await asyncio.sleep(max(self.settings.transient_retry_delay_s, 0.1))

    async def _start_broker(self) -> None:
        s = self.settings
        self._connection = await amqp.connect(
            s.required("amqp_url"),
            name=f"modcache-consumer {s.queue_name} {os.getpid()}",
            reconnect_interval_s=s.amqp_reconnect_interval_s,
            heartbeat_s=s.amqp_heartbeat_s,
        )
        self._stack.push_async_callback(self._connection.close)
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        self._connection.close_callbacks.add(self._on_connection_lost)
        self._channel = await self._connection.channel()
        self._replies = await self._connection.channel()  # confirmed: a reply counts as sent once the broker has it
        self._direct_replies = amqp.DirectReplies(
            s.required("amqp_url"), name=f"modcache-consumer replies {os.getpid()}"
        )
        self._stack.push_async_callback(self._direct_replies.close)
        await self._channel.set_qos(prefetch_count=self.settings.consumer_concurrency)
        queue = await amqp.declare(self._channel, self._names)
        self.leases = leases.Leases(
            database=self.database,
            terms=self._terms,
            renew_interval_s=s.lease_renew_interval_s,
            sweep_interval_s=s.lease_sweep_interval_s,
            on_recovered=self._on_recovered,
            on_lost=self._lease_lost,
            on_renewed=self._lease_renewed,
        )
        self._stack.push_async_callback(self.leases.close)  # after the drain below (the stack unwinds backwards)
        self.leases.start()
        tag = await queue.consume(self._on_message)
        self._consuming = True
        self._stack.push_async_callback(self._stop_consuming, queue, tag)

    def _on_reconnect(self, *_: object) -> None:
        log.warning("reconnected to RabbitMQ; consuming %s again", self._names.queue)
        self.metrics.broker_reconnects.inc()

    def _on_connection_lost(self, _: object, exc: BaseException | None = None) -> None:
        """A connection the client itself gave up (its reader failed on a frame), not one the broker or we
        closed: counted for ``liveness``."""
        if exc is None or isinstance(exc, OSError | asyncio.CancelledError | aiormq.exceptions.AMQPConnectionError):
            return
        self._client_failures.append((self._monotonic(), errors.describe(exc)))
        self.client_failed()

    def client_failed(self) -> None:
        """The AMQP client failed on what it was sent (a seam for tests)."""

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
                "%d execution(s) still running after the grace period; their leases are released for recovery",
                len(self._in_flight),
            )
            for task in list(self._in_flight):
                task.cancel()
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        for owed in list(self._owed):  # their leases are released below: a sweep elsewhere sends them
            owed.cancel()
        await asyncio.gather(*self._owed, return_exceptions=True)
        try:  # what is still leased here was cut off: expire it now, so the next sweep applies its policy
            await self.leases.release()
        except Exception as e:
            log.warning("could not release the leases of cut-off executions (they expire by themselves): %s", e)

    # -- health ---------------------------------------------------------------------------------------------

    def liveness(self) -> list[str]:
        """Answering at all proves the event loop runs, and every service failure is retried, not fatal; but a
        handler running past ``handler_bound_s`` is wedged (every legitimate wait has a shorter timeout) and
        holds its prefetch slot until Kubernetes restarts the consumer; and an AMQP client that keeps failing on
        what the broker sends it (its reader dies on the same redelivered message, over and over) stalls the
        queue: a restart at least makes that loud."""
        problems = []
        if self._started_at:
            running_s = self._monotonic() - min(self._started_at.values())
            bound_s = self.settings.handler_bound_s
            if running_s > bound_s:
                problems.append(
                    f"a message handler has been running for {running_s:.0f} s, longer than {bound_s:.0f} s "
                    "(MODCACHE_HANDLER_STUCK_AFTER_S)"
                )
        failures = self._client_failures
        if len(failures) == CLIENT_FAILURES_LIMIT and self._monotonic() - failures[0][0] <= CLIENT_FAILURES_WINDOW_S:
            problems.append(
                f"the AMQP client failed {len(failures)} times within {CLIENT_FAILURES_WINDOW_S:.0f} s on what "
                f"the broker sent (last: {failures[-1][1]}); a message it cannot decode stalls the queue"
            )
        return problems

    async def idle(self) -> None:
        """Until no message is in hand: every delivery received so far is settled and its handler done."""
        await self._drained.wait()

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
        if not self.executor.available:
            problems.append("executor unavailable")
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
        undecodable = headerguard.reason(message.headers)
        if undecodable is not None:  # the client salvaged the frame; its properties are gone
            await self._poison(message, undecodable)
            return
        try:
            request = messages.parse(
                message.body, reply_to=message.reply_to, correlation_id=message.correlation_id, limits=self._limits
            )
        except messages.Malformed as e:
            await self._poison(message, e.reason)
            return
        await self._deliver(message, request)

    async def _deliver(self, message: aio_pika.abc.AbstractIncomingMessage, request: messages.ExecutionRequest) -> None:
        """Admit ``request`` (``_admit``), then run it or answer it from storage. A message that waits too long
        for an execution slot goes back to the queue (a waiting message is unacknowledged, so the broker's
        ``consumer_timeout`` runs for it)."""
        slot = _Slot(self._slots)
        try:
            try:
                admitted = await self._admit(request, slot)
            except _NoSlot:
                self.metrics.requeued.inc()
                await _settle(message.nack(requeue=True))
                return
            except errors.TransientError as e:
                log.warning("execution %s postponed: %s", request.execution_id, e)
                await asyncio.sleep(self.settings.transient_retry_delay_s)
                self.metrics.requeued.inc()
                await _settle(message.nack(requeue=True))
                return
            except executions.Foreign as e:  # another execution's id: its row is left alone, nothing is replied
                await self._poison(message, str(e))
                return
            except Exception as e:
                log.exception("execution %s: unexpected failure; poisoning its message", request.execution_id)
                await self._record_internal_error(request, e)
                await self._poison(message, f"internal error: {errors.describe(e)}")
                return
            await self._run_or_answer(message, request, admitted, slot)
        finally:
            slot.release()

    async def _admit(
        self, request: messages.ExecutionRequest, slot: _Slot
    ) -> Admitted | executions.Record | executions.Busy:
        """Read what the execution needs (read-only: no claim yet) while the executors may still be busy with
        earlier messages, then wait for a slot and claim. What was read while waiting longer than
        ``READ_AHEAD_FRESH_S`` is read again (a workflow changed meanwhile shows at once)."""
        ahead = await self.read_ahead(request)
        if not isinstance(ahead, Prepared):
            return ahead
        waited_s = await slot.acquire(self.settings.delivery_hold_s)
        if waited_s <= READ_AHEAD_FRESH_S:
            self._ahead[request.execution_id] = ahead  # prepare takes it (and drops it whatever happens)
        try:
            return await self.prepare(request)
        finally:
            self._ahead.pop(request.execution_id, None)

    async def _run_or_answer(
        self,
        message: aio_pika.abc.AbstractIncomingMessage,
        request: messages.ExecutionRequest,
        admitted: Admitted | executions.Record | executions.Busy,
        slot: _Slot,
    ) -> None:
        if isinstance(admitted, Admitted):
            # PostgreSQL owns the execution from here on (its lease): the broker's consumer_timeout no longer
            # matters, and a crash from now on is recovered by the sweep, by policy, not by a redelivery. The
            # ack goes out while the run starts (nothing waits for it: a lost ack only means a redelivery, which
            # the claim answers).
            acked = asyncio.ensure_future(_settle(message.ack()))
            try:
                await self._run_leased(request, admitted, slot)
            finally:
                await acked
            return
        slot.release()  # nothing runs
        if isinstance(admitted, executions.Busy):
            log.info("execution %s runs under a live lease; its owner replies", request.execution_id)
            if request.reply_to and not await self._wait_for_outcome(request):  # another caller (a retry with a
                self.metrics.requeued.inc()  # new reply queue) is answered with the same outcome, or tries again
                await _settle(message.nack(requeue=True))
                return
        elif admitted.leased and not admitted.answers(request):  # another caller: the stored outcome
            await self._send_reply(request, admitted.outcome)
        elif admitted.leased:  # finished, its reply owed by the lease holder
            if admitted.owner == self._terms.owner and request.execution_id not in self._replying:
                await self._reply_owed(request, admitted.outcome)  # recorded just now, by this prepare
        elif request.reply_to and not admitted.replied_to(request):
            await self._send_reply(request, admitted.outcome)  # a new request for a finished execution
        await _settle(message.ack())

    async def _wait_for_outcome(self, request: messages.ExecutionRequest) -> bool:
        """Have the outcome sent to this caller too; False if that could not be arranged now (an outage: the
        message goes back to the queue, attack-10b N2)."""
        try:
            finished = await self._unit(lambda db: executions.wait_for_outcome(db, request))
        except errors.TransientError as e:
            log.warning("execution %s: a second caller's reply not arranged yet: %s", request.execution_id, e)
            await asyncio.sleep(self.settings.transient_retry_delay_s)
            return False
        if finished is not None and not finished.answers(request):  # finished meanwhile; the row's own caller is
            await self._send_reply(request, finished.outcome)  # answered by its owner (attack-10b N3)
        return True

    async def _record_internal_error(self, request: messages.ExecutionRequest, error: Exception) -> None:
        outcome = messages.Outcome(messages.Status.FAILED, error=f"internal error: {errors.describe(error)}")
        try:
            await self._unit(lambda db: executions.finish_unleased(db, request, outcome, terms=self._terms))
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

    # -- a leased run -----------------------------------------------------------------------------------------

    async def _run_leased(self, request: messages.ExecutionRequest, admitted: Admitted, slot: _Slot) -> None:
        """Run under the lease, record the outcome (fenced), reply. Nothing here may raise: the message is
        acknowledged already; what cannot be finished is left to the lease's expiry and the sweep. The execution
        slot is freed as soon as the run ended: recording and replying need no executor, so the next message's
        run starts meanwhile (the lease, held until the reply is marked sent, keeps covering this one)."""
        lease = admitted.lease
        try:
            try:
                try:
                    outcome = await self._execute_while_leased(request, admitted)
                finally:
                    slot.release()
                if outcome is None:  # the lease was lost, or not renewed in time (the run was stopped): the
                    self.leases.drop(lease.execution_id)  # sweep, here or elsewhere, applies its crash policy
                    return
                self.metrics.executions.labels(status=outcome.status.value).inc()
                recorded = await self.record(lease, outcome)
            finally:
                self._runs.pop(lease.execution_id, None)
                self._lost.discard(lease.execution_id)
                self._disown(lease.execution_id)  # finished: a new request gets the stored outcome
            waiting = self.leases.waiting(lease.execution_id)
            if recorded is None:
                log.warning("execution %s: lease lost before its outcome was recorded", request.execution_id)
            elif request.reply_to or waiting:
                await self._reply_owed(request, recorded, waiting)
                return
        except executor.NotStarted as e:
            await self._postpone(request, lease, e)
        except Exception:
            log.exception("execution %s: failed after its message was acknowledged; the sweep recovers it", lease)
        self.leases.drop(lease.execution_id)

    async def _postpone(self, request: messages.ExecutionRequest, lease: executions.Lease, why: Exception) -> None:
        """Nothing of the execution ran (the executor went away after the claim): PENDING again without using an
        attempt, and its message published again. If that fails, the lease expires and a sweep republishes it."""
        log.warning("execution %s: not started (%s); queued again", request.execution_id, errors.describe(why))
        assert self._channel is not None
        try:
            await self._unit(lambda db: executions.postpone(db, lease, terms=self._terms))
            await amqp.republish(self._channel, self._names, request, attempt=lease.attempt)
            await self._unit(lambda db: executions.republished(db, lease.execution_id, terms=self._terms))
        except Exception as e:  # nothing here may raise (see _run_leased)
            log.warning("execution %s: not queued again yet (a sweep will): %s", request.execution_id, e)

    async def _execute_while_leased(
        self, request: messages.ExecutionRequest, admitted: Admitted
    ) -> messages.Outcome | None:
        """The executor's outcome, or None if the lease was lost meanwhile (``_lease_lost`` cancels the run) or not
        renewed in time (the executor stopped the run)."""
        execution_id = admitted.lease.execution_id
        run = self._runs[execution_id] = asyncio.create_task(
            self._execute(request, admitted.prepared, lease_until=admitted.lease_until)
        )
        try:
            return await run  # cancelling this handler cancels the run too
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if execution_id in self._lost and run.cancelled() and not (current and current.cancelling()):
                return None
            raise

    def _lease_lost(self, execution_id: uuid.UUID) -> None:
        run = self._runs.get(execution_id)
        if run is not None and not run.done():
            self._lost.add(execution_id)
            run.cancel()

    async def _lease_renewed(self, kept: set[uuid.UUID], until: float) -> None:
        """The leases of ``kept`` are surely valid until ``until``: their runs may go on until then."""
        running = [str(execution_id) for execution_id in kept if execution_id in self._runs]
        if running:
            await self.executor.extend(running, until)

    async def record(self, lease: executions.Lease, outcome: messages.Outcome) -> messages.Outcome | None:
        """Record (group-committed with concurrent outcomes); retried through outages while the stop allows:
        the lease may outlive a short one, and fencing refuses the outcome if it did not (None). What was
        recorded is returned: an outcome PostgreSQL refuses even alone (``outcome_problem`` missed something) becomes
        FAILED saying so, for this execution only, instead of being left to the sweep."""
        delay_s, replaced = self.settings.transient_retry_delay_s, False
        while True:
            try:
                recorded = await self.leases.outcomes.submit((lease, outcome))
            except errors.TransientError as e:
                self._db_ok = False
                log.warning("execution %s: outcome not recorded yet: %s", lease.execution_id, e)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, self.settings.lease_renew_interval_s)
                continue
            except Exception as e:
                if replaced:
                    raise  # even the replacement was refused: the sweep recovers it
                log.warning("execution %s: its outcome was refused: %s", lease.execution_id, errors.describe(e))
                outcome = messages.Outcome(  # the reason escaped: it may quote what was refused
                    messages.Status.FAILED,
                    error=messages.storable_text(f"the outcome could not be stored: {errors.describe(e)}"),
                    duration_ms=outcome.duration_ms,
                )
                replaced = True
                continue
            self._db_ok = True
            return outcome if recorded else None

    async def _reply_owed(
        self,
        request: messages.ExecutionRequest,
        outcome: messages.Outcome,
        waiting: tuple[executions.Target, ...] = (),
    ) -> None:
        """Send a reply this consumer owes (it holds the row's lease) to the row's caller and to every other one
        ``waiting`` for it, then mark it sent. Unsent (the broker stayed away), the lease is left to expire and a
        sweep sends it from the stored outcome."""
        execution_id = request.execution_id
        self.leases.hold(execution_id)
        self._replying.add(execution_id)
        callers = [request] + [dataclasses.replace(request, reply_to=to, correlation_id=c) for to, c in waiting]
        try:
            sent = [await self._send_reply(r, outcome, retry_s=self.settings.reply_retry_s) for r in callers]
            if not all(sent):
                self.leases.drop(execution_id)
                return
            if not await self._mark_replied(execution_id):
                self.leases.drop(execution_id)
        finally:
            self._replying.discard(execution_id)

    async def _mark_replied(self, execution_id: uuid.UUID) -> bool:
        """Mark the reply of ``execution_id`` sent (with the next outcome flush, usually). Through an outage the
        mark is retried while the lease it holds lasts (its renewals resume with the database): dropped at once,
        the lease expired and a sweep sent the reply a second time (attack-10 F10). False if it never was."""
        delay_s = self.settings.transient_retry_delay_s
        give_up = self._monotonic() + self.settings.lease_ttl_s
        while True:
            try:
                await self.leases.mark_replied(execution_id)
                return True
            except errors.TransientError as e:
                if self._monotonic() + delay_s > give_up or not self._consuming:
                    log.warning("execution %s: replied, but not marked so: %s", execution_id, e)
                    return False
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, self.settings.lease_renew_interval_s)

    async def _send_reply(
        self, request: messages.ExecutionRequest, outcome: messages.Outcome, *, retry_s: float = 0.0
    ) -> bool:
        if not request.reply_to:
            return True
        assert self._replies is not None
        assert self._connection is not None
        body = json.dumps(outcome.reply(request.execution_id)).encode()
        if amqp.is_direct_reply_to(request.reply_to):
            assert self._direct_replies is not None
            await self._direct_replies.send(request.reply_to, request.correlation_id, body)
            return True
        return await amqp.reply(
            self._replies,
            request.reply_to,
            request.correlation_id,
            body,
            retry_s=retry_s,
            connected=self._connection.connected,
        )

    async def _on_recovered(self, recovered: list[executions.Recovered]) -> None:
        """What a sweep took over: republish retries, send owed replies (failures included)."""
        for item in recovered:
            if item.action is executions.Action.REPUBLISH:
                await self._republish(item)
            elif item.action is executions.Action.REPLY:  # beside the sweep: an unsendable reply is retried for
                owed = asyncio.create_task(  # reply_retry_s, which must not hold up the next sweep (F11)
                    self._reply_recovered(item)
                )
                self._owed.add(owed)
                owed.add_done_callback(self._owed.discard)
            if item.previous_status is messages.Status.RUNNING:
                self.metrics.executions.labels(status=item.record.status.value).inc()

    async def _reply_recovered(self, item: executions.Recovered) -> None:
        try:
            await self._reply_owed(item.request, item.record.outcome, item.waiting)
        except Exception:  # its lease expires and a later sweep sends it
            log.exception("execution %s: the owed reply failed", item.record.id)

    async def _republish(self, item: executions.Recovered) -> None:
        assert self._channel is not None
        try:
            await amqp.republish(self._channel, self._names, item.request, attempt=item.record.attempt + 1)
        except errors.TransientError as e:  # still PENDING and leased: the next sweep after expiry tries again
            log.warning("execution %s: retry not republished yet: %s", item.record.id, e)
            return
        try:  # confirmed, so in the queue durably: republish again only if it is still PENDING much later
            await self._unit(lambda db: executions.republished(db, item.record.id, terms=self._terms))
        except errors.TransientError as e:
            log.warning(
                "execution %s: republished, but not marked so (it may be republished again): %s", item.record.id, e
            )

    # -- the two units of work ----------------------------------------------------------------------------------

    async def read_ahead(self, request: messages.ExecutionRequest) -> Prepared | executions.Record | executions.Busy:
        """The read-only part of preparing, done before an execution slot is free: the workflow, the
        organization and its configs (Redis first), then ``_sync_module_cache``, the O(1) readiness check, which
        returns the generation the execution pins. An execution that cannot run (unknown workflow, another
        organization's, ...) is recorded FAILED here and its Record returned. The reads and the check are
        independent: they run at once, and the check reads the config and organization entries the request
        names in its own Redis round trip (the start latency is one round trip, not several)."""
        guessed = _scope(request.organization_id)  # the workflow's own organization only if the request has none
        ahead = self.configs.cache_keys(guessed, request.organization_id)
        found, checked = await asyncio.gather(
            self._db_call(self.workflows.read_for_execution(request.workflow_id)),
            self._check_cache_with(ahead),
            return_exceptions=True,
        )
        cached = None if isinstance(checked, BaseException) else checked[1]
        prepared = await self._read(request, found, guessed, cached)
        if not isinstance(prepared, Prepared):
            return prepared  # recorded without a run: the cache's state does not matter
        if isinstance(checked, BaseException):
            raise checked
        return dataclasses.replace(prepared, generation=checked[0])

    async def _check_cache_with(self, also: list[str]) -> tuple[int, list[Any]]:
        """``_sync_module_cache``, reading ``also`` in the same round trip."""
        try:
            checked = await self.guard.check_with(also)
        except errors.TransientError:
            self._cache_ok = False
            raise
        self._cache_ok = True
        return checked

    async def prepare(self, request: messages.ExecutionRequest) -> Admitted | executions.Record | executions.Busy:
        """Everything before the executor: what ``read_ahead`` reads (unless read just now, while the message
        waited for its slot), then the claim. An Admitted execution is leased to this consumer (``leases``
        renews it)."""
        execution_id = request.execution_id
        if not self.executor.available:  # claimed now, it could only fail: requeued instead (a TransientError)
            raise executor.ExecutorUnavailable("the executor is unavailable")
        while (other := self._preparing.get(execution_id)) is not None:
            await asyncio.shield(other)  # another delivery of it is being prepared here: see what it decided
        if execution_id in self._mine and not await self._ended_here(execution_id):
            return executions.Busy(None)  # a second delivery of what this consumer claims or runs
        self._mine[execution_id] = asyncio.Event()
        preparing = self._preparing[execution_id] = asyncio.get_running_loop().create_future()
        try:
            read = self._ahead.pop(execution_id, None) or await self.read_ahead(request)
            admitted = read if not isinstance(read, Prepared) else await self._claim(request, read)
        except BaseException:
            self._disown(execution_id)
            raise
        finally:
            del self._preparing[execution_id]
            preparing.set_result(None)
        if not isinstance(admitted, Admitted):
            self._disown(execution_id)
            return admitted
        self.leases.hold(execution_id, admitted.lease.token)
        return admitted

    def _disown(self, execution_id: uuid.UUID) -> None:
        ended = self._mine.pop(execution_id, None)
        if ended is not None:
            ended.set()

    async def _ended_here(self, execution_id: uuid.UUID) -> bool:
        """A delivery of an execution this consumer has claimed: False if it is a duplicate (the lease this
        consumer holds is still the current one: it runs it and replies). True once the local handling has ended
        if that lease is stale: the row was taken over meanwhile (this consumer stalled past the expiry and a sweep,
        maybe its own, made it PENDING and republished it: this is that message, attack-10 F4), so the local run
        is stopped and the message is handled anew."""
        token = self.leases.token(execution_id)
        if token is None:
            return False  # not claimed yet (or only a reply owed): this is a duplicate of that delivery
        record = await self._unit(lambda db: executions.read(db, execution_id))
        if record is not None and record.status is not messages.Status.PENDING and record.token == token:
            return False
        log.warning("execution %s: delivered again after its lease here was taken over; stopping the old run",
                    execution_id)  # fmt: skip
        self._lease_lost(execution_id)
        ended = self._mine.get(execution_id)
        if ended is not None:
            async with asyncio.timeout(self.settings.lease_ttl_s):
                await ended.wait()
        return True

    async def _read(
        self,
        request: messages.ExecutionRequest,
        found: workflows.WorkflowForExecution | BaseException,
        guessed: str,
        cached: list[Any] | None,
    ) -> Prepared | executions.Record | executions.Busy:
        """From the workflow ``found`` (a plain asyncpg statement: ``Database.raw``) and the cache entries read
        with the readiness check (``cached``; None: that check failed, so Redis is asked again, and PostgreSQL on
        a miss), the organization and its configs; each statement commits by itself (they are independent and
        idempotent)."""
        try:
            if isinstance(found, BaseException):
                raise found
            workflow = found
            organization = await self._organization(request, workflow, cached[-1] if cached else None)
            if workflow.code is None:
                raise errors.InputError(workflow.name, "the workflow has no code")
        except errors.InputError as e:
            outcome = messages.Outcome(messages.Status.FAILED, error=str(e), duration_ms=0)
            record = await self._unit(lambda db: executions.finish_unleased(db, request, outcome, terms=self._terms))
            if not record.status.finished:  # running under a live lease (a duplicate delivery): not ours to fail
                return executions.Busy(record)
            self.metrics.executions.labels(status=outcome.status.value).inc()
            return record
        scope = _scope(organization.id if organization else None)
        ahead = cached if scope == guessed else None  # else the workflow's own organization: read its scope
        config = await self._db_call(self.configs.load_config_for_scope(scope, cached=ahead))
        return Prepared(workflow=workflow, organization=organization, config=config)

    async def _claim(
        self, request: messages.ExecutionRequest, read: Prepared
    ) -> Admitted | executions.Record | executions.Busy:
        """The claim's statement on a plain asyncpg connection; only if it finds a row it may not claim does
        ``executions.claim`` find out what is there (finished, leased elsewhere, expired without attempts)."""
        name, organization = read.workflow.name, read.organization.id if read.organization else None
        attempts = read.workflow.retries_on_crash + 1
        terms = self._terms
        started = leases.clock()
        claimed: executions.Lease | executions.Record | executions.Busy | None = await self._db_call(
            self.database.raw(
                lambda db: executions.try_claim(
                    db, request, terms=terms, workflow_name=name, organization_id=organization, max_attempts=attempts
                )
            )
        )
        if claimed is None:
            claimed = await self._unit(
                lambda db: executions.claim(
                    db, request, terms=terms, workflow_name=name, organization_id=organization, max_attempts=attempts
                )
            )
        if not isinstance(claimed, executions.Lease):
            return claimed
        prepared = dataclasses.replace(read, attempt=claimed.attempt)
        return Admitted(lease=claimed, prepared=prepared, lease_until=leases.safe_until(started, terms.lease_s))

    async def _organization(
        self, request: messages.ExecutionRequest, workflow: workflows.WorkflowForExecution, cached: Any = None
    ) -> configs.Organization | None:
        """The execution's organization; ``cached``: the cache entry of the request's organization, if read."""
        owner, asked = workflow.organization_id, request.organization_id
        if owner is not None and asked is not None and owner != asked:
            raise errors.InputError(workflow.name, "the workflow belongs to another organization")
        org_id = asked or owner
        if org_id is None:
            return None
        entry = cached if asked is not None else None  # read for the request's organization only
        organization = await self._db_call(self.configs.get_organization(org_id, cached=entry))
        if organization is None:
            raise errors.InputError(str(org_id), "no such organization")
        if not organization.is_active:
            raise errors.InputError(str(org_id), "the organization is inactive")
        return organization

    async def _execute(
        self, request: messages.ExecutionRequest, prepared: Prepared, *, lease_until: float = math.inf
    ) -> messages.Outcome | None:
        """The run's outcome; None if it was stopped because its lease was not renewed in time (the sweep applies
        its policy once the lease expired: nothing is recorded here)."""
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
            "attempt": prepared.attempt,
        }
        timeout_s = min(float(workflow.timeout_seconds), self.settings.execution_timeout_s)
        started = self._monotonic()
        session = serving.Session(modules=self.modules, config=prepared.config, secrets=self.secrets)
        until = None if math.isinf(lease_until) else lease_until
        try:
            result = await self.executor.run(job, timeout_s=timeout_s, session=session, lease_until=until)
        except executor.ExecutorLost as e:
            return await self._executor_lost(request, prepared, e, round((self._monotonic() - started) * 1000))
        if result.lease_expired:
            log.warning("execution %s: stopped, its lease was not renewed in time", request.execution_id)
            return None
        elapsed_s = self._monotonic() - started
        self.metrics.duration.observe(elapsed_s)
        duration_ms = round(elapsed_s * 1000)
        # What the execution sent is workflow-controlled (it can forge its result frame): held to a message's
        # bounds before it reaches PostgreSQL, where it is group-committed with other organizations' outcomes
        # (attack-8b A3), or a reply, so it can fail only this execution (attack-8 F9b). An error's words are
        # kept, NULs and unpaired surrogates escaped (an exception about a surrogateescape'd file name is ordinary).
        error = messages.storable_text(result.error)
        problem = messages.outcome_problem(
            result.result, error, limits=self._limits, max_result_bytes=self.settings.max_result_bytes
        )
        if problem is not None:
            log.warning("execution %s: its result was refused: %s", request.execution_id, problem)
            error = f"execution process {result.pid} sent a result that cannot be recorded: {problem}"
            return messages.Outcome(messages.Status.FAILED, error=error, duration_ms=duration_ms)
        return messages.Outcome(status=result.status, result=result.result, error=error, duration_ms=duration_ms)

    async def _executor_lost(
        self, request: messages.ExecutionRequest, prepared: Prepared, why: Exception, duration_ms: int
    ) -> messages.Outcome | None:
        """The executor went away during the run (killed, crashed): the run's processes died with it. With attempts
        left, the lease is released at once, so the next sweep retries it by policy; without, the run failed, and
        says why (attack-10 F8: it waited for its lease to expire and was failed 'consumer died mid-run')."""
        log.warning("execution %s: the executor was lost during the run: %s", request.execution_id, why)
        if prepared.attempt < prepared.workflow.retries_on_crash + 1:
            with contextlib.suppress(errors.TransientError):  # else the lease expires and the sweep does the same
                owner = self._terms.owner
                await self._unit(lambda db: executions.release(db, [request.execution_id], owner=owner))
            return None
        error = f"the executor was lost during the execution ({errors.describe(why)}); its processes died with it"
        return messages.Outcome(messages.Status.FAILED, error=error, duration_ms=duration_ms)

    async def _unit(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        return await self._db_call(self.database.run(work, autocommit=True))

    async def _db_call(self, call: Awaitable[T]) -> T:
        """``call``, which reads or writes PostgreSQL; its outcome is what ``/readyz`` reports for it."""
        try:
            result = await call
        except errors.SourceUnavailable:
            self._db_ok = False
            raise
        self._db_ok = True
        return result


def _scope(organization_id: uuid.UUID | None) -> str:
    return configs.GLOBAL if organization_id is None else f"ORG:{organization_id}"


class _NoSlot(Exception):
    """No execution slot became free within ``delivery_hold_s``."""


class _Slot:
    """One execution slot (of ``consumer_concurrency``): acquired once, released once (after the run, or when
    handling ends)."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots = slots
        self._held = False

    async def acquire(self, timeout_s: float) -> float:
        """Wait for the slot; returns how long that took (_NoSlot after ``timeout_s``)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise _NoSlot from None
        self._held = True
        return loop.time() - started

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots.release()


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: whoever awaited it was cancelled


async def _finish(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _settle(settling: Any) -> None:
    """Ack/nack/reject; if the channel died meanwhile, the broker redelivers and claims make that safe."""
    try:
        await settling
    except (OSError, aio_pika.exceptions.AMQPError, RuntimeError) as e:
        log.warning("could not settle a message (it will be redelivered): %s", errors.describe(e))
