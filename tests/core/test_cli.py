"""The ``modcache`` CLI against real PostgreSQL and Redis: sync, modules, status, exit codes, secrets, bad input.

Commands run through the real ``main()`` (in-process, see ``testkit.cli``); watch mode and the progress bar run
as real processes, because they need signals and a terminal.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import subprocess
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from modcache import embedded, errors, keys, modules, pgsource, plan
from modcache.cli import render
from testkit import cli

Env = dict[str, str]
NOTHING = {reason.value: 0 for reason in plan.Reason}


@pytest.fixture
def env(database_url: str, redis_url: str, keyspace: keys.KeySpace) -> Env:
    return cli.service_env(database_url, redis_url, keyspace)


async def put(source: pgsource.PgSource, path: str, text: str) -> None:
    await source.put_module(path, text.encode())


async def snapshot(client: aioredis.Redis, ks: keys.KeySpace) -> dict[str, object]:
    """Every key under the prefix with its type, value and TTL."""
    found: dict[str, object] = {}
    async for key in client.scan_iter(match=f"{ks.prefix}*"):
        kind = await client.type(key)
        reader = {"string": client.get, "set": client.smembers, "hash": client.hgetall}[kind]
        found[key] = (kind, await reader(key), await client.ttl(key))
    return found


async def insert_rows(database_url: str, rows: list[tuple[str, str | None, str, str]]) -> None:
    """Raw rows (path, content, content_hash, entity_type), bypassing modcache's validation."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(
            "INSERT INTO workspace_files (path, content, content_hash, entity_type) VALUES ($1, $2, $3, $4)", rows
        )
    finally:
        await conn.close()


# -- sync --once ------------------------------------------------------------------------------------------------


async def test_put_then_sync_once_fills_the_cache_and_a_second_sync_does_nothing(
    env: Env, tmp_path: Path, redis_client: aioredis.Redis, keyspace: keys.KeySpace
) -> None:
    module = tmp_path / "tickets.py"
    module.write_text("OPEN = 'open'\n")
    put = await cli.invoke("modules", "put", "shared/halopsa/tickets.py", str(module), env=env)
    assert (put.code, put.out) == (0, "wrote shared/halopsa/tickets.py\n")

    first = await cli.invoke("sync", "--once", env=env)
    assert first.code == 0, first.output
    assert "put     missing shared/halopsa/tickets.py" in first.out
    assert "applied: 1 missing, 0 stale, 0 orphan, 0 index (1 writes)" in first.out
    cached = modules.decode_cached(await redis_client.get(keyspace.content("shared/halopsa/tickets.py")))
    assert cached == {
        "content": "OPEN = 'open'\n",
        "path": "shared/halopsa/tickets.py",
        "hash": modules.content_hash(b"OPEN = 'open'\n"),
    }

    second = await cli.invoke("sync", "--once", "--json", env=env)
    report = json.loads(second.out)
    assert report["planned"] == NOTHING
    assert report["applied"] == NOTHING
    assert (report["source_modules"], report["cached_modules"]) == (1, 1)


async def test_dry_run_plans_every_kind_of_drift_and_writes_nothing(
    env: Env, source: pgsource.PgSource, redis_client: aioredis.Redis, keyspace: keys.KeySpace
) -> None:
    for name in ("expired", "edited", "deleted", "kept"):
        await put(source, f"m/{name}.py", f"NAME = {name!r}\n")
    assert (await cli.invoke("sync", "--once", env=env)).code == 0
    await redis_client.delete(keyspace.content("m/expired.py"))
    await put(source, "m/edited.py", "NAME = 'edited twice'\n")
    await source.remove_module("m/deleted.py")
    await redis_client.srem(keyspace.index, "m/kept.py")
    before = await snapshot(redis_client, keyspace)

    result = await cli.invoke("sync", "--once", "--dry-run", "--json", env=env)

    report = json.loads(result.out)
    assert report["dry_run"] is True
    assert report["planned"] == {**NOTHING, "missing": 1, "stale": 1, "orphan": 1, "index": 1}
    assert report["applied"] == NOTHING
    assert await snapshot(redis_client, keyspace) == before
    text = await cli.invoke("sync", "--once", "--dry-run", env=env)
    assert "dry run: nothing written" in text.out
    assert await snapshot(redis_client, keyspace) == before


