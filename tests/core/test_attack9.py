"""The independent attack on issue 9's claims (``/work/coord/attack-9.md``), each finding attacked the same way:
raw bytes that are not UTF-8 in names, channels and values (F1), a swapped-in database carrying a copy of the probe
key (F2), a generation the probe cannot parse (F3), keyspace notifications switched off at runtime (F4), huge
legal modules (F5) and a SQL_ASCII database holding non-UTF-8 rows (F6). Outcomes are judged by
``testkit.convergence`` (rows and keys compared directly), never by the engine's plan."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from modcache import db, keys, modules, pgsource, settings, watcher
from testkit import cli, convergence
from testkit.observers import Recorder
from testkit.servers import PrivateRedis
from testkit.watching import watching_source

WITHIN_S = 5.0
KS = keys.KeySpace()


def judge_client(url: str) -> aioredis.Redis:
    """The judge reads bytes that are not UTF-8 too (as surrogates), so it can see them."""
    return aioredis.Redis.from_url(url, decode_responses=True, encoding_errors="surrogateescape")


async def put_some(source: pgsource.PgSource, n: int = 5) -> list[str]:
    paths = [f"pkg/m{i}.py" for i in range(n)]
    for i, path in enumerate(paths):
        await source.put_module(path, f"N = {i}\n".encode())
    return paths


def watch_settings(**extra: object) -> settings.Settings:
    return settings.Settings(resync_interval_s=3600, listener_backoff_max_s=0.2, **extra)  # type: ignore[arg-type]


def watching(
    source: pgsource.PgSource, redis_url: str, ks: keys.KeySpace, database_url: str
) -> contextlib.AbstractAsyncContextManager[tuple[watcher.Watcher, asyncio.Task[None], Recorder]]:
    return watching_source(source, redis_url, ks, database_url, watch_settings())


# -- F1: bytes that are not UTF-8 ------------------------------------------------------------------------------


@pytest.mark.parametrize("poison", ["index", "manifest"])
async def test_a_non_utf8_index_member_or_manifest_field_is_removed_by_sync_once(
    poison: str,
    source: pgsource.PgSource,
    redis_url: str,
    keyspace: keys.KeySpace,
    database_url: str,
) -> None:
    await put_some(source)
    env = cli.service_env(database_url, redis_url, keyspace)
    assert (await cli.invoke("sync", "--once", env=env)).code == 0
    raw = aioredis.Redis.from_url(redis_url)
    try:
        if poison == "index":
            await raw.sadd(keyspace.index.encode(), b"\xff.py")
        else:
            await raw.hset(keyspace.manifest.encode(), b"\xff.py", b"x")
        result = await cli.invoke("sync", "--once", "--json", env=env)
        assert result.code == 0, result.output
        assert [i["detail"] for i in json.loads(result.out)["invalid"]] == ["not valid UTF-8"]
        assert not await raw.sismember(keyspace.index.encode(), b"\xff.py")
        assert not await raw.hexists(keyspace.manifest.encode(), b"\xff.py")
        assert (await cli.invoke("status", env=env)).code == 0
    finally:
        await raw.aclose()
    client = judge_client(redis_url)
    try:
        assert await convergence.differences(database_url, client, keyspace.prefix) == []
    finally:
        await client.aclose()


async def test_a_non_utf8_stray_key_is_left_alone_by_a_deep_sync(
    source: pgsource.PgSource, redis_url: str, keyspace: keys.KeySpace, database_url: str
) -> None:
    await put_some(source)
    env = cli.service_env(database_url, redis_url, keyspace)
    raw = aioredis.Redis.from_url(redis_url)
    stray = keyspace.prefix.encode() + b"\xff.py"
    try:
        await raw.set(stray, b"foreign")
        result = await cli.invoke("sync", "--once", "--deep", env=env)
        assert result.code == 0, result.output
        assert await raw.get(stray) == b"foreign"
    finally:
        await raw.aclose()
    client = judge_client(redis_url)
    try:
        untouchable = {stray.decode("utf-8", "surrogateescape"): "foreign"}
        assert await convergence.differences(database_url, client, keyspace.prefix, untouchable) == []
    finally:
        await client.aclose()


async def test_non_utf8_names_channels_and_values_neither_stop_nor_blind_a_watcher(
    source: pgsource.PgSource, redis_url: str, keyspace: keys.KeySpace, database_url: str
) -> None:
    """Every vector of the attack's matrix, then a foreign DEL and a forged value that must still be repaired."""
    paths = await put_some(source)
    raw = aioredis.Redis.from_url(redis_url)
    client = judge_client(redis_url)
    p = keyspace.prefix.encode()
    try:
        async with watching(source, redis_url, keyspace, database_url) as (_, task, _):
            await raw.publish(b"__keyspace@0__:" + p + b"\xff", b"x")
            await raw.publish(keyspace.writes_channel.encode(), b"b:\xff")
            await raw.set(p + b"\xff", b"x")
            await raw.hset(keyspace.status.encode(), b"\xff", b"x")
            await raw.set(keyspace.generation.encode(), b"\xff")
            await raw.sadd(keyspace.index.encode(), b"\xff.py")
            await raw.hset(keyspace.manifest.encode(), b"\xe9.py", b"x")
            await raw.delete(keyspace.content(paths[0]).encode())
            await raw.set(keyspace.content(paths[1]).encode(), b'import os; os.system("id")')
            untouchable = {(p + b"\xff").decode("utf-8", "surrogateescape"): "x"}
            left = await convergence.converged(
                database_url, client, keyspace.prefix, within_s=WITHIN_S, untouchable=untouchable
            )
            assert left == []
            assert not task.done()
            await raw.delete(keyspace.content(paths[2]).encode())  # and it keeps repairing
            assert (
                await convergence.converged(
                    database_url, client, keyspace.prefix, within_s=WITHIN_S, untouchable=untouchable
                )
                == []
            )
    finally:
        await raw.aclose()
        await client.aclose()


