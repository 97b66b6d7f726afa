"""Redis Sentinel (issue 11): one master, one replica, three sentinels of the test's own (``testkit.topologies``).

The watcher is built from a ``redis+sentinel://`` URL by ``wiring``; the master is SIGKILLed, the sentinels promote
the replica, and a change committed meanwhile must reach the new master with nobody reconnecting anything by hand;
the key events are subscribed again on the new master and a full resync runs after the master change. The
consumer's Redis reader (its readiness guard, on wiring's client) keeps answering across the failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as redis

from modcache import engine, errors, keys, settings, watcher, wiring
from modcache_consumer import readiness
from testkit import convergence, servers, topologies
from testkit.observers import Recorder
from testkit.watching import upsert, watch_settings, watching

PREFIX = keys.DEFAULT_PREFIX
WITHIN_S = 30.0  # a failover here takes 2-4 s (down-after-milliseconds 1000, then the election)


@pytest.fixture(scope="module")
def sentinel() -> Iterator[topologies.Sentinel]:
    with topologies.sentinel_redis() as topology:
        yield topology


def test_a_sentinel_url_names_the_service_and_database() -> None:
    config = settings.Settings(redis_url="redis+sentinel://u:secret@h1:26379,h2/cache/3")  # type: ignore[arg-type]
    endpoint = config.redis_endpoint()
    assert endpoint is not None
    assert (endpoint.service, endpoint.db, endpoint.hosts) == ("cache", 3, (("h1", 26379), ("h2", 26379)))
    assert (endpoint.username, endpoint.password) == ("u", "secret")
    assert "secret" not in endpoint.describe()
    assert "secret" not in repr(endpoint)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+sentinel://h1:26379", "names no Sentinel service"),
        ("redis+sentinel://h1:26379/cache/x", "the database must be a number of ASCII digits (0, 1, ...), not 'x'"),
        # str.isdigit takes these, and int() reads them: 2 and 26379 (the input is named, it holds no secret)
        ("redis+sentinel://h1:26379/cache/²", "the database must be a number of ASCII digits (0, 1, ...), not '²'"),
        ("redis+sentinel://h1:٢٦٣٧٩/cache", "the port of 'h1' must be a number from 1 to 65535, in ASCII digits"),
        ("redis://h1:6379/0?db=\u0661", "not '\u0661'"),  # ARABIC-INDIC DIGIT ONE
        ("redis://h1:6³79/0", "the port of 'h1' must be a number from 1 to 65535, in ASCII digits"),
        ("redis+sentinel://[::1:26379/cache", "an IPv6 address has no closing bracket: write it [::1]:26379"),
        ("redis://[::1:6379/0", "an IPv6 address has no closing bracket: write it [::1]:6379"),
        ("redis+sentinel:///cache", "names no host"),
        ("redis://h1:6379,h2:6379/0", "several hosts need redis+sentinel:// or redis+cluster://"),
        (
            "redis+sentinel://h1:26379/cache?db=3",
            "takes no query parameters (it has db): the database goes in the path",
        ),
        ("rediss+sentinel://h1/cache/0?ssl_cert_reqs=none", "(it has ssl_cert_reqs)"),
        ("redis+cluster://h1:6379?db=1", "takes no query parameters (it has db): the database is 0"),
        ("redis+sentinel://h1:26379,h2,H1/cache", "lists H1:26379 twice: list each sentinel node once"),
        ("redis+cluster://h1:6379,h1:6379", "lists h1:6379 twice: list each cluster node once"),
    ],
)
def test_a_malformed_sentinel_url_is_a_config_error(url: str, reason: str) -> None:
    with pytest.raises(errors.ConfigError, match="MODCACHE_REDIS_URL") as caught:
        settings.Settings.from_env(redis_url=url)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("postgresql://u@[::1:5432/db", "an IPv6 address has no closing bracket: write it [::1]:5432"),
        ("postgresql://u@h1:٥٤٣٢,h2/db", "the port of 'h1' must be a number from 1 to 65535, in ASCII digits"),
    ],
)
def test_a_malformed_postgres_url_is_a_config_error_naming_the_input(url: str, reason: str) -> None:
    with pytest.raises(errors.ConfigError, match="MODCACHE_DATABASE_URL") as caught:
        settings.Settings.from_env(database_url=url)
    assert reason in str(caught.value)


async def test_a_lying_first_sentinel_is_outvoted_by_the_others(
    sentinel: topologies.Sentinel, database_url: str
) -> None:
    """The attack: the first sentinel listed names another, writable node (a rogue group, or a sentinel that was
    partitioned away during a failover and still names the old master). redis-py alone believes the first
    sentinel that answers; modcache believes only what a majority of the configured sentinels say."""
    with servers.private_redis() as wrong, topologies.rogue_sentinels(wrong.port) as rogues:
        url = sentinel.url(sentinels=[rogues[0], *sentinel.sentinels[:2]])  # three sentinels, the first one lies
        config = settings.Settings(database_url=database_url, redis_url=url)  # type: ignore[arg-type]
        await upsert(database_url, {"pkg/truth.py": "T = 1\n"})
        async with wiring.connect(config) as wired:
            await wired.engine.full_resync()
        wrong_node = redis.Redis(port=wrong.port, decode_responses=True)
        master = redis.Redis(port=sentinel.master_port(), decode_responses=True)
        try:
            assert await wrong_node.keys("*") == []  # nothing was written to the node the liar names
            assert json.loads(await master.get(f"{PREFIX}pkg/truth.py"))["content"] == "T = 1\n"
        finally:
            await wrong_node.aclose()
            await master.aclose()


async def test_one_sentinel_listed_under_two_names_votes_once(sentinel: topologies.Sentinel, database_url: str) -> None:
    """attack-11b T9: a rogue sentinel listed twice, as ``127.0.0.1:P`` and ``localhost:P``, beside one real one:
    the majority counted URL entries, two of three named the rogue's node, and the whole cache was written there.
    Now a sentinel votes once (its run id, ``SENTINEL MYID``): no majority, nothing written, and the message says
    which entries are one sentinel."""
    with servers.private_redis() as wrong, topologies.rogue_sentinels(wrong.port) as rogues:
        hosts = f"127.0.0.1:{rogues[0].port},localhost:{rogues[0].port},127.0.0.1:{sentinel.sentinels[0].port}"
        message = await _refused_writing_nothing(database_url, f"{hosts}/{sentinel.service}", wrong.port)
    assert f"localhost:{rogues[0].port}: the same address as 127.0.0.1:{rogues[0].port}, counted once" in message
    assert "named by a majority (2 of 3) of the sentinels" in message


async def _refused_writing_nothing(database_url: str, sentinels_and_service: str, wrong_port: int) -> str:
    """A full resync through ``redis+sentinel://SENTINELS/SERVICE/0`` fails, and nothing reached the node at
    ``wrong_port`` (the one the rogue names); the error's message."""
    config = settings.Settings(
        database_url=database_url, redis_url=f"redis+sentinel://{sentinels_and_service}/0"
    )  # type: ignore[arg-type]
    await upsert(database_url, {"pkg/rogue.py": "R = 1\n"})
    async with wiring.connect(config) as wired:
        with pytest.raises(errors.CacheUnavailable) as caught:
            await wired.engine.full_resync()
    wrong_node = redis.Redis(port=wrong_port, decode_responses=True)
    try:
        assert await wrong_node.keys("*") == []
    finally:
        await wrong_node.aclose()
    return str(caught.value)