async def test_dry_run_on_a_cold_cache_writes_nothing(
    env: Env, source: pgsource.PgSource, redis_client: aioredis.Redis, keyspace: keys.KeySpace
) -> None:
    await put(source, "m/a.py", "A = 1\n")
    result = await cli.invoke("sync", "--once", "--dry-run", env=env)
    assert result.code == 0
    assert await snapshot(redis_client, keyspace) == {}


async def test_the_printed_plan_is_capped_with_a_count_of_the_rest(env: Env, source: pgsource.PgSource) -> None:
    for n in range(12):
        await put(source, f"many/m{n:02}.py", f"N = {n}\n")
    result = await cli.invoke("sync", "--once", "--dry-run", "--limit", "5", env=env)
    items = [line for line in result.out.splitlines() if line.startswith("  put ")]
    assert items == [f"  put     missing many/m{n:02}.py" for n in range(5)]
    assert "  … and 7 more" in result.out
    assert "plan: 12 missing, 0 stale, 0 orphan, 0 index (12 items)" in result.out


async def test_sync_needs_a_mode_and_rejects_options_that_do_not_fit(env: Env) -> None:
    no_mode = await cli.invoke("sync", env=env)
    assert no_mode.code == 2
    assert "give --once or --watch" in no_mode.err
    mixed = await cli.invoke("sync", "--watch", "--dry-run", env=env)
    assert mixed.code == 2


# -- modules ----------------------------------------------------------------------------------------------------


async def test_modules_ls_and_rm_soft_and_hard(env: Env, source: pgsource.PgSource, database_url: str) -> None:
    await put(source, "a/one.py", "ONE = 1\n")
    await put(source, "a/two.py", "TWO = 2\n")
    listing = await cli.invoke("modules", "ls", "--json", env=env)
    assert [row["path"] for row in json.loads(listing.out)] == ["a/one.py", "a/two.py"]
    assert json.loads(listing.out)[0]["hash"] == modules.content_hash(b"ONE = 1\n")

    assert (await cli.invoke("modules", "rm", "a/one.py", env=env)).out == "soft-deleted a/one.py\n"
    assert (await cli.invoke("modules", "rm", "a/two.py", "--hard", env=env)).out == "deleted a/two.py\n"
    assert (await cli.invoke("modules", "ls", env=env)).out == ""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT path, is_deleted FROM workspace_files")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("a/one.py", True)]  # soft delete keeps the row, hard delete does not

    again = await cli.invoke("modules", "rm", "a/one.py", env=env)
    assert again.code == 1
    assert "no live module at 'a/one.py'" in again.err


async def test_put_reads_stdin_and_reports_unchanged(env: Env, tmp_path: Path) -> None:
    file = tmp_path / "x.py"
    file.write_text("X = 1\n")
    assert (await cli.invoke("modules", "put", "x.py", str(file), env=env)).out == "wrote x.py\n"
    assert (await cli.invoke("modules", "put", "x.py", str(file), env=env)).out == "unchanged x.py\n"


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/etc/evil.py", "absolute"),
        ("a/../../escape.py", "'..' segment"),
        ("./a.py", "'.' or '..' segment"),
        ("a//b.py", "empty"),
        ("win\\style.py", "use '/' separators"),
        ("notes.txt", "does not end in '.py'"),
        ("nul\x00byte.py", "NUL"),
        ("d/" * 499 + "long.py", "longer than 1000 characters"),
    ],
)
async def test_modules_put_rejects_bad_paths(env: Env, tmp_path: Path, path: str, reason: str) -> None:
    file = tmp_path / "m.py"
    file.write_text("X = 1\n")
    result = await cli.invoke("modules", "put", path, str(file), env=env)
    assert result.code == 2
    assert reason in result.err
    assert result.err.startswith(f"modcache: {errors.truncate(path)!r}: invalid module path: ")
    assert len(result.err.strip().splitlines()) == 1
    assert (await cli.invoke("modules", "ls", env=env)).out == ""