# -- F2: a swapped-in database that carries a copy of the probe key --------------------------------------------

SWAP = """
local keys = redis.call('KEYS', ARGV[1])
redis.call('SELECT', 1)
redis.call('FLUSHDB')
redis.call('SELECT', 0)
for _, key in ipairs(keys) do
    if ARGV[4] == '1' or not string.find(key, 'modcache:probe:', 1, true) then redis.call('COPY', key, key, 'DB', 1) end
end
redis.call('SELECT', 1)
redis.call('SET', ARGV[2], ARGV[3])
return #keys
"""


@pytest.mark.parametrize("with_probe", [True, False], ids=["probe copied", "probe not copied"])
async def test_a_swapped_in_forged_database_is_noticed_and_every_value_repaired(
    with_probe: bool, server: PrivateRedis, source: pgsource.PgSource, database_url: str
) -> None:
    paths = await put_some(source)
    client = judge_client(server.url)
    try:
        async with watching(source, server.url, KS, database_url) as (_, task, recorder):
            await client.set(KS.content("never/listed.py"), "x")  # the swap happens inside one MULTI
            row = json.loads(str(await client.get(KS.content(paths[0]))))
            forged = json.dumps({"content": 'import os; os.system("id")', "path": paths[0], "hash": row["hash"]})
            entry = str(await client.hget(KS.manifest, paths[0]))
            gen, digest, _ = entry.split(":")
            await client.delete(KS.content("never/listed.py"))
            async with client.pipeline(transaction=True) as pipe:
                pipe.eval(SWAP, 0, f"{KS.prefix}*", KS.content(paths[0]), forged, "1" if with_probe else "0")
                pipe.execute_command("SELECT", 1)
                pipe.hset(KS.manifest, paths[0], f"{gen}:{digest}:{len(forged.encode())}")
                pipe.execute_command("SWAPDB", 0, 1)
                pipe.execute_command("SELECT", 0)
                await pipe.execute()
            await client.connection_pool.disconnect()  # the pipeline's connection was left on DB 1's SELECT
            left = await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S)
            syncs = [(r.plan.describe(), t, r.deep) for r, t in recorder.syncs[-5:]]
            assert left == [], (syncs, task.done() and task.exception(), recorder.failures)
    finally:
        await client.aclose()


