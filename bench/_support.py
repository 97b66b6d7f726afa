"""Shared plumbing for the convergence-core benchmarks (``bench/core_*.py``).

Owns: the machine-info header every benchmark prints, a private ``redis-server`` on a free port (so FLUSHDB,
CONFIG and memory settings never touch the shared Redis), a throw-away migrated PostgreSQL database, fast
server-side fixture loading (``generate_series``, no per-row round trips), an Engine built with the production
defaults, the original plan's naive ``_sync_module_cache`` reimplemented faithfully, and small statistics and
printing helpers.

Service locations: ``MODCACHE_BENCH_POSTGRES_URL`` (an admin URL; default this machine's PostgreSQL) and
``redis-server`` on ``PATH``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from modcache import db, embedded, engine, keys, modules, schema, settings, wiring

ADMIN_URL_ENV = "MODCACHE_BENCH_POSTGRES_URL"
MODULE_BYTES = 4096

# -- machine info ----------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _versions(*dists: str) -> str:
    found = []
    for dist in dists:
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            found.append(f"{dist} ?")
    return ", ".join(found)


async def print_machine_info(*, database_url: str, redis_url: str) -> None:
    """CPU, cores, RAM, load, PostgreSQL/Redis/Python versions: the context every number needs."""
    conn = await asyncpg.connect(settings.asyncpg_dsn(database_url))
    try:
        pg_version = await conn.fetchval("SHOW server_version")
        shared_buffers = await conn.fetchval("SHOW shared_buffers")
    finally:
        await conn.close()
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print("machine:")
    print(f"  cpu        {_cpu_model()} | {os.cpu_count()} cores | {_ram_gib():.1f} GiB RAM | load avg {load}")
    print(f"  os         {platform.platform()}")
    print(f"  postgresql {pg_version} (shared_buffers {shared_buffers}, loopback TCP)")
    print(f"  redis      {info.get('redis_version')} (private redis-server, loopback TCP, no persistence)")
    print(f"  python     {platform.python_version()} | {_versions('redis', 'asyncpg', 'SQLAlchemy')}")
    print(flush=True)


# -- private Redis ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        time.sleep(0.01)
    raise TimeoutError(f"redis-server on port {port} did not start within {timeout_s} s")


@contextlib.contextmanager
def private_redis(*extra_args: str) -> Iterator[str]:
    """A redis-server of this benchmark's own on a free port (no persistence); yields its URL, stops it after."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench: redis-server is not on PATH (apt-get install redis-server)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="modcache-bench-redis-")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*args, "--dir", workdir, *extra_args], stdout=subprocess.DEVNULL)
    try:
        _wait_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


# -- throw-away PostgreSQL database ------------------------------------------------------------------------------


def admin_url() -> str:
    """The PostgreSQL admin URL: MODCACHE_BENCH_POSTGRES_URL, else the tests' MODCACHE_TEST_POSTGRES_URL, else local."""
    default = os.environ.get("MODCACHE_TEST_POSTGRES_URL", embedded.DEFAULTS["postgres"])
    return os.environ.get(ADMIN_URL_ENV, default)


@contextlib.asynccontextmanager
async def bench_database() -> AsyncIterator[str]:
    """A freshly migrated database of this run's own (tables + NOTIFY trigger); dropped afterwards."""
    admin = settings.asyncpg_dsn(admin_url())
    name = f"modcache_bench_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = f"{admin.rpartition('/')[0]}/{name}"
    try:
        await db.upgrade(url)
        yield url
    finally:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


# Each module: a unique first line, then lines of hex literals (about 4 KiB; pglz cannot compress them, so
# the content lives out of line in TOAST, as large real modules do). A pool of 1,000 bodies keeps loading fast.
_POOL_SQL = """
CREATE TEMP TABLE bench_pool AS
SELECT b, string_agg(format('VALUE_%s = %L', j, md5(b || ':' || j)), E'\\n' ORDER BY j) AS body
FROM generate_series(0, 999) AS b, generate_series(1, 100) AS j GROUP BY b
"""

_LOAD_SQL = """
INSERT INTO workspace_files (path, content, content_hash, size_bytes, entity_type)
SELECT path_of(i), c, encode(sha256(convert_to(c, 'UTF8')), 'hex'), octet_length(c), 'module'
FROM generate_series($1::int, $2::int) AS i
JOIN bench_pool ON bench_pool.b = i % 1000
CROSS JOIN LATERAL (SELECT left(format(E'# module %s\\n', i) || body, $3::int - 1) || E'\\n' AS c) AS x
"""

_PATH_FN_SQL = """
CREATE OR REPLACE FUNCTION pg_temp.path_of(i int) RETURNS text LANGUAGE sql IMMUTABLE
AS $$ SELECT format('pkg_%s/mod_%s.py', i / 1000, i) $$
"""


