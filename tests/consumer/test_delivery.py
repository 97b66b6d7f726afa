"""Issue 10 end to end: consumer processes on one queue, a private broker with a short ``consumer_timeout``,
SIGKILLed consumers recovered by policy. Faults only on private brokers and on this test's own database."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import psutil
import pytest

from testkit.consumers import BrokerNode, ConsumerProcess
from testkit.ledger import LEDGER, Ledger

FAST_LEASES = {"lease_ttl_s": 2.0, "lease_renew_interval_s": 0.5, "lease_sweep_interval_s": 0.5}
# Notes "start NAME" and "end NAME" in a Redis list (RPUSH: an atomic append, as O_APPEND is for a file;
# executions cannot reach the test's files), sleeping ``wait`` seconds in between, but only on the first attempt
# that sets ``once`` (so a retry is quick).
WORKFLOW = (
    LEDGER
    + """
import time
def run(url, key, name, wait=0.0, once=None):
    note(url, key, f"start {name}")
    if once is None or redis.Redis.from_url(url).set(once, 1, nx=True):
        time.sleep(wait)
    note(url, key, f"end {name}")
    return name
"""
)


def process_env(harness: Any, **overrides: Any) -> dict[str, str]:
    """The harness's settings as ``MODCACHE_*`` variables for a consumer process."""
    # the workflows write a Redis ledger: their executions need the host network (the default is none)
    values = (
        harness.settings.model_dump(exclude_defaults=True)
        | {"health_port": 0, "execution_network": "host"}
        | FAST_LEASES
        | overrides
    )
    env = {}
    for name, value in values.items():
        plain = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        env[f"MODCACHE_{name.upper()}"] = json.dumps(plain) if isinstance(plain, list | dict) else str(plain)
    return env


async def starts(ledger: Ledger) -> list[str]:
    return [entry.split()[1] for entry in await ledger.entries() if entry.startswith("start ")]