async def test_a_sentinel_that_hides_its_run_id_gets_no_vote(sentinel: topologies.Sentinel, database_url: str) -> None:
    """attack-11c U1: the rogue denies ``SENTINEL MYID`` (an ACL; Redis before 6.2 has no MYID at all) and is listed
    under two addresses that resolve apart (it listens on 127.0.0.1 and 127.0.0.2): with no run id the duplicate was
    not seen, and its two votes outvoted the real sentinel. A sentinel that does not report its run id gets no vote."""
    with (
        servers.private_redis() as wrong,
        topologies.rogue_sentinels(wrong.port, bind="127.0.0.1 127.0.0.2") as rogues,
    ):
        rogue = rogues[0]
        rogue.cli("ACL", "SETUSER", "default", "-sentinel|myid")
        assert "NOPERM" in rogue.cli("SENTINEL", "MYID")  # the attack's premise
        hosts = f"127.0.0.1:{rogue.port},127.0.0.2:{rogue.port},127.0.0.1:{sentinel.sentinels[0].port}"
        message = await _refused_writing_nothing(database_url, f"{hosts}/{sentinel.service}", wrong.port)
    assert f"127.0.0.1:{rogue.port}: names 127.0.0.1:{wrong.port}, but did not report its run id" in message
    assert "named by a majority (2 of 3) of the sentinels" in message


