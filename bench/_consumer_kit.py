"""Shared plumbing for the consumer benchmarks (``bench/consumer_*.py``).

Owns: the machine-info header, a throw-away migrated database, a throw-away Redis key prefix and RabbitMQ
queue, server-side module loading (``generate_series``, no per-row round trips), percentiles, and the
original plan's per-message design reimplemented faithfully for comparison (``PlanSession``: one AsyncSession for the
consumer's life, ``SELECT 1`` before every message, ``_sync_module_cache`` listing every module with content
and one EXISTS round trip per module).

Service locations: ``MODCACHE_BENCH_POSTGRES_URL`` (admin URL), ``MODCACHE_BENCH_REDIS_URL``,
``MODCACHE_BENCH_AMQP_URL``; defaults: this machine's services.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import uuid
from collections.abc import AsyncIterator, Sequence
from importlib import metadata
from pathlib import Path

import aio_pika
import asyncpg
import redis.asyncio as aioredis
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bench import _support
from modcache import embedded, keys, modules, schema
from modcache_consumer import amqp

POSTGRES_URL = os.environ.get("MODCACHE_BENCH_POSTGRES_URL", embedded.DEFAULTS["postgres"])
REDIS_URL = os.environ.get("MODCACHE_BENCH_REDIS_URL", embedded.DEFAULTS["redis"])
AMQP_URL = os.environ.get("MODCACHE_BENCH_AMQP_URL", embedded.DEFAULTS["amqp"])


async def print_machine_info() -> None:
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        pg_version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        redis_version = (await client.info("server"))["redis_version"]
    finally:
        await client.aclose()
    connection = await aio_pika.connect(AMQP_URL)
    try:
        broker = connection.transport.connection.server_properties.get("version", b"?")  # type: ignore[union-attr]
    finally:
        await connection.close()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")), "?"
    )
    load = os.getloadavg()
    print(f"machine: {cpu}, {os.cpu_count()} cores, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(
        f"software: Python {platform.python_version()}, PostgreSQL {pg_version}, Redis {redis_version}, "
        f"RabbitMQ {broker.decode() if isinstance(broker, bytes) else broker}, "
        + ", ".join(f"{d} {metadata.version(d)}" for d in ("sqlalchemy", "asyncpg", "redis", "aio-pika"))
    )


def _lines(path: str) -> list[str]:
    with contextlib.suppress(OSError):
        return Path(path).read_text().splitlines()
    return []


def scratch_database() -> contextlib.AbstractAsyncContextManager[str]:
    """A migrated database of its own, dropped afterwards."""
    return _support.bench_database()


@contextlib.asynccontextmanager
async def scratch_keyspace() -> AsyncIterator[keys.KeySpace]:
    scope = f"bench{uuid.uuid4().hex[:8]}:"
    yield keys.KeySpace(f"{scope}{keys.DEFAULT_PREFIX}")
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        doomed = [k async for k in client.scan_iter(match=f"{scope}*", count=10_000)]
        for start in range(0, len(doomed), 10_000):
            await client.delete(*doomed[start : start + 10_000])
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def scratch_queue() -> AsyncIterator[str]:
    name = f"bench-{uuid.uuid4().hex[:8]}.workflow-executions"
    yield name
    await amqp.delete(AMQP_URL, amqp.Names.for_queue(name))


async def load_modules(database_url: str, count: int, *, size_bytes: int = 4096, prefix: str = "lib/m") -> None:
    """``count`` modules of ``size_bytes`` each, generated server-side."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """
            INSERT INTO workspace_files (path, content, content_hash, size_bytes, entity_type)
            SELECT p, c, encode(sha256(convert_to(c, 'UTF8')), 'hex'), octet_length(c), 'module'
            FROM (SELECT $1 || n || '.py' AS p, 'V = ' || n || E'\\n#' || repeat('x', $2) AS c
                  FROM generate_series(0, $3 - 1) AS n) AS g
            """,
            prefix,
            max(0, size_bytes - 16),
            count,
        )
    finally:
        await conn.close()


def percentile(samples: Sequence[float], q: float) -> float:
    if len(samples) < 2:
        return samples[0] if samples else 0.0
    return statistics.quantiles(samples, n=100, method="inclusive")[int(q) - 1]


def describe_ms(samples: Sequence[float]) -> str:
    ms = [s * 1000 for s in samples]
    return f"p50 {percentile(ms, 50):8.2f} ms   p99 {percentile(ms, 99):8.2f} ms   (n={len(ms)})"


class PlanSession:
    """The original plan's persistent session and module sync, as written in the seed plan (Tasks 1, 2 and 5)."""

    def __init__(self, *, sessions: async_sessionmaker[AsyncSession], client: aioredis.Redis, keyspace: keys.KeySpace):
        self._sessions = sessions
        self._client = client
        self._keyspace = keyspace
        self._db_session: AsyncSession | None = None

    async def start(self) -> None:
        self._db_session = self._sessions()

    async def stop(self) -> None:
        if self._db_session is not None:
            await self._db_session.close()
            self._db_session = None

    async def _get_db_session(self) -> AsyncSession:
        if self._db_session is None:
            self._db_session = self._sessions()
        try:
            await self._db_session.execute(sa.text("SELECT 1"))
        except sa.exc.DBAPIError:
            await self._db_session.close()
            self._db_session = self._sessions()
        return self._db_session

    async def _sync_module_cache(self) -> int:
        session = await self._get_db_session()
        rows = (
            await session.execute(
                sa.select(schema.WorkspaceFile).where(
                    schema.WorkspaceFile.entity_type == "module",
                    schema.WorkspaceFile.is_deleted.is_(False),
                    schema.WorkspaceFile.content.is_not(None),
                )
            )
        ).scalars()
        await self._client.smembers(self._keyspace.index)
        added = 0
        for module in rows.all():
            key = self._keyspace.content(module.path)
            if not await self._client.exists(key):
                assert module.content is not None
                await self._client.set(key, modules.encode_cached(module.path, module.content, module.content_hash))
                await self._client.sadd(self._keyspace.index, module.path)
                added += 1
        return added