class Replies:
    """Every reply that reaches one reply queue (the harness's caller ignores duplicates; this counts them)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.queue_name = ""
        self._arrived = asyncio.Event()

    async def start(self, channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        self.queue_name = queue.name
        await queue.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.record(message.body)

    def record(self, body: bytes) -> None:
        self.bodies.append(body)
        self._arrived.set()

    async def wait_for(self, done: Callable[[list[bytes]], bool], *, timeout_s: float = 30.0) -> None:
        """Until ``done`` holds for the replies so far, re-checked as each one arrives."""
        async with asyncio.timeout(timeout_s):
            while not done(self.bodies):
                self._arrived.clear()
                await self._arrived.wait()

    async def wait_for_count(self, count: int, *, timeout_s: float = 30.0) -> None:
        await self.wait_for(lambda bodies: len(bodies) >= count, timeout_s=timeout_s)


@contextlib.asynccontextmanager
async def replies_on(url: str) -> AsyncIterator[tuple[Replies, aio_pika.abc.AbstractChannel]]:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        replies = Replies()
        await replies.start(channel)
        yield replies, channel
    finally:
        await connection.close()


async def publish(channel: aio_pika.abc.AbstractChannel, queue: str, request: Any, reply_to: str | None = None) -> None:
    message = aio_pika.Message(
        request.encode(),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        reply_to=reply_to,
        correlation_id=str(request.execution_id),
    )
    await channel.default_exchange.publish(message, routing_key=queue)


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[list[ConsumerProcess]]:
    started: list[ConsumerProcess] = []
    yield started
    for process in started:
        await process.stop()


async def test_two_consumer_processes_and_a_redelivery_while_the_first_runs_run_it_once(
    harness: Any, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    workflow_id = await harness.workflow(WORKFLOW)
    ledger = harness.ledger()
    for i in range(2):
        processes.append(ConsumerProcess(process_env(harness), tmp_path / f"consumer-{i}.log"))
    await asyncio.gather(*(p.start() for p in processes))
    url = harness.settings.required("amqp_url")
    async with replies_on(url) as (replies, channel):
        request = harness.request(workflow_id, {**ledger.params, "name": "a", "wait": 2.0})
        await publish(channel, harness.settings.queue_name, request, replies.queue_name)
        await harness.wait_for_status(request.execution_id, "RUNNING")
        await publish(channel, harness.settings.queue_name, request, replies.queue_name)  # the redelivery
        row = await harness.wait_for_status(request.execution_id, "SUCCESS")
        await replies.wait_for_count(1)
        await harness.wait_for_replied(request.execution_id)
        await asyncio.sleep(0.5)  # a second reply, if one were coming, would be on its way by now
    assert await starts(ledger) == ["a"]
    assert len(replies.bodies) == 1
    assert (row["attempt"], row["lease_token"]) == (1, 1)


async def test_a_run_longer_than_the_brokers_consumer_timeout_runs_once_without_channel_errors(
    harness: Any, tmp_path: Path
) -> None:
    broker = BrokerNode(tmp_path / "broker", config="consumer_timeout = 5000\n")
    await broker.start()
    try:
        workflow_id = await harness.workflow(WORKFLOW)
        ledger = harness.ledger()
        async with harness.consumer(amqp_url=broker.url, amqp_reconnect_interval_s=0.2) as consumer:
            async with replies_on(broker.url) as (replies, channel):
                request = harness.request(workflow_id, {**ledger.params, "name": "long", "wait": 15.0})
                await publish(channel, harness.settings.queue_name, request, replies.queue_name)
                await replies.wait_for_count(1, timeout_s=60)
                reconnects = consumer.metrics.broker_reconnects._value.get()
                await harness.wait_for_replied(request.execution_id)
            readiness = consumer.readiness()
    finally:
        await broker.stop()
    assert await starts(ledger) == ["long"]
    assert len(replies.bodies) == 1
    assert b'"SUCCESS"' in replies.bodies[0]
    assert reconnects == 0  # the broker never closed the channel: the message was acked once the lease committed
    assert readiness == []


@pytest.mark.parametrize(("retries", "expected_starts", "status"), [(0, 1, "FAILED"), (1, 2, "SUCCESS")])
async def test_a_sigkilled_consumers_run_is_recovered_by_policy_within_the_bound(
    harness: Any, processes: list[ConsumerProcess], tmp_path: Path, retries: int, expected_starts: int, status: str
) -> None:
    workflow_id = await harness.workflow(WORKFLOW, retries_on_crash=retries)
    ledger = harness.ledger()
    doomed = ConsumerProcess(process_env(harness), tmp_path / "doomed.log")
    processes.append(doomed)
    await doomed.start()
    url = harness.settings.required("amqp_url")
    params = {**ledger.params, "name": "k", "wait": 30.0, "once": ledger.params["key"] + ":once"}
    request = harness.request(workflow_id, params)
    async with replies_on(url) as (replies, channel):
        await publish(channel, harness.settings.queue_name, request, replies.queue_name)
        await harness.wait_for_status(request.execution_id, "RUNNING")
        await ledger.wait_for(1)
        await doomed.kill()
        killed_at = time.monotonic()
        async with harness.consumer(**FAST_LEASES):  # the survivor
            row = await harness.wait_for_status(request.execution_id, status, timeout_s=60)
            recovered_s = time.monotonic() - killed_at
            await harness.wait_for_replied(request.execution_id)
    bound_s = FAST_LEASES["lease_ttl_s"] + FAST_LEASES["lease_sweep_interval_s"] * 1.2
    assert recovered_s < bound_s + 5.0 + (3.0 if retries else 0.0)  # + start-up of the survivor, + the retry's run
    assert await starts(ledger) == ["k"] * expected_starts
    assert row["attempt"] == expected_starts
    assert len(replies.bodies) == 1
    if status == "FAILED":
        assert row["error"] == "consumer died mid-run"


# Returns what the workflow itself sees of its attempt; the first attempt stays in ``time.sleep`` (``once``).
ATTEMPTS = (
    LEDGER
    + """
import time
def run(url, key, once, context):
    note(url, key, f"start {context.attempt}")
    if redis.Redis.from_url(url).set(once, 1, nx=True):
        time.sleep(30)
    return {"attempt": context.attempt, "execution_id": context.execution_id}
