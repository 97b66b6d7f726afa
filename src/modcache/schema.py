"""The PostgreSQL source schema, shaped like Bifrost's (see docs/bifrost-contract.md).

modcache reads ``workspace_files`` (modules), and the consumer reads ``workflows``, ``organizations`` and
``configs`` and writes ``executions``. Alembic migrations in ``modcache/migrations`` create exactly these
tables; against an existing Bifrost database only the NOTIFY trigger (``modcache.triggers``) is installed.
"""

from __future__ import annotations

import datetime
import decimal
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: A live module, as Bifrost defines it (rows with NULL content are reported as rejected, not served).
MODULE_ENTITY_TYPE = "module"
ENTITY_TYPES = ("module", "workflow", "form", "app", "agent", "text")
EXECUTION_STATUSES = ("PENDING", "RUNNING", "SUCCESS", "FAILED", "TIMEOUT")
CONFIG_TYPES = ("string", "int", "bool", "json", "secret")
LEASED_INDEX = "ix_executions_leased"


class Base(DeclarativeBase):
    pass


def _uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(pg.UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()"))


def _timestamp() -> Mapped[datetime.datetime]:
    return mapped_column(sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now())


class WorkspaceFile(Base):
    __tablename__ = "workspace_files"
    __table_args__ = (
        sa.Index(
            "ix_workspace_files_live_modules",
            "path",
            postgresql_where=sa.text("entity_type = 'module' AND NOT is_deleted"),
        ),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    path: Mapped[str] = mapped_column(sa.String(1000), unique=True, nullable=False)
    content: Mapped[str | None] = mapped_column(sa.Text)
    content_hash: Mapped[str] = mapped_column(sa.String(64), nullable=False)
    size_bytes: Mapped[int | None] = mapped_column(sa.Integer)
    entity_type: Mapped[str | None] = mapped_column(sa.String(20))
    is_deleted: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, server_default=sa.false())
    created_at: Mapped[datetime.datetime] = _timestamp()
    updated_at: Mapped[datetime.datetime] = _timestamp()


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[uuid.UUID] = _uuid_pk()
    name: Mapped[str] = mapped_column(sa.String(255), nullable=False)
    domain: Mapped[str | None] = mapped_column(sa.String(255))
    is_active: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, server_default=sa.true())
    created_at: Mapped[datetime.datetime] = _timestamp()


class Workflow(Base):
    __tablename__ = "workflows"

    id: Mapped[uuid.UUID] = _uuid_pk()
    name: Mapped[str] = mapped_column(sa.String(255), unique=True, nullable=False)
    function_name: Mapped[str] = mapped_column(sa.String(255), nullable=False)
    path: Mapped[str | None] = mapped_column(sa.String(1000))
    code: Mapped[str | None] = mapped_column(sa.Text)
    timeout_seconds: Mapped[int] = mapped_column(sa.Integer, nullable=False, server_default="1800")
    execution_mode: Mapped[str] = mapped_column(sa.String(10), nullable=False, server_default="async")
    organization_id: Mapped[uuid.UUID | None] = mapped_column(
        pg.UUID(as_uuid=True), sa.ForeignKey("organizations.id", ondelete="SET NULL")
    )
    is_active: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, server_default=sa.true())
    #: Crash policy: how many times an execution whose consumer died mid-run is run again (0: it fails).
    retries_on_crash: Mapped[int] = mapped_column(sa.Integer, nullable=False, server_default="0")
    time_saved: Mapped[int] = mapped_column(sa.Integer, nullable=False, server_default="0")
    value: Mapped[decimal.Decimal] = mapped_column(sa.Numeric(10, 2), nullable=False, server_default="0")
    created_at: Mapped[datetime.datetime] = _timestamp()
    updated_at: Mapped[datetime.datetime] = _timestamp()


class Config(Base):
    __tablename__ = "configs"
    __table_args__ = (
        sa.Index("uq_configs_global_key", "key", unique=True, postgresql_where=sa.text("organization_id IS NULL")),
        sa.Index(
            "uq_configs_org_key",
            "organization_id",
            "key",
            unique=True,
            postgresql_where=sa.text("organization_id IS NOT NULL"),
        ),
        sa.CheckConstraint(f"config_type IN {CONFIG_TYPES}", name="ck_configs_type"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    key: Mapped[str] = mapped_column(sa.String(255), nullable=False)
    value: Mapped[Any] = mapped_column(pg.JSONB, nullable=False)
    config_type: Mapped[str] = mapped_column(sa.String(20), nullable=False, server_default="string")
    organization_id: Mapped[uuid.UUID | None] = mapped_column(
        pg.UUID(as_uuid=True), sa.ForeignKey("organizations.id", ondelete="CASCADE")
    )
    created_at: Mapped[datetime.datetime] = _timestamp()
    updated_at: Mapped[datetime.datetime] = _timestamp()


class Execution(Base):
    """One execution. The lease columns (migration 0002) say which consumer owns it and until when: the owner
    renews ``lease_expires_at`` while it runs (and until its reply is sent); ``lease_token`` grows by one on
    every claim and fences outcomes (only the holder of the current token records one)."""

    __tablename__ = "executions"
    __table_args__ = (
        sa.CheckConstraint(f"status IN {EXECUTION_STATUSES}", name="ck_executions_status"),
        sa.Index(
            LEASED_INDEX,
            "lease_expires_at",
            postgresql_where=sa.text("lease_owner IS NOT NULL OR status = 'RUNNING'"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(pg.UUID(as_uuid=True), primary_key=True)
    workflow_id: Mapped[uuid.UUID | None] = mapped_column(pg.UUID(as_uuid=True))
    workflow_name: Mapped[str | None] = mapped_column(sa.String(255))
    organization_id: Mapped[uuid.UUID | None] = mapped_column(pg.UUID(as_uuid=True))
    status: Mapped[str] = mapped_column(sa.String(16), nullable=False, server_default="PENDING")
    parameters: Mapped[Any] = mapped_column(pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb"))
    result: Mapped[Any | None] = mapped_column(pg.JSONB)
    error: Mapped[str | None] = mapped_column(sa.Text)
    started_at: Mapped[datetime.datetime | None] = mapped_column(sa.DateTime(timezone=True))
    finished_at: Mapped[datetime.datetime | None] = mapped_column(sa.DateTime(timezone=True))
    duration_ms: Mapped[int | None] = mapped_column(sa.Integer)
    created_at: Mapped[datetime.datetime] = _timestamp()
    updated_at: Mapped[datetime.datetime] = _timestamp()
    lease_owner: Mapped[str | None] = mapped_column(sa.String(255))
    lease_token: Mapped[int] = mapped_column(sa.BigInteger, nullable=False, server_default="0")
    lease_expires_at: Mapped[datetime.datetime | None] = mapped_column(sa.DateTime(timezone=True))
    attempt: Mapped[int] = mapped_column(sa.Integer, nullable=False, server_default="0")
    max_attempts: Mapped[int] = mapped_column(sa.Integer, nullable=False, server_default="1")
    reply_to: Mapped[str | None] = mapped_column(sa.String(255))
    correlation_id: Mapped[str | None] = mapped_column(sa.String(255))
    replied_at: Mapped[datetime.datetime | None] = mapped_column(sa.DateTime(timezone=True))
    # Other callers of a running execution, as [reply_to, correlation_id] pairs (migration 0003): answered with it.
    waiting_replies: Mapped[Any] = mapped_column(pg.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb"))
