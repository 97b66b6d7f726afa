"""The RabbitMQ adapter: topology, poison and reply publishing, and the caller's side (publish, wait for reply).

Topology (declared idempotently by the consumer and by callers, all durable):

    <queue>  --(reject / nack without requeue)-->  <queue>.dlx (direct)  --<queue>.poison-->  <queue>.poison

A malformed message, or one the consumer failed on for an unexpected reason, is republished to the poison queue
with ``keys.POISON_REASON_HEADER`` saying why, then acknowledged (publisher confirms make that a move, not a
loss); when that republish fails, the message is rejected and reaches the same queue through the dead-letter
exchange (``x-death``, no reason header).
aio-pika's errors become ``BrokerUnavailable`` (retry) or ``ConfigError`` (the queue exists with other
arguments), without the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import yarl
from pamqp import commands

from modcache import errors, keys
from modcache_consumer import headerguard, messages

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/json"
RETRY_HEADER = keys.RETRY_ATTEMPT_HEADER


class BrokerUnavailable(errors.TransientError):
    """RabbitMQ could not be reached or refused an operation that may succeed later."""


@dataclasses.dataclass(frozen=True)
class Names:
    queue: str
    dead_letter_exchange: str
    poison: str

    @classmethod
    def for_queue(cls, queue: str) -> Names:
        return cls(queue=queue, dead_letter_exchange=keys.dead_letter_exchange(queue), poison=keys.poison_queue(queue))


async def connect(
    url: str, *, name: str, reconnect_interval_s: float = 2.0, heartbeat_s: int | None = None
) -> aio_pika.abc.AbstractRobustConnection:
    """A robust connection: after a drop it reconnects and restores channels, queues and consumers. The first
    connect must succeed. Message properties the client cannot decode arrive as a marker (``headerguard``)
    instead of killing the connection's reader. ``heartbeat_s`` applies unless the URL sets ``heartbeat``."""
    headerguard.install()
    options: dict[str, Any] = {"reconnect_interval": reconnect_interval_s}
    if heartbeat_s is not None and "heartbeat" not in yarl.URL(url).query:
        options["heartbeat"] = heartbeat_s
    try:
        connection: aio_pika.abc.AbstractRobustConnection = await aio_pika.connect_robust(
            url, client_properties={"connection_name": name}, **options
        )
        return connection
    except (OSError, aio_pika.exceptions.AMQPError) as e:
        raise BrokerUnavailable(f"RabbitMQ unreachable: {errors.describe(e)}") from e