# -- F3: a generation the probe cannot parse -------------------------------------------------------------------


async def test_an_unparsable_generation_does_not_kill_the_flush_probe(
    server: PrivateRedis, source: pgsource.PgSource, database_url: str
) -> None:
    await put_some(source)
    client = judge_client(server.url)
    try:
        async with watching(source, server.url, KS, database_url) as (_, task, _):
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:  # the attacker races the watcher's own reset of the key
                await client.set(KS.generation, "²")
                await asyncio.sleep(0.002)
            await client.flushdb()
            assert await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S) == []
            assert not task.done()
    finally:
        await client.aclose()


# -- F4: keyspace notifications switched off at runtime ------------------------------------------------------


@pytest.mark.parametrize("flags", ["", "Ex"], ids=["off", "another app's flags"])
async def test_keyspace_events_switched_off_at_runtime_are_switched_on_again(
    flags: str, server: PrivateRedis, source: pgsource.PgSource, database_url: str
) -> None:
    paths = await put_some(source)
    client = judge_client(server.url)

    async def keep_busy() -> None:  # any message keeps the subscription's reads from timing out
        while True:
            await client.publish(KS.writes_channel, "keepalive")
            await asyncio.sleep(0.2)

    try:
        async with watching(source, server.url, KS, database_url):
            busy = asyncio.create_task(keep_busy())
            try:
                await client.config_set("notify-keyspace-events", flags)
                await client.delete(KS.content(paths[0]))
                assert await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S) == []
            finally:
                busy.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await busy
    finally:
        await client.aclose()


# -- F6: rows that are not UTF-8 (only a SQL_ASCII database can hold them) ------------------------------------


@pytest.fixture
async def ascii_database(database_url: str) -> AsyncIterator[str]:
    admin = database_url.rpartition("/")[0] + "/postgres"
    name = f"{database_url.rpartition('/')[2]}_ascii"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" ENCODING SQL_ASCII TEMPLATE template0 LOCALE "C"')
    finally:
        await conn.close()
    url = f"{database_url.rpartition('/')[0]}/{name}"
    try:
        await db.upgrade(url)
        yield url
    finally:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def test_non_utf8_rows_in_a_sql_ascii_database_are_rejected_and_the_rest_synced(
    ascii_database: str, redis_url: str, keyspace: keys.KeySpace
) -> None:
    conn = await asyncpg.connect(ascii_database)
    try:
        for path, content in [("good.py", "G = 1\n"), ("also/good.py", "A = 2\n")]:
            digest = modules.content_hash(content.encode())
            await conn.execute(
                "INSERT INTO workspace_files (path, content, content_hash, entity_type) VALUES ($1, $2, $3, 'module')",
                path,
                content,
                digest,
            )
        await conn.execute(
            "INSERT INTO workspace_files (path, content, content_hash, entity_type) VALUES "
            "('latin1.py', convert_from('\\x782027e92027'::bytea, 'SQL_ASCII'), "
            "encode(sha256('\\x782027e92027'::bytea), 'hex'), 'module'), "
            "(convert_from('\\xe92e7079'::bytea, 'SQL_ASCII'), 'x=1', encode(sha256('x=1'), 'hex'), 'module')"
        )
    finally:
        await conn.close()
    env = cli.service_env(ascii_database, redis_url, keyspace)
    result = await cli.invoke("sync", "--once", "--json", env=env)
    assert result.code == 0, result.output
    rejected = {r["path"]: r["reason"] for r in json.loads(result.out)["rejected"]}
    assert rejected["latin1.py"] == modules.Rejection.NOT_UTF8.value
    assert list(rejected.values()).count(modules.Rejection.BAD_PATH.value) == 1
    client = judge_client(redis_url)
    try:
        assert await client.smembers(keyspace.index) == {"good.py", "also/good.py"}
        assert json.loads(str(await client.get(keyspace.content("good.py"))))["content"] == "G = 1\n"
    finally:
        await client.aclose()


