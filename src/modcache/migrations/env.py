"""Alembic environment: async engine, modcache's own version table (never Bifrost's ``alembic_version``)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from modcache import db, schema

VERSION_TABLE = "modcache_alembic_version"


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=schema.Base.metadata, version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: str) -> None:
    engine = db.make_engine(url, pool_size=1, application_name="modcache-migrations")
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


url = context.config.get_main_option("sqlalchemy.url")
assert url, "modcache.db.upgrade sets sqlalchemy.url"
asyncio.run(_run_async(url))