async def declare(channel: aio_pika.abc.AbstractChannel, names: Names) -> aio_pika.abc.AbstractQueue:
    """The durable execution queue with its dead-letter exchange and poison queue."""
    try:
        exchange = await channel.declare_exchange(
            names.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        poison = await channel.declare_queue(names.poison, durable=True)
        await poison.bind(exchange, routing_key=names.poison)
        return await channel.declare_queue(
            names.queue,
            durable=True,
            arguments={"x-dead-letter-exchange": names.dead_letter_exchange, "x-dead-letter-routing-key": names.poison},
        )
    except aio_pika.exceptions.ChannelPreconditionFailed as e:
        raise errors.ConfigError(
            "MODCACHE_QUEUE_NAME", f"queue {names.queue!r} exists with other arguments (no dead-letter exchange?)"
        ) from e
    except (OSError, aio_pika.exceptions.AMQPError) as e:
        raise BrokerUnavailable(f"declaring {names.queue!r} failed: {errors.describe(e)}") from e


async def delete(url: str, names: Names) -> None:
    """Remove what ``declare`` created for ``names`` (queue, poison queue, dead-letter exchange)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        for queue in (names.queue, names.poison):
            await channel.queue_delete(queue)
        await channel.exchange_delete(names.dead_letter_exchange)
    finally:
        await connection.close()


async def poison(
    channel: aio_pika.abc.AbstractChannel, names: Names, message: aio_pika.abc.AbstractIncomingMessage, reason: str
) -> None:
    """Move ``message`` to the poison queue with ``reason`` in a header (then the caller acks it)."""
    headers: dict[str, Any] = dict(message.headers or {})
    headers[keys.POISON_REASON_HEADER] = errors.truncate(reason)
    copy = aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    exchange = await channel.get_exchange(names.dead_letter_exchange, ensure=False)
    await exchange.publish(copy, routing_key=names.poison)


async def reply(
    channel: aio_pika.abc.AbstractChannel,
    reply_to: str,
    correlation_id: str | None,
    body: bytes,
    *,
    retry_s: float = 0.0,
    connected: asyncio.Event | None = None,
    confirm_timeout_s: float = 5.0,
) -> bool:
    """Send an execution's outcome to its caller; True once the broker took it (a caller whose queue is gone
    is not an error). A broker that goes away mid-reply (``ChannelInvalidStateError`` during a restart, a
    closed connection, no confirm in time) is retried for ``retry_s``, each time after the robust connection
    is back (``connected``); False if it never was: the caller decides what happens next, nothing raises."""
    properties = commands.Basic.Properties(  # persistent: a durable reply queue keeps it across a broker restart
        content_type=CONTENT_TYPE,
        correlation_id=correlation_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT.value,
        message_id=uuid.uuid4().hex,
    )
    deadline = asyncio.get_running_loop().time() + retry_s
    while True:
        try:  # on the channel's aiormq channel: no aio-pika Message per reply (the hot path)
            underlay = await channel.get_underlay_channel()
            confirmed = await underlay.basic_publish(
                body, exchange="", routing_key=reply_to, properties=properties, timeout=confirm_timeout_s
            )
            if not isinstance(confirmed, commands.Basic.Ack | None):  # a Nack: the broker did not take it
                raise aio_pika.exceptions.DeliveryError(None, confirmed)
            return True
        except (OSError, RuntimeError, TimeoutError, aio_pika.exceptions.AMQPError) as e:
            # RuntimeError: aiormq's ChannelInvalidStateError (the channel closed under the publish)
            remaining_s = deadline - asyncio.get_running_loop().time()
            if remaining_s <= 0:
                log.warning("reply to %s not sent: %s", reply_to, errors.describe(e))
                return False
        await _reconnected(connected, min(remaining_s, 1.0))


#: RabbitMQ's direct reply-to: the address names the caller's channel (an encoded term the broker decodes).
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to."


def is_direct_reply_to(reply_to: str) -> bool:
    return reply_to.startswith(DIRECT_REPLY_TO)


class DirectReplies:
    """Replies to direct reply-to addresses, on a connection of their own, each sent once.

    Any producer can name any ``amq.rabbitmq.reply-to.*`` address, and the broker's decoder fails on a forged one
    by closing the publishing *connection* (541 INTERNAL_ERROR, RabbitMQ 3.10-3.12): on the consuming connection,
    retried until the reply was confirmed, one such request cut every delivery off every two seconds, forever
    (attack-10 F5). So these replies never share the consuming connection and are not retried: a direct reply-to
    reply is fire-and-forget by the broker's design anyway (not queued; lost if the caller's channel is gone). A
    failed one is logged and counted as sent, so it is never owed again."""

    def __init__(self, url: str, *, name: str, confirm_timeout_s: float = 5.0) -> None:
        self._url, self._name, self._confirm_timeout_s = url, name, confirm_timeout_s
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._lock = asyncio.Lock()

    async def send(self, reply_to: str, correlation_id: str | None, body: bytes) -> None:
        message = aio_pika.Message(body, content_type=CONTENT_TYPE, correlation_id=correlation_id)
        async with self._lock:
            try:
                channel = await self._opened()
                await channel.default_exchange.publish(message, routing_key=reply_to, timeout=self._confirm_timeout_s)
            except (OSError, RuntimeError, TimeoutError, aio_pika.exceptions.AMQPError) as e:
                log.warning("direct reply to %r not delivered (not retried): %s", reply_to[:300], errors.describe(e))
                await self._drop()

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

    async def _opened(self) -> aio_pika.abc.AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            await self._drop()
            self._connection = await aio_pika.connect(self._url, client_properties={"connection_name": self._name})
            self._channel = await self._connection.channel()
        return self._channel

    async def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()


async def _reconnected(connected: asyncio.Event | None, wait_s: float) -> None:
    """Wait a moment, then for the robust connection to be back (at most ``wait_s`` in all)."""
    await asyncio.sleep(min(0.05, wait_s))
    if connected is not None and not connected.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(connected.wait(), wait_s)


async def republish(
    channel: aio_pika.abc.AbstractChannel, names: Names, request: messages.ExecutionRequest, *, attempt: int
) -> None:
    """Publish ``request`` again (a crash-policy retry), persistent and confirmed, marked with its attempt."""
    message = aio_pika.Message(
        request.encode(),
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        reply_to=request.reply_to,
        correlation_id=request.correlation_id,
        headers={keys.RETRY_ATTEMPT_HEADER: attempt},
    )
    try:
        await channel.default_exchange.publish(message, routing_key=names.queue, timeout=5.0)
    except (OSError, RuntimeError, TimeoutError, aio_pika.exceptions.AMQPError) as e:
        raise BrokerUnavailable(f"republishing to {names.queue!r} failed: {errors.describe(e)}") from e


# -- the caller's side (CLI `modcache run`, tests, benchmarks) -------------------------------------------------


class Caller:
    """Publishes execution requests and, when asked, waits for their replies on a private reply queue."""

    def __init__(self, *, channel: aio_pika.abc.AbstractChannel, names: Names) -> None:
        self._channel = channel
        self._names = names
        self._reply_queue: aio_pika.abc.AbstractQueue | None = None
        self._pending: dict[str, asyncio.Future[messages.RawReply]] = {}

    async def start(self) -> None:
        await declare(self._channel, self._names)
        self._reply_queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        await self._reply_queue.consume(self._on_reply, no_ack=True)

    async def publish(self, request: messages.ExecutionRequest, *, wait: bool = True) -> None:
        """Publish ``request`` (persistent, confirmed); with ``wait``, its reply can then be awaited."""
        reply_to = None
        if wait:
            assert self._reply_queue is not None, "start() first"
            reply_to = self._reply_queue.name
            self._pending[str(request.execution_id)] = asyncio.get_running_loop().create_future()
        await self.publish_raw(
            request.encode(), reply_to=reply_to, correlation_id=str(request.execution_id) if wait else None
        )

    async def publish_raw(self, body: bytes, *, reply_to: str | None = None, correlation_id: str | None = None) -> None:
        message = aio_pika.Message(
            body,
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            reply_to=reply_to,
            correlation_id=correlation_id,
        )
        try:
            await self._channel.default_exchange.publish(message, routing_key=self._names.queue)
        except (OSError, aio_pika.exceptions.AMQPError) as e:
            raise BrokerUnavailable(f"publishing to {self._names.queue!r} failed: {errors.describe(e)}") from e

    async def result(self, execution_id: uuid.UUID, *, timeout_s: float | None = None) -> messages.RawReply:
        future = self._pending[str(execution_id)]
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        finally:
            if future.done():
                self._pending.pop(str(execution_id), None)

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        future = self._pending.get(message.correlation_id or "")
        if future is None or future.done():
            return
        try:
            future.set_result(messages.decode_reply(message.body))
        except ValueError as e:
            future.set_exception(errors.InputError("reply", f"undecodable: {e}"))


@asynccontextmanager
async def caller(url: str, *, queue: str, name: str = "modcache-run") -> AsyncIterator[Caller]:
    connection = await connect(url, name=name)
    try:
        channel = await connection.channel()
        client = Caller(channel=channel, names=Names.for_queue(queue))
        await client.start()
        yield client
    finally:
        await connection.close()
