"""PostgreSQL plumbing shared by the CLI, the operator and the consumer: engines, migrations, the trigger."""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from modcache import errors, lineage, settings, triggers

if TYPE_CHECKING:
    from alembic.config import Config


def make_engine(
    url: str,
    *,
    pool_size: int = 5,
    application_name: str = "modcache",
    lineage: lineage.Lineage | None = None,
    command_timeout_s: float | None = None,
    **options: Any,
) -> AsyncEngine:
    """An async engine that checks a pooled connection before handing it out (``pool_pre_ping``; ``options``
    override the pool's settings).

    asyncpg parses the URL itself, as libpq would: several hosts (``h1:5432,h2:5432``, tried in turn, with
    ``target_session_attrs=read-write`` picking the primary), ``sslmode``/``sslrootcert``/``sslcert``/``sslkey``.
    SQLAlchemy's URL parser knows none of these, so the engine gets its connections from asyncpg directly; after a
    failover a new connection reaches whichever host is now the primary. ``wiring`` adds the TLS settings.

    Every engine's connections pass the lineage check (``lineage.connect``: a server of another cluster, on an
    older timeline or behind the recorded WAL position is refused), through ``lineage`` or else one of its own; a
    ``PgSource`` on this engine finds it (``lineage.of``), so no path that reads the source for the cache (the
    consumer's included) goes around it."""
    dsn = settings.asyncpg_dsn(url)
    server_settings = {"application_name": application_name}
    checked = lineage if lineage is not None else lineage_module.Lineage()

    timeouts = {} if command_timeout_s is None else {"command_timeout": command_timeout_s}

    async def connect() -> Any:
        return await lineage_module.connect(dsn, lineage=checked, server_settings=server_settings, **timeouts)

    pool: dict[str, Any] = {"max_overflow": pool_size, "pool_pre_ping": True, "pool_recycle": 1800}
    engine = create_async_engine(
        "postgresql+asyncpg://", async_creator=connect, pool_size=pool_size, **(pool | options)
    )
    lineage_module.attach(engine, checked)
    if checked.connect is None:
        checked.connect = connect
    return engine


def alembic_config(url: str) -> Config:
    # Alembic (with Mako and Pygments) is imported only to migrate: 12 MB that long-running processes
    # (the operator, the consumer, watch mode) never need.
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(resources.files("modcache") / "migrations"))
    config.set_main_option("sqlalchemy.url", settings.sqlalchemy_url(url).replace("%", "%%"))
    return config


async def upgrade(url: str, revision: str = "head") -> None:
    """Run the migrations (in a thread: Alembic's env drives its own event loop)."""
    from alembic import command

    try:
        await asyncio.to_thread(command.upgrade, alembic_config(url), revision)
    except (OSError, sa.exc.SQLAlchemyError) as e:
        raise errors.SourceUnavailable(f"migration failed: {errors.describe(e)}") from e


async def install_trigger(engine: AsyncEngine) -> None:
    """Install (or refresh) only the NOTIFY trigger (and the status record's seal key, ``lineage.KEY_TABLE``), for an
    existing Bifrost database. Idempotent."""
    try:
        async with engine.begin() as conn:
            for statement in (*triggers.install_statements(), *lineage.KEY_STATEMENTS):
                await conn.execute(sa.text(statement))
    except (OSError, sa.exc.SQLAlchemyError) as e:
        raise errors.SourceUnavailable(f"installing the trigger failed: {errors.describe(e)}") from e


lineage_module = lineage  # inside make_engine, ``lineage`` is the parameter
