"""Shared plumbing of the operator benchmarks: a scratch database, bulk-loaded modules, the emulated API.

The Kubernetes API is kmock's emulator (the same one the tests use, from ``tests/operatorkit``); PostgreSQL and
Redis are the real services at ``MODCACHE_TEST_*_URL`` (default: this machine's).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import platform
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import psutil
import redis.asyncio as aioredis

from bench import _support
from modcache import embedded

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the emulator lives with the tests

from operatorkit.cluster import NAMESPACE, Cluster, cache_spec, emulated_api  # noqa: E402

__all__ = ["NAMESPACE", "Cluster", "emulated_api"]


def service_url(name: str) -> str:
    return os.environ.get(f"MODCACHE_TEST_{name.upper()}_URL", embedded.DEFAULTS[name])


async def machine_info() -> str:
    memory_gib = psutil.virtual_memory().total / 2**30
    conn = await asyncpg.connect(service_url("postgres"))
    try:
        pg = (await conn.fetchval("SHOW server_version")).split()[0]
    finally:
        await conn.close()
    client = aioredis.Redis.from_url(service_url("redis"))
    try:
        redis_version = (await client.info("server"))["redis_version"]
    finally:
        await client.aclose()
    cpu = platform.processor() or platform.machine()
    return (
        f"machine: {cpu}, {psutil.cpu_count()} cores, {memory_gib:.0f} GiB; Python {platform.python_version()}; "
        f"PostgreSQL {pg}; Redis {redis_version} (loopback)"
    )


def scratch_database() -> contextlib.AbstractAsyncContextManager[str]:
    """A migrated database of the benchmark's own, dropped afterwards."""
    return _support.bench_database()


async def load_modules(url: str, count: int, size_bytes: int) -> None:
    """``count`` live modules of ``size_bytes`` each, with COPY (the NOTIFY trigger fires once per statement)."""
    filler = "#" * max(0, size_bytes - 40)

    def row(n: int) -> tuple[str, str, str, int, str]:
        content = f"VALUE = {n}\n{filler}\n"
        raw = content.encode()
        return f"pkg/mod_{n:06d}.py", content, hashlib.sha256(raw).hexdigest(), len(raw), "module"

    conn = await asyncpg.connect(url)
    try:
        await conn.copy_records_to_table(
            "workspace_files",
            records=(row(n) for n in range(count)),
            columns=["path", "content", "content_hash", "size_bytes", "entity_type"],
        )
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def scratch_prefix() -> AsyncIterator[str]:
    """A key prefix of the benchmark's own, its keys deleted afterwards."""
    scope = f"bench{uuid.uuid4().hex[:8]}:"
    yield f"{scope}bifrost:module:"
    client = aioredis.Redis.from_url(service_url("redis"))
    try:
        doomed = [k async for k in client.scan_iter(match=f"{scope}*", count=10_000)]
        for start in range(0, len(doomed), 10_000):
            await client.delete(*doomed[start : start + 10_000])
    finally:
        await client.aclose()


spec = cache_spec


async def until_ready(port: int, timeout_s: float = 60.0) -> None:
    """Until the operator's ``/readyz`` on ``port`` answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/readyz") as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise TimeoutError("the operator never became ready")


def kubeconfig(url: str, path: Path) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f'clusters: [{{name: kmock, cluster: {{server: "{url}"}}}}]\n'
        "users: [{name: bench, user: {token: bench}}]\n"
        "contexts: [{name: bench, context: {cluster: kmock, user: bench}}]\ncurrent-context: bench\n"
    )
    return path
