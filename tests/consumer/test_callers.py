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
