"""A Redis list test workflows append to: executions cannot reach a test's files (their ``/tmp`` is private and
they run as another uid), so "how often did it run" is counted where both sides can reach."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

#: Prepend to a workflow's code: ``note(url, key, what)`` appends ``what`` to the ledger.
LEDGER = "import redis\n\ndef note(url, key, what):\n    redis.Redis.from_url(url).rpush(key, what)\n"


class Ledger:
    def __init__(self, client: aioredis.Redis, *, url: str, key: str) -> None:
        self._client = client
        self.params = {"url": url, "key": key}

    async def entries(self) -> list[str]:
        return [str(e) for e in await self._client.lrange(self.params["key"], 0, -1)]

    async def wait_for(self, count: int, *, timeout_s: float = 30.0) -> list[str]:
        """Poll (another process appends) until the ledger holds ``count`` entries."""
        async with asyncio.timeout(timeout_s):
            while len(entries := await self.entries()) < count:  # noqa: ASYNC110 -- another process writes
                await asyncio.sleep(0.02)
        return entries
