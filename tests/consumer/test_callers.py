"""Attack-10 F3: a caller that asks again for an execution while it runs (a client retrying with a new reply queue
after its connection dropped) gets the outcome too, once; the first caller is not answered twice."""

from __future__ import annotations

import json
from typing import Any

from .test_delivery import WORKFLOW, publish, replies_on, starts


async def test_a_second_caller_of_a_running_execution_gets_its_outcome_once(harness: Any) -> None:
    workflow_id = await harness.workflow(WORKFLOW)
    ledger = harness.ledger()
    url = harness.settings.required("amqp_url")
    request = harness.request(workflow_id, {**ledger.params, "name": "x", "wait": 2.0})
    async with (
        harness.consumer(),
        replies_on(url) as (first, channel),
        replies_on(url) as (second, _),
        replies_on(url) as (late, _),
    ):
        await publish(channel, harness.settings.queue_name, request, first.queue_name)
        await harness.wait_for_status(request.execution_id, "RUNNING")
        await publish(channel, harness.settings.queue_name, request, second.queue_name)  # again, while it runs
        await publish(channel, harness.settings.queue_name, request, second.queue_name)  # and once more
        await harness.wait_for_status(request.execution_id, "SUCCESS")
        await first.wait_for_count(1)
        await second.wait_for_count(1)
        await harness.wait_for_replied(request.execution_id)
        await publish(channel, harness.settings.queue_name, request, late.queue_name)  # after it finished
        await late.wait_for_count(1)
        # a duplicate reply, if one were coming, was sent before the replied mark that was awaited above
    for replies in (first, second, late):
        assert [json.loads(b)["result"] for b in replies.bodies] == ["x"]
    assert await starts(ledger) == ["x"]


async def test_a_request_published_twice_gets_one_reply_even_when_the_copy_meets_its_end(harness: Any) -> None:
    """A publisher retrying after a lost confirm: each request twice, back to back, one slot, so the copy waits
    and meets the execution as it finishes (attack-10b N3: it was answered from the stored outcome too)."""
    workflow_id = await harness.workflow("import time\ndef run(n):\n    time.sleep(0.2)\n    return n\n")
    requests = [harness.request(workflow_id, {"n": n}) for n in range(8)]
    url = harness.settings.required("amqp_url")
    async with harness.consumer(consumer_concurrency=1), replies_on(url) as (replies, channel):
        for request in requests:
            for _ in range(2):
                await publish(channel, harness.settings.queue_name, request, replies.queue_name)
        await replies.wait_for_count(len(requests))
        for request in requests:
            await harness.wait_for_replied(request.execution_id)
        # every copy was handled before the last replied mark: the consumer runs one message at a time here
    counts: dict[str, int] = {}
    for body in replies.bodies:
        key = json.loads(body)["execution_id"]
        counts[key] = counts.get(key, 0) + 1
    assert counts == {str(r.execution_id): 1 for r in requests}