async def test_a_spoofed_run_id_is_refused_naming_both_entries(sentinel: topologies.Sentinel) -> None:
    """attack-11c U2: a rogue listed first claims a real sentinel's run id (``sentinel myid``; run ids are public,
    announced on the monitored master): the real sentinel's vote was dropped as a duplicate, and modcache could not
    write at all. One run id naming two masters is a conflict, not a duplicate: no master is picked, and the error
    names both entries and what each said."""
    real = sentinel.sentinels[0]
    real_id = real.cli("SENTINEL", "MYID").strip()
    with servers.private_redis() as wrong, topologies.rogue_sentinels(wrong.port, first_id=real_id) as rogues:
        assert rogues[0].cli("SENTINEL", "MYID").strip() == real_id  # the attack's premise
        url = sentinel.url(sentinels=[rogues[0], real, sentinel.sentinels[1]])
        cache = wiring.make_cache(settings.Settings(redis_url=url))  # type: ignore[arg-type]
        try:
            with pytest.raises(errors.CacheUnavailable) as caught:
                await cache.ping()
        finally:
            await cache.close()
    message = str(caught.value)
    assert f"sentinels 127.0.0.1:{rogues[0].port} and 127.0.0.1:{real.port} report the same run id" in message
    assert f"names 127.0.0.1:{wrong.port}" in message
    assert f"names 127.0.0.1:{sentinel.master_port()}" in message


async def test_a_majority_naming_a_replica_is_refused_on_the_node_s_own_role() -> None:
    """Two sentinels of three name the replica: the majority is wrong, and the node itself says so (ROLE)."""
    with topologies.sentinel_redis() as fresh:
        replica = next(n for n in fresh.nodes if n.port != fresh.master_port())
        with topologies.rogue_sentinels(replica.port) as rogues:
            config = settings.Settings(redis_url=fresh.url(sentinels=[*rogues, fresh.sentinels[0]]))  # type: ignore[arg-type]
            cache = wiring.make_cache(config)
            try:
                with pytest.raises(errors.CacheUnavailable) as caught:
                    await cache.ping()
            finally:
                await cache.close()
    assert f"127.0.0.1:{replica.port}" in str(caught.value)
    assert "ROLE slave (a replica)" in str(caught.value)


async def test_a_planned_failover_is_followed_at_once_before_the_old_master_is_demoted(database_url: str) -> None:
    """``SENTINEL FAILOVER``: the old master stays up, and writable, until the sentinels demote it (about 8 s); a
    watcher that waits for it to refuse a write keeps writing there, and whatever it writes is discarded when it
    becomes a replica. The sentinels' ``+switch-master`` makes the watcher move at once: a change committed right
    after the failover reaches the new master while the old one still says it is a master."""
    with topologies.sentinel_redis() as fresh:
        config = watch_settings(database_url=database_url, redis_url=fresh.url())
        recorder = Recorder()
        await upsert(database_url, {f"pkg/m{n}.py": f"V = {n}\n" for n in range(10)})
        async with watching(config, recorder) as (wired, _):
            assert await convergence.converged(database_url, wired.cache.client, PREFIX, within_s=10) == []
            resyncs = recorder.full_syncs(watcher.RECONNECT)
            started = time.monotonic()
            old = fresh.fail_over()
            new = await asyncio.to_thread(fresh.wait_for_new_master, old)
            await upsert(database_url, {"pkg/m0.py": "V = 'after the switch'\n"})
            new_master = redis.Redis(port=new, decode_responses=True)
            old_master = redis.Redis(port=old, decode_responses=True)
            try:
                assert await convergence.converged(database_url, new_master, PREFIX, within_s=WITHIN_S) == []
                took_s = time.monotonic() - started
                print(
                    f"planned failover -> change on the new master: {took_s:.2f} s"
                )  # the number docs/topologies.md quotes (-s)
                assert (await old_master.execute_command("ROLE"))[0] == "master"  # not demoted yet: no READONLY
                await recorder.wait_for(lambda: recorder.full_syncs(watcher.RECONNECT) > resyncs, WITHIN_S)
            finally:
                await new_master.aclose()
                await old_master.aclose()
    assert any(active and f"on 127.0.0.1:{new} (was 127.0.0.1:{old})" in d for active, d in recorder.keyspace)
    said = f"the sentinels switched the master to 127.0.0.1:{new}: subscribing there"  # not a bare "connection closed"
    assert (False, said) in recorder.keyspace