"""
)


async def test_a_retried_workflow_sees_its_attempt_number_after_its_first_consumer_was_sigkilled(
    harness: Any, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    workflow_id = await harness.workflow(ATTEMPTS, retries_on_crash=2)
    ledger = harness.ledger()
    doomed = ConsumerProcess(process_env(harness), tmp_path / "doomed.log")
    processes.append(doomed)
    await doomed.start()
    request = harness.request(workflow_id, {**ledger.params, "once": ledger.params["key"] + ":once"})
    async with replies_on(harness.settings.required("amqp_url")) as (replies, channel):
        await publish(channel, harness.settings.queue_name, request, replies.queue_name)
        assert await ledger.wait_for(1) == ["start 1"]
        await doomed.kill()
        async with harness.consumer(**FAST_LEASES):  # the survivor runs the retry
            row = await harness.wait_for_status(request.execution_id, "SUCCESS", timeout_s=60)
            await harness.wait_for_replied(request.execution_id)
    assert json.loads(replies.bodies[0])["result"] == {"attempt": 2, "execution_id": str(request.execution_id)}
    assert len(replies.bodies) == 1
    assert row["attempt"] == 2
    assert json.loads(row["result"])["attempt"] == 2
    assert await ledger.entries() == ["start 1", "start 2"]


CHAOS_EXECUTIONS = 200


class Chaos:
    """Seeded faults against two consumer processes, the private broker and this test's database."""

    def __init__(
        self, *, seed: int, consumers: list[ConsumerProcess], broker: BrokerNode, harness: Any, log: list[str]
    ) -> None:
        self.rng = random.Random(seed)
        self.consumers = consumers
        self.broker = broker
        self.harness = harness
        self.log = log

    async def run(self) -> None:
        plan = ["kill", "kill", "kill", "worker", "worker", "backends", "backends", "broker"]
        self.rng.shuffle(plan)
        for action in plan:
            await asyncio.sleep(self.rng.uniform(1.0, 2.5))
            self.log.append(action)
            await getattr(self, f"_{action}")()

    async def _kill(self) -> None:
        victim = self.rng.choice(self.consumers)
        await victim.kill()
        await asyncio.sleep(self.rng.uniform(0.1, 1.0))
        await victim.start()

    async def _worker(self) -> None:
        victim = self.rng.choice(self.consumers)
        assert victim.proc is not None
        children = psutil.Process(victim.proc.pid).children(recursive=True)
        if children:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.rng.choice(children).send_signal(signal.SIGKILL)

    async def _backends(self) -> None:
        name = self.harness.database_url.rpartition("/")[2]
        await self.harness.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
            name,
            "modcache-consumer",
        )

    async def _broker(self) -> None:
        await self.broker.restart()


async def publish_all(url: str, queue: str, requests: list[Any], reply_queue: str) -> None:
    """Publish every request (persistent, confirmed), riding out the broker's restart: a publish whose confirm
    was lost is sent again (a duplicate the claims absorb)."""
    connection = await aio_pika.connect_robust(url, reconnect_interval=0.3)
    try:
        channel = await connection.channel()
        for request in requests:
            while True:
                try:
                    await publish(channel, queue, request, reply_queue)
                    break
                except (OSError, RuntimeError, TimeoutError, aio_pika.exceptions.AMQPError):
                    await asyncio.sleep(0.3)
            await asyncio.sleep(0.08)
    finally:
        await connection.close()


async def collect_replies(url: str, queue: str, into: Replies, *, ready: asyncio.Event, stop: asyncio.Event) -> None:
    connection = await aio_pika.connect_robust(url, reconnect_interval=0.3)
    try:
        channel = await connection.channel()
        replies = await channel.declare_queue(queue, durable=True)

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            into.record(message.body)
            await message.ack()

        await replies.consume(on_reply)
        ready.set()
        await stop.wait()
    finally:
        await connection.close()