def module_path(i: int) -> str:
    """The path ``load_modules`` gives row ``i``."""
    return f"pkg_{i // 1000}/mod_{i}.py"


async def load_modules(database_url: str, count: int, *, first: int = 0, size_bytes: int = MODULE_BYTES) -> float:
    """Insert ``count`` live modules of ``size_bytes`` each, generated server-side; returns seconds taken."""
    started = time.perf_counter()
    conn = await asyncpg.connect(settings.asyncpg_dsn(database_url))
    try:
        await conn.execute(_POOL_SQL)
        await conn.execute(_PATH_FN_SQL)
        await conn.execute(_LOAD_SQL.replace("path_of(", "pg_temp.path_of("), first, first + count - 1, size_bytes)
        await conn.execute("ANALYZE workspace_files")
    finally:
        await conn.close()
    return time.perf_counter() - started


# -- modcache, built as the CLI/operator build it (production defaults) ----------------------------------------


@contextlib.asynccontextmanager
async def modcache_engine(database_url: str, redis_url: str) -> AsyncIterator[engine.Engine]:
    s = settings.Settings(database_url=database_url, redis_url=redis_url)  # type: ignore[arg-type]
    async with wiring.connect(s, application_name="modcache-bench") as wired:
        yield wired.engine


# -- the original plan's algorithm (bifrost-contract.md failure mode 2), reimplemented faithfully ---------------

BIFROST_TTL_S = 86400


class PlanConsumer:
    """The original plan's ``WorkflowExecutionConsumer._sync_module_cache`` with Bifrost's ``set_module``.

    A persistent AsyncSession (created before timing, as the original plan's consumer holds one), every live module row
    loaded *with content* through the ORM, SMEMBERS of the index, then one EXISTS round trip per module in
    sequence; each missing one is written with ``SETEX 86400`` and a separate ``SADD`` (Bifrost's set_module).
    """

    def __init__(self, *, database_url: str, redis_url: str, prefix: str = keys.DEFAULT_PREFIX) -> None:
        self._engine = db.make_engine(database_url)
        self._session: AsyncSession = async_sessionmaker(self._engine, expire_on_commit=False)()
        self._redis = aioredis.Redis.from_url(redis_url)
        self._prefix = prefix

    async def close(self) -> None:
        await self._session.close()
        await self._engine.dispose()
        await self._redis.aclose()

    async def warm_up(self) -> None:
        await self._session.execute(sa.text("SELECT 1"))
        await self._redis.ping()

    async def sync_module_cache(self) -> int:
        """Returns how many modules it (re)cached."""
        wf = schema.WorkspaceFile
        stmt = sa.select(wf).where(
            wf.entity_type == "module",
            wf.is_deleted == False,  # noqa: E712 -- the original plan's exact filter
            wf.content.isnot(None),
        )
        result = await self._session.execute(stmt)
        db_modules = result.scalars().all()
        if not db_modules:
            return 0
        cached_keys = await self._redis.smembers(f"{self._prefix}index")
        cached_keys = {k.decode() if isinstance(k, bytes) else k for k in cached_keys}
        modules_added = 0
        for module in db_modules:
            cache_key = f"{self._prefix}{module.path}"
            key_exists = await self._redis.exists(cache_key)
            if not key_exists:
                await self._set_module(path=module.path, content=module.content or "", content_hash=module.content_hash)
                modules_added += 1
        return modules_added

    async def _set_module(self, *, path: str, content: str, content_hash: str) -> None:
        cached = {"content": content, "path": path, "hash": content_hash}
        await self._redis.setex(f"{self._prefix}{path}", BIFROST_TTL_S, json.dumps(cached))
        await self._redis.sadd(f"{self._prefix}index", path)


# -- drift -------------------------------------------------------------------------------------------------------


class Drift:
    """A reproducible drift of a converged cache: missing, stale and orphaned content keys (Redis-side only,
    so the same drift can be laid down again for each approach on identical source data)."""

    def __init__(self, *, count: int, ratio: float, seed: int = 42) -> None:
        rng = random.Random(seed)
        chosen = rng.sample(range(count), 2 * int(count * ratio))
        per = len(chosen) // 2
        self.missing = sorted(module_path(i) for i in chosen[:per])
        self.stale = sorted(module_path(i) for i in chosen[per:])
        self.orphans = [f"deleted_{n // 1000}/gone_{n}.py" for n in range(per)]

    def describe(self) -> str:
        return f"{len(self.missing)} missing, {len(self.stale)} stale, {len(self.orphans)} orphaned"

    async def apply(self, client: aioredis.Redis, ks: keys.KeySpace) -> None:
        """Missing: content key deleted, index entry kept (the original bug). Stale: the content key holds an
        older version of the module. Orphaned: content key + index entry for a module no longer in the source."""
        old = "# an older version of this module\n" * 100
        async with client.pipeline(transaction=False) as pipe:
            for path in self.missing:
                pipe.delete(ks.content(path))
            for path in self.stale:
                pipe.set(ks.content(path), modules.encode_cached(path, old, _sha(old)))
            for path in self.orphans:
                pipe.set(ks.content(path), modules.encode_cached(path, old, _sha(old)))
                pipe.sadd(ks.index, path)
            await pipe.execute()


