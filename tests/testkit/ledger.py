"""A Redis list hostile or benign workflows append to: what ran, counted from outside the consumer.

Executions cannot reach the test's files (their ``/tmp`` is private), so they append to a list in Redis and
announce each append on a channel of the same name, which the test awaits instead of polling the list.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

LEDGER = (
    "import redis\n\n"
    "def note(url, key, what):\n"
    "    client = redis.Redis.from_url(url)\n"
    "    client.rpush(key, what)\n"
    "    client.publish(key, what)\n"
)


class Ledger:
    def __init__(self, client: aioredis.Redis, *, url: str, key: str) -> None:
        self._client = client
        self.params = {"url": url, "key": key}

    async def entries(self) -> list[str]:
        return [str(e) for e in await self._client.lrange(self.params["key"], 0, -1)]

    async def wait_for(self, count: int, *, timeout_s: float = 30.0) -> list[str]:
        """Until the ledger holds ``count`` entries: re-read after every announced append (subscribed before the
        first read, so no append falls between them)."""
        async with self._client.pubsub() as announcements, asyncio.timeout(timeout_s):
            await announcements.subscribe(self.params["key"])
            while len(entries := await self.entries()) < count:
                await announcements.get_message(ignore_subscribe_messages=True, timeout=None)
        return entries