@pytest.mark.timeout(240)  # about 90 s on an idle machine; this one is shared
async def test_chaos_every_execution_ends_once_and_runs_only_as_its_policy_allows(
    harness: Any, processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    seed = int(os.environ.get("MODCACHE_CHAOS_SEED", "1010"))
    broker = BrokerNode(tmp_path / "broker")
    await broker.start()
    stop_replies = asyncio.Event()
    replies = Replies()
    events: list[str] = []
    try:
        retrying = await harness.workflow(WORKFLOW, retries_on_crash=2)
        failing = await harness.workflow(WORKFLOW)
        ledger = harness.ledger()
        rng = random.Random(seed)
        requests = [
            harness.request(
                retrying if i % 2 else failing, {**ledger.params, "name": str(i), "wait": rng.uniform(0.05, 0.5)}
            )
            for i in range(CHAOS_EXECUTIONS)
        ]
        env = process_env(
            harness, amqp_url=broker.url, amqp_reconnect_interval_s=0.3, consumer_concurrency=3, reply_retry_s=5.0
        )
        for i in range(2):
            processes.append(ConsumerProcess(env, tmp_path / f"consumer-{i}.log"))
        await asyncio.gather(*(p.start() for p in processes))
        reply_queue = f"chaos-replies-{uuid.uuid4().hex[:6]}"
        ready = asyncio.Event()
        collector = asyncio.create_task(
            collect_replies(broker.url, reply_queue, replies, ready=ready, stop=stop_replies)
        )
        await ready.wait()
        chaos = Chaos(seed=seed, consumers=processes, broker=broker, harness=harness, log=events)
        async with asyncio.timeout(200):
            await asyncio.gather(
                publish_all(broker.url, harness.settings.queue_name, requests, reply_queue), chaos.run()
            )
            rows = await _all_finished(harness, len(requests))
            await replies.wait_for(lambda bodies: len({json.loads(b)["execution_id"] for b in bodies}) >= len(requests))
        stop_replies.set()
        await collector
    finally:
        stop_replies.set()
        await broker.stop()
    _check_chaos(rows, requests, await starts(ledger), replies.bodies, retrying=retrying, events=events, seed=seed)
    for process in processes:
        assert "a message handler failed" not in process.log_path.read_text(), process.tail()


def _settled(rows: list[Any], count: int) -> bool:
    ended = all(r["status"] in ("SUCCESS", "FAILED", "TIMEOUT") and r["replied_at"] is not None for r in rows)
    return len(rows) == count and ended


async def _all_finished(harness: Any, count: int) -> list[Any]:
    """Until every execution has ended and its reply is marked sent; after 60 s, the rows as they are (the
    check then names what is missing, with the chaos that came before)."""
    try:
        return await harness.wait_for_rows(
            "SELECT * FROM executions", done=lambda rows: _settled(rows, count), timeout_s=60
        )
    except TimeoutError:
        return await harness.sql("SELECT * FROM executions")


def _check_chaos(
    rows: list[Any],
    requests: list[Any],
    started: list[str],
    replies: list[bytes],
    *,
    retrying: uuid.UUID,
    events: list[str],
    seed: int,
) -> None:
    story = f"seed {seed}, faults {events}"
    runs = collections.Counter(started)
    by_key = {
        r["parameters"]["name"] if isinstance(r["parameters"], dict) else json.loads(r["parameters"])["name"]: r
        for r in rows
    }
    assert set(by_key) == {r.parameters["name"] for r in requests}, story  # none lost
    answers: dict[str, list[tuple[str, str | None]]] = collections.defaultdict(list)
    for body in replies:
        reply = json.loads(body)
        answers[reply["execution_id"]].append((reply["status"], reply["error"]))
    for key, row in by_key.items():
        allowed = 3 if row["workflow_id"] == retrying else 1
        assert runs[key] <= min(row["attempt"], allowed), f"{key} ran {runs[key]}x, attempt {row['attempt']}; {story}"
        if row["status"] == "SUCCESS":
            assert runs[key] >= 1, story
        got = answers[str(row["id"])]
        assert got, f"{key} ({row['id']}): no reply; {story}"
        assert set(got) == {(row["status"], row["error"])}, f"{key}: replies {got} disagree with the row; {story}"
        assert row["replied_at"] is not None, story
    duplicates = sum(len(got) - 1 for got in answers.values())
    print(f"chaos {story}: {duplicates} duplicate replies (identical; callers match them by correlation id)")
