"""A Redis restart under a running watcher (no persistence: the server comes back empty)."""

from __future__ import annotations

import redis.asyncio as aioredis

from modcache import keys, pgsource
from testkit import convergence
from testkit.polling import eventually
from testkit.servers import PrivateRedis
from testkit.watching import put_modules, watching_quick

KS = keys.KeySpace()
WITHIN_S = 5.0


async def test_after_a_restart_of_redis_key_events_come_back_and_the_reconnect_compares_every_value(
    server: PrivateRedis, client: aioredis.Redis, source: pgsource.PgSource, database_url: str
) -> None:
    """The subscription reconnected, but its canary (the write that proves events arrive) went out on a pooled
    connection the restart had closed: it failed, nothing tried it again, and the watcher stayed without key events
    for good (no "keyspace events on", no reconnect deep resync; every later fault waited for the periodic resync).
    When the subscription did come back, the reconnect's deep resync could fail the same way, once, and was not tried
    again before the periodic resync (2 runs in 5 here). Found by ``./dev bench core_faults`` (its restart class never
    saw the deep resync in 120 s)."""
    await put_modules(source, 30)
    async with watching_quick(source, server.url, KS, database_url) as (w, task, recorder):
        assert w.state.keyspace_active
        server.stop()
        server.start()
        await eventually(lambda: not w.state.keyspace_active, WITHIN_S)
        deep = sum(1 for r, t in recorder.syncs if r.deep)
        await eventually(lambda: w.state.keyspace_active, WITHIN_S)
        try:
            await recorder.wait_for(lambda: sum(1 for r, t in recorder.syncs if r.deep) > deep, timeout_s=WITHIN_S)
        except TimeoutError:
            failed = [(str(e), t) for e, t in recorder.failures]
            raise AssertionError(f"no deep resync after the reconnect: {failed}") from None
        assert not await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
        await client.delete(KS.content("pkg/m3.py"))  # a fault after the restart is heard again
        assert not await convergence.converged(database_url, client, KS.prefix, within_s=2.0)
        assert not task.done()
