"""Attack-10 F5: any producer can name any reply address. A forged direct reply-to address makes RabbitMQ (3.10-3.12)
close the publishing connection; it must cost the consumer no delivery and must not stay owed forever, while
callers that use direct reply-to properly still get their replies."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aio_pika
import aio_pika.abc

from .test_delivery import publish

FORGED = "amq.rabbitmq.reply-to.g2dkAAAA.garbage"
ECHO = "def run(n):\n    return n\n"


async def test_a_forged_direct_reply_to_costs_no_delivery_and_is_not_owed_forever(harness: Any) -> None:
    workflow_id = await harness.workflow(ECHO)
    url = harness.settings.required("amqp_url")
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        async with harness.consumer() as running:
            hostile = harness.request(workflow_id, {"n": 0})
            await publish(channel, harness.settings.queue_name, hostile, reply_to=FORGED)
            await harness.wait_for_replied(hostile.execution_id)  # given up on at once: nobody owes it again
            for n in range(1, 6):  # innocent callers right after it
                reply = await harness.call(workflow_id, {"n": n}, timeout_s=10)
                assert reply["result"] == n
            assert running.metrics.broker_reconnects._value.get() == 0  # the consuming connection never dropped
    finally:
        await connection.close()


async def test_a_caller_using_direct_reply_to_properly_gets_its_reply(harness: Any) -> None:
    workflow_id = await harness.workflow(ECHO)
    connection = await aio_pika.connect(harness.settings.required("amqp_url"))
    try:
        channel = await connection.channel()
        arrived: asyncio.Future[aio_pika.abc.AbstractIncomingMessage] = asyncio.get_running_loop().create_future()
        reply_queue = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if not arrived.done():
                arrived.set_result(message)

        await reply_queue.consume(on_reply, no_ack=True)
        async with harness.consumer():
            request = harness.request(workflow_id, {"n": 7})
            await publish(channel, harness.settings.queue_name, request, reply_to="amq.rabbitmq.reply-to")
            reply = await asyncio.wait_for(arrived, 30)
        assert json.loads(reply.body)["result"] == 7
        assert reply.correlation_id == str(request.execution_id)
    finally:
        await connection.close()