def _sha(text: str) -> str:
    return modules.content_hash(text.encode())


# -- Redis write accounting ----------------------------------------------------------------------------------------


async def command_calls(client: aioredis.Redis) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT (commands run inside scripts included)."""
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def write_commands(client: aioredis.Redis, calls: dict[str, int]) -> dict[str, int]:
    """The subset of ``calls`` whose command carries Redis's ``write`` flag (per COMMAND)."""
    table = await client.command()
    return {name: n for name, n in calls.items() if n and "write" in table.get(name.split("|")[0], {}).get("flags", [])}


# -- numbers -----------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def verdict(value: float, target: float, *, at_least: bool = False) -> str:
    ok = value >= target if at_least else value <= target
    return "PASS" if ok else "MISS"


def row(label: str, value: str, target: str = "", result: str = "") -> None:
    print(f"  {label:<46} {value:>16}  {target:<14} {result}")


def run(coro: Any) -> None:
    """Run a benchmark coroutine with a hard wall-clock bound."""
    asyncio.run(coro)


# -- a running watcher (child process) and the clock that sees its writes ----------------------------------------


@contextlib.contextmanager
def watcher_process(database_url: str, redis_url: str) -> Iterator[subprocess.Popen[bytes]]:
    """``bench._watch_child`` running on the given services; SIGTERM and reaped afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench._watch_child", database_url, redis_url],
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


class KeyEvents:
    """Timestamps Redis key events as they arrive (``__keyevent@0__:<event>`` channels), so a benchmark can
    await "this key was set/expired/deleted" without polling. ``expect`` before triggering, then ``wait``."""

    def __init__(self, redis_url: str, events: Sequence[str]) -> None:
        self._client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        self._channels = {f"__keyevent@0__:{e}": e for e in events}
        self._waiting: dict[tuple[str, str], asyncio.Future[float]] = {}
        self._counting: dict[str, tuple[set[str], asyncio.Future[float], int]] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> KeyEvents:
        flags = str((await self._client.config_get("notify-keyspace-events")).get("notify-keyspace-events", ""))
        wanted = flags + "".join(f for f in "E$gx" if f not in flags)
        await self._client.config_set("notify-keyspace-events", wanted)
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(*self._channels)
        self._task = asyncio.create_task(self._read(pubsub))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()

    async def _read(self, pubsub: Any) -> None:
        try:
            async for message in pubsub.listen():
                now = time.perf_counter()
                event, key = self._channels.get(message["channel"], ""), message["data"]
                future = self._waiting.pop((event, key), None)
                if future is not None and not future.done():
                    future.set_result(now)
                counting = self._counting.get(event)
                if counting is not None:
                    seen, done, total = counting
                    seen.add(key)
                    if len(seen) >= total and not done.done():
                        done.set_result(now)
        finally:
            await pubsub.aclose()

    def expect(self, event: str, key: str, *alternatives: str) -> asyncio.Future[float]:
        """A future resolved with the arrival time of the next ``event`` (or one of ``alternatives``) on ``key``."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        for name in (event, *alternatives):
            self._waiting[(name, key)] = future
        return future

    def expect_count(self, event: str, total: int) -> asyncio.Future[float]:
        """A future resolved when ``event`` has been seen on ``total`` distinct keys."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._counting[event] = (set(), future, total)
        return future


async def wait_for_status(redis_url: str, ks: keys.KeySpace, *, timeout_s: float = 120.0) -> None:
    """Wait until a sync-status record exists (the watcher's first full resync finished)."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    deadline = time.monotonic() + timeout_s
    try:
        while not await client.hexists(ks.status, "last_success_at"):
            if time.monotonic() > deadline:
                raise SystemExit("the watcher never finished its first full resync")
            await asyncio.sleep(0.05)  # another process's progress: poll a real condition with a deadline
    finally:
        await client.aclose()


def summary(label: str, values_s: Sequence[float], target_ms: float | None = None) -> None:
    ms = [v * 1000 for v in values_s]
    stats = f"p50 {percentile(ms, 50):6.2f}  p99 {percentile(ms, 99):6.2f}  max {max(ms):6.2f} ms"
    target = f"p99 <= {target_ms:.0f} ms" if target_ms is not None else ""
    result = verdict(percentile(ms, 99), target_ms) if target_ms is not None else ""
    print(f"  {label:<44} {stats}  {target:<14} {result}  (n={len(ms)})")
