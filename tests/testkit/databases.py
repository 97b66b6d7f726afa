"""Throwaway PostgreSQL databases for tests: copies of a migrated template, dropped afterwards."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg


def with_db(url: str, name: str) -> str:
    """``url`` pointing at database ``name``."""
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


async def execute(admin: str, statement: str) -> None:
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def drop(admin: str, name: str) -> None:
    await execute(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def copy_of(admin: str, template: str) -> AsyncIterator[str]:
    """A fresh database copied from ``template`` (file copy: fast for small databases); yields its URL."""
    name = f"modcache_t_{uuid.uuid4().hex[:12]}"
    await execute(admin, f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
    try:
        yield with_db(admin, name)
    finally:
        await drop(admin, name)
