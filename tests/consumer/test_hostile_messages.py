"""Hostile messages cannot stall the consumer (issue 8, item 5), on real RabbitMQ, PostgreSQL and Redis.

Every consumer here has a concurrency (and so an AMQP prefetch) of 1: a handler that died without settling its
message would hold the only slot, and "the next message runs" would time out. Each stalling body is poisoned
with a reason naming the limit it broke, keeps its body in the poison queue, and the next message runs; a
redelivered one (the broker's answer to a consumer that died on it) is poisoned the same way; an exception
nobody expected poisons its message too; and a handler wedged past ``handler_stuck_after_s`` fails ``/livez``.
Message properties the AMQP client cannot decode (headers nested 3,000 deep: attack-8b A4) are poisoned with the
reason instead of killing the connection's reader at every redelivery. An outcome PostgreSQL would refuse fails
only its own execution, never the other organizations' outcomes recorded in the same batch (A3). While the
executor is gone the consumer is not ready and claims nothing: messages wait in the queue, not FAILED (A10). A
message naming another organization's execution id neither takes over its row nor reads its outcome (A11).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from modcache import keys
from modcache_consumer import amqp, executor, headerguard, messages, settings
from modcache_consumer import consumer as consumer_module

ECHO = "def run(**params):\n    return params\n"


def _request(parameters: str) -> bytes:
    """A request body with ``parameters`` spliced in as raw JSON text (the point is what json.dumps won't make)."""
    ids = f'"execution_id": "{uuid.uuid4()}", "workflow_id": "{uuid.uuid4()}"'
    return f'{{{ids}, "parameters": {parameters}}}'.encode()


HOSTILE = {
    "200 KB of nested [": (
        b"[" * 200_000,
        "body nests arrays/objects deeper than 32 levels (MODCACHE_MAX_MESSAGE_DEPTH)",
    ),
    "a 5,000-digit integer": (
        _request('{"n": ' + "9" * 5000 + "}"),
        "a number has more than 100 digits (MODCACHE_MAX_MESSAGE_NUMBER_DIGITS)",
    ),
    "parameters nested 900 deep": (
        _request('{"a": ' * 900 + "1" + "}" * 900),
        "body nests arrays/objects deeper than 32 levels (MODCACHE_MAX_MESSAGE_DEPTH)",
    ),
    "a NUL byte": (
        _request('{"a": "x\x00y"}'),
        "body holds a NUL byte at offset 134",
    ),
    "an escaped NUL in parameters": (
        _request('{"a": ["ok", {"b": "x\\u0000y"}]}'),
        "parameters: a string holds a NUL character (\\u0000), which PostgreSQL cannot store",
    ),
    "a 5 MB body": (
        _request('{"pad": "' + "x" * 5 * 1024**2 + '"}'),
        "body is larger than 1048576 bytes (MODCACHE_MAX_MESSAGE_BYTES)",
    ),
}


@pytest.mark.parametrize(("body", "reason"), list(HOSTILE.values()), ids=list(HOSTILE))
async def test_a_stalling_message_is_poisoned_with_its_reason_and_the_next_one_runs(
    harness: Any, body: bytes, reason: str
) -> None:
    workflow_id = await harness.workflow(ECHO)
    async with harness.consumer(consumer_concurrency=1) as consumer:
        await (await harness.caller()).publish_raw(body)
        (poisoned,) = await harness.poisoned(1)
        reply = await harness.call(workflow_id, {"next": "runs"}, timeout_s=30)
        assert consumer.metrics.poisoned._value.get() == 1
    assert poisoned.headers[keys.POISON_REASON_HEADER] == reason
    assert poisoned.body == body  # moved, not lost: the producer's team can read what they sent
    assert (reply["status"], reply["result"]) == ("SUCCESS", {"next": "runs"})


class Recording(consumer_module.WorkflowExecutionConsumer):
    """Records the ``redelivered`` flag of every message it gets (our own seam)."""

    redelivered: list[bool]

    async def _handle(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.redelivered.append(message.redelivered)
        await super()._handle(message)


async def test_a_redelivered_stalling_message_after_a_restart_is_poisoned_too(harness: Any) -> None:
    body, reason = HOSTILE["200 KB of nested ["]
    workflow_id = await harness.workflow(ECHO)
    await (await harness.caller()).publish_raw(body)
    # A consumer that died holding it: delivered, never settled, its channel gone; the broker requeues it.
    connection = await aio_pika.connect(harness.settings.required("amqp_url"))
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(harness.names.queue)
        taken = await queue.get(no_ack=False, timeout=10)
        assert taken is not None
        assert taken.body == body
    recording = Recording(settings=harness.settings.model_copy(update={"consumer_concurrency": 1}))
    recording.redelivered = []
    async with recording:
        (poisoned,) = await harness.poisoned(1)
        reply = await harness.call(workflow_id, {"after": "restart"}, timeout_s=30)
    assert recording.redelivered == [True, False]
    assert poisoned.headers[keys.POISON_REASON_HEADER] == reason
    assert reply["result"] == {"after": "restart"}


class Surprising(consumer_module.WorkflowExecutionConsumer):
    """Raises what no one planned for on the first message (a bug at our own seam), then behaves."""

    surprised = False

    async def prepare(self, request: messages.ExecutionRequest) -> Any:
        if not self.surprised:
            self.surprised = True
            raise RecursionError("maximum recursion depth exceeded")
        return await super().prepare(request)


async def test_an_unexpected_exception_poisons_the_message_with_a_reason_and_the_next_one_runs(harness: Any) -> None:
    workflow_id = await harness.workflow(ECHO)
    first = harness.request(workflow_id)
    async with Surprising(settings=harness.settings.model_copy(update={"consumer_concurrency": 1})):
        await (await harness.caller()).publish(first, wait=False)
        (poisoned,) = await harness.poisoned(1)
        reply = await harness.call(workflow_id, {"n": 2}, timeout_s=30)
    reason = poisoned.headers[keys.POISON_REASON_HEADER]
    assert reason == "internal error: RecursionError: maximum recursion depth exceeded"
    assert json.loads(poisoned.body)["execution_id"] == str(first.execution_id)
    assert reply["result"] == {"n": 2}


class Wedged(consumer_module.WorkflowExecutionConsumer):
    """Its first handler hangs in ``prepare`` until released (a socket read with no timeout, say)."""

    entered: asyncio.Event
    release: asyncio.Event

    async def prepare(self, request: messages.ExecutionRequest) -> Any:
        self.entered.set()
        await self.release.wait()
        return await super().prepare(request)


async def test_a_handler_wedged_past_the_bound_fails_livez_until_it_ends(harness: Any) -> None:
    now = [1000.0]
    workflow_id = await harness.workflow(ECHO)
    request = harness.request(workflow_id, {"n": 1})
    bounded = harness.settings.model_copy(update={"consumer_concurrency": 1, "handler_stuck_after_s": 60.0})
    wedged = Wedged(settings=bounded, monotonic=lambda: now[0])
    wedged.entered, wedged.release = asyncio.Event(), asyncio.Event()
    async with wedged:
        livez = f"http://127.0.0.1:{wedged.health_port}/livez"
        await (await harness.caller()).publish(request, wait=False)
        await asyncio.wait_for(wedged.entered.wait(), 30)
        now[0] += 60.0
        at_the_bound = await asyncio.to_thread(_get, livez)
        now[0] += 1.0
        past_it = await asyncio.to_thread(_get, livez)
        wedged.release.set()
        row = await harness.wait_for_status(request.execution_id, "SUCCESS")
        # With a prefetch of 1 the next message arrives only once the wedged one was acknowledged.
        following = await harness.call(workflow_id, {"n": 2}, timeout_s=30)
        after = await asyncio.to_thread(_get, livez)
    assert at_the_bound == (200, "ok\n")
    assert past_it == (
        503,
        "a message handler has been running for 61 s, longer than 60 s (MODCACHE_HANDLER_STUCK_AFTER_S)\n",
    )
    assert json.loads(row["result"]) == {"n": 1}
    assert following["result"] == {"n": 2}
    assert after == (200, "ok\n")


def test_the_default_bound_outlasts_the_slowest_legitimate_execution() -> None:
    s = settings.ConsumerSettings(execution_timeout_s=1800.0, terminate_grace_s=5.0)
    assert s.handler_bound_s == 1800.0 + 5.0 + 300.0
    assert settings.ConsumerSettings(handler_stuck_after_s=90.0).handler_bound_s == 90.0


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# -- message properties the AMQP client cannot decode (attack-8b A4) -----------------------------------------

#: The attacker's publisher, in a process of its own: it raises its own recursion limit to encode what it sends
#: (the consumer, in this test's process, decodes it at the ordinary limit), or rewrites the encoded properties.
PUBLISH = """
import asyncio, datetime, sys
import aio_pika, pamqp.encode, pamqp.header
url, queue, how, body = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].encode()
sys.setrecursionlimit(100_000)
headers, options = {}, {}
if how == "deep":
    nested = {"leaf": 1}
    for _ in range(3000):
        nested = {"n": nested}
    headers["x"] = nested
elif how == "utf-8":  # an invalid UTF-8 content type, spliced into the encoded frame
    options["content_type"] = "@@"
    encode = pamqp.header.ContentHeader.marshal
    pamqp.header.ContentHeader.marshal = lambda self: encode(self).replace(b"\\x02@@", b"\\x02\\xff\\xfe")
elif how == "timestamp":  # a timestamp no datetime holds
    options["timestamp"] = datetime.datetime(2020, 1, 1)
    pamqp.encode.METHODS["timestamp"] = lambda value: (2**64 - 1).to_bytes(8, "big")
async def main():
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        message = aio_pika.Message(body, headers=headers, delivery_mode=2, **options)
        await channel.default_exchange.publish(message, routing_key=queue)
asyncio.run(main())
"""

UNDECODABLE = {
    "headers nested 3,000 deep": (
        "deep",
        "message properties could not be decoded: ValueError: a table or array nested deeper than 32 levels",
    ),
    "invalid UTF-8 in a property": (
        "utf-8",
        "message properties could not be decoded: UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in "
        "position 0: invalid start byte",
    ),
    "a timestamp out of range": (
        "timestamp",
        "message properties could not be decoded: ValueError: year 584556019 is out of range",
    ),
}


async def publish_hostile(harness: Any, how: str, body: bytes) -> None:
    publisher = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PUBLISH, harness.settings.required("amqp_url"), harness.names.queue, how, body.decode()
    )
    assert await publisher.wait() == 0


async def other_orgs(consumer: Any) -> tuple[uuid.UUID, uuid.UUID]:
    return (
        await consumer.configs.put_organization(f"A-{uuid.uuid4().hex[:6]}"),
        await consumer.configs.put_organization(f"B-{uuid.uuid4().hex[:6]}"),
    )


@pytest.mark.parametrize(("how", "reason"), list(UNDECODABLE.values()), ids=list(UNDECODABLE))
async def test_properties_the_client_cannot_decode_are_poisoned_and_the_next_message_runs(
    harness: Any, how: str, reason: str
) -> None:
    workflow_id = await harness.workflow(ECHO)
    async with harness.consumer(consumer_concurrency=1, amqp_reconnect_interval_s=0.1) as consumer:
        org_a, org_b = await other_orgs(consumer)
        body = harness.request(workflow_id, {"from": "a"}, organization_id=org_a).encode()
        await publish_hostile(harness, how, body)
        (poisoned,) = await harness.poisoned(1)
        reply = await harness.call(workflow_id, {"from": "b"}, organization_id=org_b, timeout_s=30)
        livez = await asyncio.to_thread(_get, f"http://127.0.0.1:{consumer.health_port}/livez")
        reconnects = consumer.metrics.broker_reconnects._value.get()
    assert poisoned.headers[keys.POISON_REASON_HEADER] == reason
    assert poisoned.body == body
    assert (reply["status"], reply["result"]) == ("SUCCESS", {"from": "b"})
    assert reconnects == 0  # the connection never dropped
    assert livez == (200, "ok\n")


class Counting(consumer_module.WorkflowExecutionConsumer):
    """Tells when its AMQP client failed (our seam), for the test without the guard."""

    failures: asyncio.Queue[None]

    def client_failed(self) -> None:
        self.failures.put_nowait(None)


async def test_without_the_guard_the_client_dying_on_a_message_fails_livez(harness: Any) -> None:
    """What the guard prevents, and what would still notice it: the client library's reader dies on the deep
    headers (RecursionError) at every redelivery; after 3 such failures /livez fails, so Kubernetes restarts the
    consumer and someone looks. With the guard back the same consumer poisons the message and the queue moves."""
    workflow_id = await harness.workflow(ECHO)
    counting = Counting(
        settings=harness.settings.model_copy(update={"consumer_concurrency": 1, "amqp_reconnect_interval_s": 0.1})
    )
    counting.failures = asyncio.Queue()
    async with counting:
        livez = f"http://127.0.0.1:{counting.health_port}/livez"
        headerguard.uninstall()
        try:
            await publish_hostile(harness, "deep", harness.request(workflow_id).encode())
            for _ in range(consumer_module.CLIENT_FAILURES_LIMIT):
                await asyncio.wait_for(counting.failures.get(), 30)
            stalled = await asyncio.to_thread(_get, livez)
        finally:
            headerguard.install()
        (poisoned,) = await harness.poisoned(1)
        reply = await harness.call(workflow_id, {"then": "runs"}, timeout_s=30)
    status, reason = stalled
    assert status == 503
    assert reason.startswith(  # where the recursion limit hits (its wording) depends on the stack's depth
        "the AMQP client failed 3 times within 300 s on what the broker sent (last: RecursionError: maximum "
        "recursion depth exceeded"
    )
    assert reason.endswith("); a message it cannot decode stalls the queue\n")
    assert poisoned.headers[keys.POISON_REASON_HEADER].startswith("message properties could not be decoded")
    assert reply["result"] == {"then": "runs"}


# -- outcomes recorded together (attack-8b A3) ----------------------------------------------------------------

#: Org A's workflow: an outcome PostgreSQL would refuse, returned plainly or forged as the execution's own result
#: frame (then it exits before the runtime sends the real one).
UNSTORABLE = r"""
import os, socket, stat, struct
def _forge(frame):
    for fd in map(int, os.listdir('/proc/self/fd')):
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            socket.socket(fileno=os.dup(fd)).sendall(struct.pack('>I', len(frame)) + frame.encode())
            os._exit(0)
def run(how):
    if how == 'surrogate result':
        return '\ud800'
    if how == 'surrogate error':
        raise ValueError('bad file name ' + b'\xff'.decode('utf-8', 'surrogateescape'))
    if how == 'forged NaN':
        _forge('{"op": "result", "status": "SUCCESS", "result": [NaN], "error": null, "timings_ms": {}}')
    if how == 'forged NUL':
        _forge('{"op": "result", "status": "FAILED", "result": null, "error": "x\\u0000y", "timings_ms": {}}')
"""

STORED_AS = {
    "surrogate result": (
        "sent a result that cannot be recorded: the result holds an unpaired surrogate (\\ud800-\\udfff), which is"
        " not Unicode"
    ),
    "surrogate error": "ValueError: bad file name \\udcff",
    "forged NaN": "sent a result that cannot be recorded: the result holds NaN, which is not JSON and which PostgreSQL"
    " cannot store",
    "forged NUL": "x\\x00y",
}


class Together(consumer_module.WorkflowExecutionConsumer):
    """Holds each outcome until ``expected`` executions have finished: they are then group-committed in one batch
    (what the attacker arranged by making them finish at the same instant)."""

    expected: int
    finished: list[uuid.UUID]
    all_in: asyncio.Event

    async def record(self, lease: Any, outcome: messages.Outcome) -> messages.Outcome | None:
        self.finished.append(lease.execution_id)
        if len(self.finished) == self.expected:
            self.all_in.set()
        await self.all_in.wait()
        return await super().record(lease, outcome)


@contextlib.asynccontextmanager
async def together(harness: Any, expected: int) -> AsyncIterator[Together]:
    consumer = Together(settings=harness.settings.model_copy(update={"consumer_concurrency": expected}))
    consumer.expected, consumer.finished, consumer.all_in = expected, [], asyncio.Event()
    async with consumer:
        yield consumer


async def batched_with_victims(harness: Any, consumer: Any, how: str) -> tuple[list[Any], list[Any], list[str]]:
    """3 executions of org A's UNSTORABLE and 3 of org B's ECHO, recorded in one batch: the replies, and B's ns."""
    org_a, org_b = await other_orgs(consumer)
    hostile, benign = await harness.workflow(UNSTORABLE), await harness.workflow(ECHO)
    ns = [uuid.uuid4().hex for _ in range(3)]
    replies = await asyncio.gather(
        *(harness.call(hostile, {"how": how}, organization_id=org_a) for _ in range(3)),
        *(harness.call(benign, {"n": n}, organization_id=org_b) for n in ns),
    )
    return list(replies[:3]), list(replies[3:]), ns


@pytest.mark.parametrize("how", list(STORED_AS))
async def test_an_unstorable_outcome_fails_only_its_own_execution_not_its_batch(harness: Any, how: str) -> None:
    async with together(harness, 6) as consumer:
        attackers, victims, ns = await batched_with_victims(harness, consumer, how)
    assert [(v["status"], v["result"]) for v in victims] == [("SUCCESS", {"n": n}) for n in ns]
    for reply in attackers:
        assert (reply["status"], reply["result"]) == ("FAILED", None)
        assert STORED_AS[how] in reply["error"]
        row = await harness.execution(uuid.UUID(reply["execution_id"]))
        assert (row["status"], row["error"]) == ("FAILED", reply["error"])  # stored as replied


async def test_a_batch_the_database_refuses_is_recorded_item_by_item(harness: Any, monkeypatch: Any) -> None:
    """Should the check before batching miss something, PostgreSQL refuses the batch; it is flushed again one
    outcome at a time: the victims' outcomes are recorded, and the refused one becomes FAILED saying why."""
    monkeypatch.setattr(messages, "outcome_problem", lambda *_, **__: None)
    async with together(harness, 6) as consumer:
        attackers, victims, ns = await batched_with_victims(harness, consumer, "surrogate result")
    assert [(v["status"], v["result"]) for v in victims] == [("SUCCESS", {"n": n}) for n in ns]
    for reply in attackers:
        assert (reply["status"], reply["result"]) == ("FAILED", None)
        assert reply["error"].startswith("the outcome could not be stored: "), reply["error"]
        assert "invalid input syntax for type json" in reply["error"]  # PostgreSQL's own reason, passed on


# -- the executor goes away (attack-8b A10) --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def executor_socket() -> AsyncIterator[Path]:
    """A directory of /run for the executor's socket (not one of the executions' scratch mounts)."""
    directory = Path("/run") / f"modcache-test-{uuid.uuid4().hex[:8]}"
    directory.mkdir(mode=0o755)
    try:
        yield directory / "executor.sock"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def start_executor(path: Path) -> asyncio.subprocess.Process:
    """``modcache executor --socket`` (the chart's executor container; the consumer retries until it listens)."""
    template = ("-m", "modcache_consumer.template", "--socket", str(path), "--consumer-uid", str(os.getuid()))
    return await asyncio.create_subprocess_exec(sys.executable, *template)


async def stop(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()


class Gated(consumer_module.WorkflowExecutionConsumer):
    """Tells which requests it turned away because the executor was unavailable (our seam), and can lose its
    executor right after a claim (``lose_after_claim``: what a crash at that moment looks like)."""

    turned_away: asyncio.Queue[uuid.UUID]
    lose_after_claim: asyncio.subprocess.Process | None = None

    async def prepare(self, request: messages.ExecutionRequest) -> Any:
        try:
            return await super().prepare(request)
        except executor.ExecutorUnavailable:
            self.turned_away.put_nowait(request.execution_id)
            raise

    async def _execute(self, request: messages.ExecutionRequest, prepared: Any, **options: Any) -> Any:
        if self.lose_after_claim is not None:
            process, self.lose_after_claim = self.lose_after_claim, None
            await stop(process)
            await self.executor.lost()
        return await super()._execute(request, prepared, **options)


@contextlib.asynccontextmanager
async def gated(harness: Any, path: Path) -> AsyncIterator[Gated]:
    update = {"executor_socket": str(path), "worker_start_timeout_s": 2.0, "consumer_concurrency": 2}
    consumer = Gated(settings=harness.settings.model_copy(update=update))
    consumer.turned_away = asyncio.Queue()
    async with consumer:
        yield consumer


async def test_while_the_executor_is_gone_the_consumer_is_not_ready_and_takes_no_message(harness: Any) -> None:
    workflow_id = await harness.workflow(ECHO)
    async with executor_socket() as path:
        first = await start_executor(path)
        try:
            async with gated(harness, path) as consumer:
                readyz = f"http://127.0.0.1:{consumer.health_port}/readyz"
                org_a, org_b = await other_orgs(consumer)
                before = await harness.call(workflow_id, {"org": "a"}, organization_id=org_a)
                await stop(first)  # crashed, OOM-killed, restarting
                await consumer.executor.lost()
                gone = await asyncio.to_thread(_get, readyz)
                request = harness.request(workflow_id, {"org": "b"}, organization_id=org_b)
                caller = await harness.caller()
                await caller.publish(request)
                assert await asyncio.wait_for(consumer.turned_away.get(), 30) == request.execution_id
                untouched = await harness.execution(request.execution_id)
                second = await start_executor(path)  # back
                try:
                    reply = await caller.result(request.execution_id, timeout_s=60)
                    back = await asyncio.to_thread(_get, readyz)
                finally:
                    await stop(second)
        finally:
            await stop(first)
    assert before["result"] == {"org": "a"}
    assert gone == (503, "executor unavailable\n")
    assert untouched is None  # not claimed, not failed: requeued
    assert (reply["status"], reply["result"]) == ("SUCCESS", {"org": "b"})
    row = await harness.execution(request.execution_id)
    assert (row["status"], row["attempt"]) == ("SUCCESS", 1)
    assert back == (200, "ok\n")


async def test_an_executor_lost_right_after_the_claim_queues_the_execution_again(harness: Any) -> None:
    """The window the readiness check cannot close: the executor goes away between the claim (the message is
    acknowledged then) and the run. Nothing ran, so the execution is PENDING again, without using an attempt,
    and its message is published again; it runs once the executor is back."""
    workflow_id = await harness.workflow(ECHO)
    async with executor_socket() as path:
        first = await start_executor(path)
        try:
            async with gated(harness, path) as consumer:
                org_b = await consumer.configs.put_organization(f"B-{uuid.uuid4().hex[:6]}")
                consumer.lose_after_claim = first
                request = harness.request(workflow_id, {"org": "b"}, organization_id=org_b)
                caller = await harness.caller()
                await caller.publish(request)
                assert await asyncio.wait_for(consumer.turned_away.get(), 60) == request.execution_id
                pending = await harness.execution(request.execution_id)
                second = await start_executor(path)
                try:
                    reply = await caller.result(request.execution_id, timeout_s=60)
                finally:
                    await stop(second)
        finally:
            await stop(first)
    assert (pending["status"], pending["attempt"], pending["error"]) == ("PENDING", 0, None)
    assert (reply["status"], reply["result"]) == ("SUCCESS", {"org": "b"})
    row = await harness.execution(request.execution_id)
    assert (row["status"], row["attempt"]) == ("SUCCESS", 1)


# -- a message naming another organization's execution id (attack-8b A11) --------------------------------------

PAY = "def run(amount):\n    return {'paid': amount}\n"


@pytest.mark.parametrize("posing_as", ["its own workflow", "the victim's workflow"])
async def test_a_message_cannot_take_over_or_read_another_organizations_execution(harness: Any, posing_as: str) -> None:
    """Org A publishes requests naming two of org B's execution ids: a finished one (its stored outcome would be
    sent to A's reply queue) and a PENDING one (a crash-policy retry waiting for its republished message, which
    A's run would take over). Both are poisoned with the reason; B's rows are untouched, nothing reaches A, and
    B's retry then runs with B's own result."""
    async with harness.consumer(consumer_concurrency=1) as consumer:
        org_a, org_b = await other_orgs(consumer)
        attackers = await harness.workflow("def run(**_):\n    return 'attacker result'\n", organization_id=org_a)
        victims = await harness.workflow(PAY, organization_id=org_b, retries_on_crash=1)
        done, pending = uuid.uuid4(), uuid.uuid4()
        caller = await harness.caller()
        await harness.sql(
            "INSERT INTO executions (id, workflow_id, organization_id, status, parameters, result, attempt, "
            "max_attempts) VALUES ($1, $2, $3, 'SUCCESS', '{\"amount\": 100}', '{\"paid\": 100}', 1, 1)",
            done,
            victims,
            org_b,
        )
        await harness.sql(
            "INSERT INTO executions (id, workflow_id, organization_id, status, parameters, attempt, max_attempts) "
            "VALUES ($1, $2, $3, 'PENDING', '{\"amount\": 250}', 1, 2)",
            pending,
            victims,
            org_b,
        )
        before = {row["id"]: dict(row) for row in await harness.sql("SELECT * FROM executions")}
        workflow_id = attackers if posing_as == "its own workflow" else victims
        for execution_id in (done, pending):
            await caller.publish(harness.request(workflow_id, {}, organization_id=org_a, execution_id=execution_id))
        poisoned = await harness.poisoned(2)
        await consumer.idle()
        after = {row["id"]: dict(row) for row in await harness.sql("SELECT * FROM executions")}
        answered = [caller._pending[str(i)].done() for i in (done, pending)]
        caller._pending.clear()  # the victim's caller waits on the same ids below
        retry = await harness.call(victims, {"amount": 250}, organization_id=org_b, execution_id=pending)
        other = await harness.call(victims, {"amount": 5}, organization_id=org_b)
    reasons = sorted(message.headers[keys.POISON_REASON_HEADER] for message in poisoned)
    assert reasons == sorted(
        f"execution id {i} belongs to another execution (its workflow, organization or parameters differ)"
        for i in (done, pending)
    )
    assert after == before
    assert answered == [False, False]
    assert (retry["status"], retry["result"]) == ("SUCCESS", {"paid": 250})
    assert (other["status"], other["result"]) == ("SUCCESS", {"paid": 5})
    row = await harness.execution(pending)
    assert (row["organization_id"], row["attempt"], row["status"]) == (org_b, 2, "SUCCESS")


async def test_a_stored_outcome_is_replied_to_a_request_for_the_same_execution(harness: Any) -> None:
    """What the check keeps: another caller's request for a finished execution (same workflow, organization,
    parameters) is answered from storage, not run again."""
    async with harness.consumer(consumer_concurrency=1) as consumer:
        _, org_b = await other_orgs(consumer)
        victims = await harness.workflow(PAY, organization_id=org_b)
        first = await harness.call(victims, {"amount": 7}, organization_id=org_b)
        execution_id = uuid.UUID(first["execution_id"])
        request = harness.request(victims, {"amount": 7}, organization_id=org_b, execution_id=execution_id)
        async with amqp.caller(harness.settings.required("amqp_url"), queue=harness.names.queue) as another:
            await another.publish(request)
            again = await another.result(request.execution_id, timeout_s=30)
    assert first["result"] == again["result"] == {"paid": 7}
    assert again["duration_ms"] == first["duration_ms"]  # the stored outcome