async def test_modules_put_rejects_bad_content(env: Env, tmp_path: Path) -> None:
    binary = tmp_path / "bin.py"
    binary.write_bytes(b"X = '\xff\xfe'\n")
    big = tmp_path / "big.py"
    big.write_text("#" * 101)
    not_utf8 = await cli.invoke("modules", "put", "bin.py", str(binary), env=env)
    assert (not_utf8.code, not_utf8.err) == (2, "modcache: 'bin.py': content is not valid UTF-8 (byte 5)\n")
    too_big = await cli.invoke("modules", "put", "big.py", str(big), "--max-module-bytes", "100", env=env)
    assert (too_big.code, too_big.err) == (2, "modcache: 'big.py': content exceeds the size limit (101 > 100 bytes)\n")


async def test_load_dir_maps_relative_paths_and_reports_bad_files(env: Env, tmp_path: Path) -> None:
    ws = tmp_path / "workspace"
    for relative, data in {
        "shared/halopsa/__init__.py": b"from shared.halopsa.tickets import *\n",
        "shared/halopsa/tickets.py": b"T = 1\n",
        "billing.py": b"RATE = 1\n",
        "binary.py": b"\xff\n",
        "huge.py": b"#" * 300,
        "back\\slash.py": b"B = 1\n",
        ".git/hooks/skip.py": b"not a module\n",
        "__pycache__/skip.py": b"not a module\n",
        "readme.txt": b"not python\n",
    }.items():
        (ws / relative).parent.mkdir(parents=True, exist_ok=True)
        (ws / relative).write_bytes(data)
    (ws / os.fsdecode(b"caf\xe9.py")).write_bytes(b"C = 1\n")  # a Latin-1 file name
    deep = ws / ("x" * 250) / ("y" * 250) / ("z" * 250) / ("w" * 250)
    deep.mkdir(parents=True)
    (deep / "m.py").write_bytes(b"M = 1\n")

    result = await cli.invoke("modules", "load-dir", str(ws), "--max-module-bytes", "200", env=env)

    assert result.code == 2
    assert "rejected 'binary.py': content is not valid UTF-8 (byte 0)" in result.out
    assert "rejected 'huge.py': content exceeds the size limit (300 > 200 bytes)" in result.out
    assert "rejected 'back\\\\slash.py': invalid module path: contains '\\' (use '/' separators)" in result.out
    assert "file name is not valid UTF-8" in result.out
    assert "invalid module path: longer than 1000 characters" in result.out
    assert "loaded 3 modules" in result.out
    assert "5 rejected" in result.out
    listing = await cli.invoke("modules", "ls", "--json", env=env)
    assert [row["path"] for row in json.loads(listing.out)] == [
        "billing.py",
        "shared/halopsa/__init__.py",
        "shared/halopsa/tickets.py",
    ]


# -- bad rows in the source -------------------------------------------------------------------------------------


async def test_sync_reports_each_bad_row_and_syncs_the_rest(
    env: Env, database_url: str, source: pgsource.PgSource, redis_client: aioredis.Redis, keyspace: keys.KeySpace
) -> None:
    good = "GOOD = 1\n"
    digest = modules.content_hash(good.encode())
    await insert_rows(
        database_url,
        [
            ("../escape.py", good, digest, "module"),
            ("/abs.py", good, digest, "module"),
            ("notes.txt", good, digest, "module"),
            ("a\\b.py", good, digest, "module"),
            ("null.py", None, digest, "module"),
            ("lying.py", good, "0" * 64, "module"),
            ("huge.py", "#" * 500, modules.content_hash(b"#" * 500), "module"),
            ("ok/one.py", good, digest, "module"),
            ("ok/two.py", good, digest, "module"),
        ],
    )
    result = await cli.invoke("sync", "--once", "--json", "--max-module-bytes", "100", env=env)

    assert result.code == 0, result.output
    report = json.loads(result.out)
    reasons = {r["path"]: r["reason"] for r in report["rejected"]}
    assert reasons == {
        "../escape.py": modules.Rejection.BAD_PATH.value,
        "/abs.py": modules.Rejection.BAD_PATH.value,
        "notes.txt": modules.Rejection.BAD_PATH.value,
        "a\\b.py": modules.Rejection.BAD_PATH.value,
        "null.py": modules.Rejection.NULL_CONTENT.value,
        "lying.py": modules.Rejection.HASH_MISMATCH.value,
        "huge.py": modules.Rejection.TOO_LARGE.value,
    }
    assert report["applied"]["missing"] == 2
    assert await redis_client.smembers(keyspace.index) == {"ok/one.py", "ok/two.py"}
    text = await cli.invoke("sync", "--once", "--max-module-bytes", "100", env=env)
    assert "rejected: 7 (left as they are in the cache)" in text.out
    assert "  'lying.py': stored content_hash disagrees with the content (stored 000000000000…" in text.out


