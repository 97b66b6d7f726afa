"""Await a state in Redis without polling: re-check a predicate whenever a key under a prefix changes.

Redis's client-side caching in broadcast mode (``CLIENT TRACKING ON BCAST PREFIX p REDIRECT id``) sends an
invalidation for every change of a key under ``p``, by anyone, Lua scripts included; the redirect target, a
RESP2 connection subscribed to ``__redis__:invalidate``, receives them. Nothing is configured on the server,
so this works on the shared Redis too.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis


class KeyChanges:
    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, predicate: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 20.0) -> None:
        """Until ``predicate`` holds, re-checked after each change under the prefix; or fail naming ``what``."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    changed = self._changed  # taken before the check, so a change during it is not missed
                    if await predicate():
                        return
                    await changed.wait()
        except TimeoutError:
            pytest.fail(f"timed out after {timeout_s}s waiting for: {what}")


@contextlib.asynccontextmanager
async def key_changes(redis_url: str, prefix: str) -> AsyncIterator[KeyChanges]:
    name = f"modcache-test-invalidations-{uuid.uuid4().hex[:8]}"
    listener = aioredis.Redis.from_url(redis_url, client_name=name, protocol=2)  # RESP2: invalidations as messages
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    tracker = aioredis.Redis.from_url(redis_url, single_connection_client=True)
    pubsub = listener.pubsub()
    changes = KeyChanges()
    reader: asyncio.Task[None] | None = None
    try:
        await pubsub.subscribe("__redis__:invalidate")
        redirect = next(c["id"] for c in await admin.client_list() if c.get("name") == name)
        await tracker.execute_command("CLIENT", "TRACKING", "ON", "REDIRECT", redirect, "BCAST", "PREFIX", prefix)
        reader = asyncio.create_task(_read(pubsub, changes))
        yield changes
    finally:
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        await pubsub.aclose()
        for client in (tracker, admin, listener):
            await client.aclose()


async def _read(pubsub: aioredis.client.PubSub, changes: KeyChanges) -> None:
    async for message in pubsub.listen():
        if message.get("type") == "message":
            changes.notify()