# -- F5: huge legal modules --------------------------------------------------------------------------------------

RSS_OF_CHILD = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, repr(done.stderr[-500:]))
"""


async def test_modules_of_the_largest_legal_size_sync_in_bounded_batches(
    server: PrivateRedis, database_url: str
) -> None:
    """Eight modules of 8 MiB control characters (each 48 MiB as JSON): batches bounded by rows alone put all of
    them in one read and one Redis call (the attack: 30 of them fail every sync; peak RSS 7.8 GB)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO workspace_files (path, content, content_hash, entity_type) "
            "SELECT 'big/m' || g || '.py', c, encode(sha256(convert_to(c, 'UTF8')), 'hex'), 'module' "
            "FROM generate_series(1, 8) g, (SELECT repeat(chr(1), 8388608 - 10) AS c) s"
        )
        await conn.execute(
            "INSERT INTO workspace_files (path, content, content_hash, entity_type) "
            "VALUES ('small.py', 'x=1', encode(sha256('x=1'), 'hex'), 'module')"
        )
    finally:
        await conn.close()
    env = {**cli.clean_environ({}), **cli.service_env(database_url, server.url, KS)}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", RSS_OF_CHILD, cli.console_script(), "sync", "--once"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    code, peak, stderr = done.stdout.split(" ", 2)
    assert code == "0", stderr
    assert int(peak) < 700 * 2**20, peak  # three 8 MiB modules in flight at most (rows alone: all eight, ~1.3 GB)
    client = judge_client(server.url)
    try:
        assert (
            await convergence.differences(database_url, client, KS.prefix, max_bytes=modules.DEFAULT_MAX_MODULE_BYTES)
            == []
        )
    finally:
        await client.aclose()


# -- F9: a write that fails mid-script must not blind the key events -----------------------------------------


async def test_a_write_refused_for_memory_does_not_blind_the_watcher(
    server: PrivateRedis, source: pgsource.PgSource, database_url: str
) -> None:
    paths = await put_some(source)
    client = judge_client(server.url)
    try:
        async with watching(source, server.url, KS, database_url) as (_, task, recorder):
            for trial in range(3):
                await client.config_set("maxmemory-policy", "noeviction")
                await client.config_set("maxmemory", "1")  # the watcher's repair of this DEL is refused (OOM)
                await client.delete(KS.content(paths[0]))
                await recorder.wait_for(lambda: recorder.failures)
                await client.config_set("maxmemory", "0")
                recorder.failures.clear()
                assert await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S) == []
                await client.delete(KS.content(paths[1 + trial]))  # key events must still be heard
                assert await convergence.converged(database_url, client, KS.prefix, within_s=WITHIN_S) == []
            assert not task.done()
    finally:
        await client.aclose()


# -- F12: a NULL content_hash (a Bifrost database's column may allow it) ----------------------------------------


async def test_a_null_content_hash_is_rejected_and_the_rest_synced(
    source: pgsource.PgSource, database_url: str, redis_url: str, keyspace: keys.KeySpace
) -> None:
    await put_some(source, 2)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("ALTER TABLE workspace_files ALTER COLUMN content_hash DROP NOT NULL")
        await conn.execute(
            "INSERT INTO workspace_files (path, content, content_hash, entity_type) "
            "VALUES ('nullhash.py', 'x=1', NULL, 'module')"
        )
    finally:
        await conn.close()
    env = cli.service_env(database_url, redis_url, keyspace)
    for args in (("sync", "--once", "--json"), ("status",)):
        result = await cli.invoke(*args, env=env)
        assert result.code == 0, result.output
    client = judge_client(redis_url)
    try:
        assert await client.smembers(keyspace.index) == {"pkg/m0.py", "pkg/m1.py"}
    finally:
        await client.aclose()