# -- status -----------------------------------------------------------------------------------------------------


async def test_status_shows_counts_drift_last_sync_and_generation(
    env: Env, source: pgsource.PgSource, redis_client: aioredis.Redis, keyspace: keys.KeySpace
) -> None:
    never = await cli.invoke("status", env=env)
    assert "last sync: none recorded" in never.out
    for n in range(3):
        await put(source, f"s/m{n}.py", f"N = {n}\n")
    assert (await cli.invoke("sync", "--once", env=env)).code == 0
    await redis_client.delete(keyspace.content("s/m1.py"))
    await put(source, "s/m3.py", "N = 3\n")

    result = await cli.invoke("status", env=env)

    assert result.code == 0, result.output
    generation = int(await redis_client.get(keyspace.generation))
    assert "source:    4 live modules, 0 rejected" in result.out
    assert f"cache:     2 modules under {keyspace.prefix!r}, generation {generation}" in result.out
    assert "drift:     2 missing, 0 stale, 0 orphan, 0 index" in result.out
    assert "  put     missing s/m1.py" in result.out
    assert "  source_modules: 3" in result.out  # the record of the last sync, before the drift
    as_json = json.loads((await cli.invoke("status", "--json", env=env)).out)
    assert as_json["report"]["planned"]["missing"] == 2
    assert as_json["generation"] == generation
    assert as_json["last_sync"]["source_modules"] == "3"


# -- settings, exit codes and secrets ---------------------------------------------------------------------------

SECRET = "S3cret-Pa55word"


async def test_a_missing_url_names_the_setting_and_the_flag(redis_url: str) -> None:
    result = await cli.invoke("status", env={"MODCACHE_REDIS_URL": redis_url})
    assert result.code == 2
    assert result.err == ("modcache: bad setting MODCACHE_DATABASE_URL: not set (set it or pass --database-url)\n")


@pytest.mark.parametrize(
    ("args", "environ", "named"),
    [
        ((), {"MODCACHE_DATABASE_URL": f"mysql://app:{SECRET}@db/x"}, "MODCACHE_DATABASE_URL"),
        (("--database-url", f"postgresql://app:{SECRET}@db:port/x"), {}, "--database-url (MODCACHE_DATABASE_URL)"),
        (("--redis-url", f"http://app:{SECRET}@cache/0"), {}, "--redis-url (MODCACHE_REDIS_URL)"),
        ((), {"MODCACHE_RESYNC_INTERVAL_S": "-5"}, "MODCACHE_RESYNC_INTERVAL_S"),
        (("--key-prefix", ""), {}, "--key-prefix (MODCACHE_KEY_PREFIX)"),
    ],
)
async def test_a_bad_setting_is_one_line_naming_it_without_its_value(
    env: Env, args: tuple[str, ...], environ: Env, named: str
) -> None:
    result = await cli.invoke("status", *args, env={**env, **environ})
    assert result.code == 2
    assert result.out == ""
    assert result.err.startswith(f"modcache: bad setting {named}: ")
    assert len(result.err.splitlines()) == 1
    assert SECRET not in result.err


async def test_a_password_never_shows_when_postgres_is_unreachable(env: Env) -> None:
    down = f"postgresql://app:{SECRET}@127.0.0.1:{embedded.free_port()}/bifrost"
    for command in (["status"], ["sync", "--once"], ["modules", "ls"], ["db", "upgrade"], ["db", "install-trigger"]):
        result = await cli.invoke("-vv", *command, env={**env, "MODCACHE_DATABASE_URL": down})
        assert result.code == 1, (command, result.output)
        assert SECRET not in result.output
        assert result.err.startswith("modcache: ")


