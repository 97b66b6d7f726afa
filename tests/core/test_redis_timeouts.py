"""A Redis server that stops answering (SIGSTOP: a partition, a frozen VM) fails the command within
``MODCACHE_REDIS_SOCKET_TIMEOUT_S``, the same for every client wiring builds (attack-11b T7: no socket timeout was
set, so how long a stopped master held ``sync --once`` was whatever redis-py chose)."""

from __future__ import annotations

import asyncio
import time

import pytest

from modcache import errors, keys, settings, wiring
from testkit import servers
from testkit.watching import upsert


async def test_a_stopped_redis_fails_the_sync_within_the_socket_timeout(
    database_url: str, keyspace: keys.KeySpace
) -> None:
    await upsert(database_url, {"pkg/t.py": "T = 1\n"})
    with servers.private_redis() as server:
        config = settings.Settings(
            database_url=database_url,  # type: ignore[arg-type]
            redis_url=server.url,  # type: ignore[arg-type]
            key_prefix=keyspace.prefix,
            redis_socket_timeout_s=0.5,
        )
        async with wiring.connect(config) as wired:
            await wired.engine.full_resync()  # connected, and working
            server.pause()
            try:
                started = time.monotonic()
                with pytest.raises(errors.CacheUnavailable):
                    await asyncio.wait_for(wired.engine.full_resync(), 20)  # never a hang
                assert time.monotonic() - started < 3  # redis-py's own default would wait 5 s
            finally:
                server.resume()
            await wired.engine.full_resync()  # and it comes back by itself