async def test_a_change_committed_during_a_failover_reaches_the_new_master(
    sentinel: topologies.Sentinel, database_url: str
) -> None:
    config = watch_settings(database_url=database_url, redis_url=sentinel.url())
    recorder = Recorder()
    await upsert(database_url, {f"pkg/m{n}.py": f"V = {n}\n" for n in range(20)})
    async with watching(config, recorder) as (wired, _):
        client = wired.cache.client
        assert await convergence.converged(database_url, client, PREFIX, within_s=10) == []
        reader_cache = wiring.make_cache(config)  # the consumer's reader: its own client, built the same way
        guard = readiness.CacheGuard(engine=engine.Engine(source=wired.source, cache=reader_cache), cache=reader_cache)
        try:
            before = await guard.check()
            resyncs = recorder.full_syncs(watcher.RECONNECT)
            old = sentinel.kill_master()
            await upsert(database_url, {"pkg/m0.py": "V = 'during the failover'\n", "pkg/new.py": "NEW = 1\n"})
            new = await asyncio.to_thread(sentinel.wait_for_new_master, old)
            assert await convergence.converged(database_url, client, PREFIX, within_s=WITHIN_S) == []
            await recorder.wait_for(lambda: any(f":{new}" in d for active, d in recorder.keyspace if active), WITHIN_S)
            await recorder.wait_for(lambda: recorder.full_syncs(watcher.RECONNECT) > resyncs, WITHIN_S)
            assert await _when_reachable(guard) >= before  # the replica had the generation: no writes were lost
            assert await reader_cache.read_module("pkg/new.py") is not None
        finally:
            await guard.close()
            await reader_cache.close()
    moved = [d for active, d in recorder.keyspace if active and f":{new}" in d]
    assert f"(was 127.0.0.1:{old})" in moved[0]  # the status says the master changed, and from where
    assert recorder.full_syncs(watcher.RECONNECT) >= 1


async def test_the_consumer_s_reader_follows_a_planned_failover_at_once() -> None:
    """attack-11b T8: after ``SENTINEL FAILOVER`` the consumer's reader (``wiring.make_redis``) kept its pooled
    connection to the old master, still writable and saying ROLE master, for the ~10 s until the sentinels demoted
    it, and read values modcache had stopped updating there. Now it follows ``+switch-master`` as the watcher does:
    a value set on the new master is what it reads, while the old master still says it is the master."""
    with topologies.sentinel_redis() as fresh:
        config = settings.Settings(redis_url=fresh.url())  # type: ignore[arg-type]
        reader, close = wiring.make_redis(config)
        try:
            await reader.set("t8:module", "before")  # on the old master: the pool holds a connection to it
            old = fresh.fail_over()
            new = await asyncio.to_thread(fresh.wait_for_new_master, old)
            new_master = redis.Redis(port=new, decode_responses=True)
            old_master = redis.Redis(port=old, decode_responses=True)
            try:
                await new_master.set("t8:module", "after")  # what modcache writes now
                read = await _read_until(reader, "after", within_s=3)
                role = (await old_master.execute_command("ROLE"))[0]
            finally:
                await new_master.aclose()
                await old_master.aclose()
        finally:
            await close()
    assert role == "master"  # the old master was not demoted yet: the reader moved on the announcement
    assert read == "after"


async def _read_until(client: Any, value: str, *, within_s: float) -> str | None:
    """What ``client`` reads, once it reads ``value`` (nothing announces which node a client reads: poll)."""
    deadline = time.monotonic() + within_s
    read = None
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError):  # a dropped connection, retried: the next read
            read = await client.get("t8:module")
            if read == value:
                return read
        await asyncio.sleep(0.05)
    return read


async def _when_reachable(guard: readiness.CacheGuard) -> int:
    """The guard's answer once its client reaches the new master (commands fail until the topology settles)."""
    for _ in range(100):
        try:
            return await guard.check()
        except errors.CacheUnavailable:
            await asyncio.sleep(0.1)  # nothing announces when clients can reach the new master: poll
    return await guard.check()