async def test_a_password_never_shows_when_redis_refuses_it(env: Env, redis_url: str) -> None:
    wrong = redis_url.replace("redis://", f"redis://app:{SECRET}@")
    result = await cli.invoke("-vv", "sync", "--once", env={**env, "MODCACHE_REDIS_URL": wrong})
    assert result.code == 1
    assert SECRET not in result.output
    assert result.err.startswith("modcache: Redis")
    down = f"redis://:{SECRET}@127.0.0.1:{embedded.free_port()}/0"
    result = await cli.invoke("status", env={**env, "MODCACHE_REDIS_URL": down})
    assert result.code == 1
    assert SECRET not in result.output


# -- real processes: a terminal, signals ------------------------------------------------------------------------


async def test_a_long_sync_on_a_terminal_shows_a_progress_bar(
    env: Env, database_url: str, redis_client: aioredis.Redis, keyspace: keys.KeySpace
) -> None:
    count = render.PROGRESS_MIN_ITEMS + 100
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO workspace_files (path, content, content_hash, entity_type) "
            "SELECT format('p/m%s.py', n), format('N = %s', n), "
            "encode(sha256(convert_to(format('N = %s', n), 'UTF8')), 'hex'), 'module' FROM generate_series(1, $1) n",
            count,
        )
    finally:
        await conn.close()
    primary, secondary = pty.openpty()
    process = await asyncio.create_subprocess_exec(
        cli.console_script(),
        "sync",
        "--once",
        stdout=secondary,
        stderr=subprocess.STDOUT,
        env=cli.clean_environ({**env, "MODCACHE_FETCH_BATCH_SIZE": "50"}),
    )
    os.close(secondary)
    output = await asyncio.to_thread(_read_all, primary)
    assert await process.wait() == 0, output
    assert f"syncing [##############################] {count}/{count}" in output
    assert f"applied: {count} missing" in output
    await redis_client.delete(keyspace.index)
    piped = await cli.invoke("sync", "--once", env=env)  # as long a sync, but not on a terminal: no bar
    assert f"plan: 0 missing, 0 stale, 0 orphan, {count} index" in piped.out
    assert "syncing [" not in piped.out


async def test_a_short_sync_on_a_terminal_draws_no_bar(env: Env, source: pgsource.PgSource) -> None:
    await put(source, "short/a.py", "A = 1\n")
    primary, secondary = pty.openpty()
    process = await asyncio.create_subprocess_exec(
        cli.console_script(), "sync", "--once", stdout=secondary, stderr=subprocess.STDOUT, env=cli.clean_environ(env)
    )
    os.close(secondary)
    output = await asyncio.to_thread(_read_all, primary)
    assert await process.wait() == 0, output
    assert "applied: 1 missing" in output
    assert "syncing [" not in output


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO once the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode()


async def test_sync_watch_follows_commits_and_stops_cleanly_on_sigterm(env: Env, source: pgsource.PgSource) -> None:
    process = await asyncio.create_subprocess_exec(
        cli.console_script(),
        "sync",
        "--watch",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=cli.clean_environ(env),
    )
    assert process.stdout is not None
    try:
        await _read_until(process.stdout, "sync (full, connect)", "Redis keyspace events on")
        await put(source, "w/live.py", "LIVE = 1\n")
        await _read_until(process.stdout, "sync (paths, notify): 1 missing; 1 written")
        process.send_signal(signal.SIGTERM)
        rest = (await asyncio.wait_for(process.stdout.read(), 10)).decode()
        assert await asyncio.wait_for(process.wait(), 10) == 0
        assert rest.rstrip().endswith("stopped")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _read_until(stream: asyncio.StreamReader, *needles: str, timeout_s: float = 20.0) -> None:
    """Read lines until each of ``needles`` has appeared in one (in any order)."""
    waiting = set(needles)
    async with asyncio.timeout(timeout_s):
        while waiting:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError(f"output ended before {waiting}")
            waiting = {needle for needle in waiting if needle not in line}
