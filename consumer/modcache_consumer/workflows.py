"""Workflow rows: the lookup an execution needs, and the writes behind ``modcache workflows put | ls``.

``get_workflow_for_execution(workflow_id, db=None)`` keeps the original plan's signature: with ``db`` it reads
through the caller's session (inside the caller's unit of work, seeing what that transaction sees); without, it opens a
unit of work of its own. Workflow rows are read from PostgreSQL every time (code changes must show at once).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.ext.asyncio import AsyncSession

from modcache import errors, schema
from modcache_consumer import database

DEFAULT_TIMEOUT_S = 1800


class WorkflowNotFound(errors.InputError):
    def __init__(self, workflow: str) -> None:
        super().__init__(workflow, "no active workflow with this id")


@dataclasses.dataclass(frozen=True)
class WorkflowForExecution:
    """What a worker needs to run a workflow (the original plan's dict, typed)."""

    id: uuid.UUID
    name: str
    function_name: str
    path: str | None
    code: str | None
    timeout_seconds: int
    execution_mode: str
    organization_id: uuid.UUID | None
    time_saved: int
    value: float
    retries_on_crash: int = 0  # crash policy: runs again after its consumer died mid-run, at most this often


@dataclasses.dataclass(frozen=True)
class WorkflowRow:
    """A workflow as ``modcache workflows ls`` shows it."""

    id: uuid.UUID
    name: str
    function_name: str
    path: str | None
    timeout_seconds: int
    organization_id: uuid.UUID | None
    is_active: bool


_BY_ID = sa.text(
    "SELECT id, name, function_name, path, code, timeout_seconds, execution_mode, organization_id, time_saved, "
    "value, retries_on_crash FROM workflows WHERE id = :id AND is_active"
)

_BY_ID_RAW = database.Raw(_BY_ID)


class Workflows:
    def __init__(self, *, database: database.Database) -> None:
        self._database = database

    async def get_workflow_for_execution(
        self, workflow_id: uuid.UUID | str, db: AsyncSession | None = None
    ) -> WorkflowForExecution:
        """The active workflow ``workflow_id``, or WorkflowNotFound."""
        if db is None:
            return await self._database.run(lambda own: self.get_workflow_for_execution(workflow_id, db=own))
        key = _as_uuid(workflow_id)
        row = None if key is None else (await db.execute(_BY_ID, {"id": key})).first()
        if row is None:
            raise WorkflowNotFound(str(workflow_id))
        return _for_execution(dict(row._mapping))

    async def read_for_execution(self, workflow_id: uuid.UUID | str) -> WorkflowForExecution:
        """``get_workflow_for_execution`` on a plain asyncpg connection (``Database.raw``: the hot path)."""
        key = _as_uuid(workflow_id)
        row = None if key is None else await self._database.raw(lambda db: db.fetchrow(_BY_ID_RAW.sql, key))
        if row is None:
            raise WorkflowNotFound(str(workflow_id))
        return _for_execution(row)

    async def put(
        self,
        name: str,
        code: str,
        *,
        function_name: str,
        path: str | None = None,
        timeout_seconds: int = DEFAULT_TIMEOUT_S,
        organization_id: uuid.UUID | None = None,
        retries_on_crash: int = 0,
    ) -> uuid.UUID:
        """Create or replace the workflow called ``name``; its id stays the same across updates."""
        if not name.strip():
            raise errors.InputError("name", "must not be empty")
        if not function_name.isidentifier():
            raise errors.InputError(function_name, "--function must be a Python identifier")
        if timeout_seconds <= 0:
            raise errors.InputError("timeout_seconds", "must be positive")
        if retries_on_crash < 0:
            raise errors.InputError("retries_on_crash", "must not be negative")
        values = {
            "name": name,
            "function_name": function_name,
            "path": path,
            "code": code,
            "timeout_seconds": timeout_seconds,
            "organization_id": organization_id,
            "is_active": True,
            "retries_on_crash": retries_on_crash,
        }
        insert = pg.insert(schema.Workflow).values(values)
        statement = insert.on_conflict_do_update(
            index_elements=[schema.Workflow.name],
            set_={**{k: insert.excluded[k] for k in values if k != "name"}, "updated_at": sa.func.now()},
        ).returning(schema.Workflow.id)

        async def upsert(db: AsyncSession) -> uuid.UUID:
            workflow_id: uuid.UUID = (await db.execute(statement)).scalar_one()
            return workflow_id

        return await self._database.run(upsert)

    async def id_by_name(self, name: str) -> uuid.UUID:
        async def find(db: AsyncSession) -> uuid.UUID | None:
            query = sa.select(schema.Workflow.id).where(schema.Workflow.name == name, schema.Workflow.is_active)
            found: uuid.UUID | None = (await db.execute(query)).scalar_one_or_none()
            return found

        found = await self._database.run(find)
        if found is None:
            raise errors.InputError(name, "no active workflow with this name")
        return found

    async def list(self) -> Sequence[WorkflowRow]:
        async def rows(db: AsyncSession) -> Sequence[WorkflowRow]:
            result = await db.execute(sa.select(schema.Workflow).order_by(schema.Workflow.name))
            return [
                WorkflowRow(
                    id=w.id,
                    name=w.name,
                    function_name=w.function_name,
                    path=w.path,
                    timeout_seconds=w.timeout_seconds,
                    organization_id=w.organization_id,
                    is_active=w.is_active,
                )
                for w in result.scalars()
            ]

        return await self._database.run(rows)


def _for_execution(row: Mapping[str, Any]) -> WorkflowForExecution:
    return WorkflowForExecution(
        id=row["id"],
        name=row["name"],
        function_name=row["function_name"],
        path=row["path"],
        code=row["code"],
        timeout_seconds=row["timeout_seconds"] or DEFAULT_TIMEOUT_S,
        execution_mode=row["execution_mode"] or "async",
        organization_id=row["organization_id"],
        time_saved=row["time_saved"] or 0,
        value=float(row["value"] or 0),
        retries_on_crash=row["retries_on_crash"] or 0,
    )


def _as_uuid(value: uuid.UUID | str) -> uuid.UUID | None:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(value)
    except ValueError:
        return None
