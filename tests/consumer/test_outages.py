"""Attack-10 F10: PostgreSQL backends terminated over and over while executions arrive. An outage is never taken
for a bug: no execution fails without running, no outcome is replaced by "could not be stored", nothing is
poisoned, and every caller gets exactly one reply."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import urllib.parse
from typing import Any

import asyncpg

from .test_delivery import Replies, publish, replies_on

ECHO = "def run(n):\n    return n\n"
EXECUTIONS = 40


async def terminate_forever(database_url: str, rng: random.Random) -> int:
    """pg_terminate_backend on every consumer backend of this database, every 20-80 ms, until cancelled."""
    killed = 0
    conn = await asyncpg.connect(database_url)
    try:
        while True:
            killed += len(
                await conn.fetch(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name = 'modcache-consumer'"
                )
            )
            await asyncio.sleep(rng.uniform(0.02, 0.08))  # the fault's rhythm, not a wait for an event
    except asyncio.CancelledError:
        return killed
    finally:
        await conn.close()


async def test_terminated_backends_cost_no_execution_its_outcome_or_a_second_reply(harness: Any) -> None:
    workflow_id = await harness.workflow(ECHO)
    requests = [harness.request(workflow_id, {"n": n}) for n in range(EXECUTIONS)]
    async with harness.consumer() as running, replies_on(harness.settings.required("amqp_url")) as (replies, ch):
        terminator = asyncio.create_task(terminate_forever(harness.database_url, random.Random(10)))
        try:
            for request in requests:
                await publish(ch, harness.settings.queue_name, request, replies.queue_name)
            await replies.wait_for_count(EXECUTIONS, timeout_s=120)
        finally:
            terminator.cancel()
            killed = await terminator
        rows = await harness.wait_for_rows(
            "SELECT id, status, error, result FROM executions WHERE workflow_id = $1 AND replied_at IS NOT NULL",
            workflow_id,
            done=lambda rows: len(rows) == EXECUTIONS,
            timeout_s=60,
        )
        poisoned = running.metrics.poisoned._value.get()
    assert killed > 0
    assert sorted((r["status"], r["error"]) for r in rows) == [("SUCCESS", None)] * EXECUTIONS
    assert sorted(json.loads(r["result"]) for r in rows) == list(range(EXECUTIONS))
    assert poisoned == 0
    _assert_one_reply_each(replies, requests)


def _assert_one_reply_each(replies: Replies, requests: list[Any]) -> None:
    by_execution: dict[str, int] = {}
    for body in replies.bodies:
        with contextlib.suppress(KeyError, ValueError):
            key = json.loads(body)["execution_id"]
            by_execution[key] = by_execution.get(key, 0) + 1
    assert by_execution == {str(r.execution_id): 1 for r in requests}


class Blackhole:
    """A TCP proxy to PostgreSQL that can stop forwarding (a partition: no reset, the bytes just vanish)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.cut = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Blackhole:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await src.read(65536):
                if not self.cut:  # cut: read and dropped, as a partition loses them
                    dst.write(data)
                    await dst.drain()
        dst.close()


async def test_a_consumer_cut_off_from_postgresql_hands_its_messages_to_one_that_is_not(harness: Any) -> None:
    """Consumer A reaches PostgreSQL through a link that goes silent (attack-10b N7: it sat on the messages it was
    given for the whole partition while B idled); B is direct. Every request is answered while A is cut off."""
    workflow_id = await harness.workflow(ECHO)
    url = urllib.parse.urlsplit(harness.database_url)
    async with Blackhole(url.hostname or "127.0.0.1", url.port or 5432) as link:
        cut_off = url._replace(netloc=f"{url.netloc.rpartition('@')[0]}@127.0.0.1:{link.port}".lstrip("@")).geturl()
        settings_a = {"database_url": cut_off, "db_command_timeout_s": 1.0, "transient_retry_delay_s": 0.1}
        async with harness.consumer(**settings_a), harness.consumer():
            link.cut = True
            requests = [harness.request(workflow_id, {"n": n}) for n in range(6)]
            async with replies_on(harness.settings.required("amqp_url")) as (replies, channel):
                for request in requests:
                    await publish(channel, harness.settings.queue_name, request, replies.queue_name)
                await replies.wait_for_count(len(requests), timeout_s=20)  # the partition outlasts this
    assert sorted(json.loads(b)["result"] for b in replies.bodies) == list(range(6))
