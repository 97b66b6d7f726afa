"""The ``executions`` table: claiming an execution, recording how it ended, reading a finished one back.

Every statement is idempotent on ``execution_id``, which is what makes redelivery safe:

* ``claim`` moves a new or unfinished (PENDING/RUNNING) execution to RUNNING and says so; a finished one is
  left alone and returned as it is, so a redelivered message never runs it again;
* ``finish`` records the outcome only while the execution is unfinished (the first outcome wins) and returns
  what is stored, which is what the caller replies with.

A RUNNING row on redelivery means the consumer that ran it died before finishing: it is run again.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.ext.asyncio import AsyncSession

from modcache import schema
from modcache_consumer import messages

E = schema.Execution


@dataclasses.dataclass(frozen=True)
class Record:
    id: uuid.UUID
    status: messages.Status
    workflow_id: uuid.UUID | None
    workflow_name: str | None
    organization_id: uuid.UUID | None
    outcome: messages.Outcome


# Plain SQL with typed parameters: built once; executing it costs no per-call statement analysis (the ORM's
# cache-key generation for a 9-column INSERT was the largest CPU item per message).
_JSON = pg.JSONB(none_as_null=True)
_CLAIM = sa.text(
    """
    INSERT INTO executions (id, workflow_id, workflow_name, organization_id, status, parameters, started_at)
    VALUES (:id, :workflow_id, :workflow_name, :organization_id, 'RUNNING', :parameters, now())
    ON CONFLICT (id) DO UPDATE SET status = 'RUNNING', workflow_name = EXCLUDED.workflow_name,
        organization_id = EXCLUDED.organization_id, started_at = now(), updated_at = now()
    WHERE executions.status IN ('PENDING', 'RUNNING')
    RETURNING id
    """
).bindparams(sa.bindparam("parameters", type_=_JSON))
_FINISH = (
    sa.text(
        """
    INSERT INTO executions (id, workflow_id, organization_id, parameters, status, result, error, finished_at,
        duration_ms)
    VALUES (:id, :workflow_id, :organization_id, :parameters, :status, :result, :error, now(), :duration_ms)
    ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, result = EXCLUDED.result, error = EXCLUDED.error,
        finished_at = now(), duration_ms = EXCLUDED.duration_ms, updated_at = now()
    WHERE executions.status IN ('PENDING', 'RUNNING')
    RETURNING id, status, workflow_id, workflow_name, organization_id, result, error, duration_ms
    """
    )
    .bindparams(sa.bindparam("parameters", type_=_JSON), sa.bindparam("result", type_=_JSON))
    .columns(E.id, E.status, E.workflow_id, E.workflow_name, E.organization_id, E.result, E.error, E.duration_ms)
)


async def claim(
    db: AsyncSession,
    request: messages.ExecutionRequest,
    *,
    workflow_name: str | None = None,
    organization_id: uuid.UUID | None = None,
) -> Record | None:
    """Mark the execution RUNNING; None if claimed, else the finished record (do not run it again)."""
    values = {
        "id": request.execution_id,
        "workflow_id": request.workflow_id,
        "workflow_name": workflow_name,
        "organization_id": organization_id or request.organization_id,
        "parameters": request.parameters,
    }
    if (await db.execute(_CLAIM, values)).first() is not None:
        return None
    return await read(db, request.execution_id)


async def finish(db: AsyncSession, request: messages.ExecutionRequest, outcome: messages.Outcome) -> Record:
    """Record ``outcome`` unless the execution already finished; return what is stored either way."""
    values: dict[str, Any] = {
        "id": request.execution_id,
        "workflow_id": request.workflow_id,
        "organization_id": request.organization_id,
        "parameters": request.parameters,
        "status": outcome.status.value,
        "result": outcome.result,
        "error": outcome.error,
        "duration_ms": outcome.duration_ms,
    }
    row = (await db.execute(_FINISH, values)).first()
    record = _record(row) if row is not None else await read(db, request.execution_id)
    assert record is not None  # just written, or already there
    return record


async def read(db: AsyncSession, execution_id: uuid.UUID) -> Record | None:
    row = (await db.execute(sa.select(*_COLUMNS).where(E.id == execution_id))).first()
    return None if row is None else _record(row)


_COLUMNS = (E.id, E.status, E.workflow_id, E.workflow_name, E.organization_id, E.result, E.error, E.duration_ms)


def _record(row: sa.Row[Any]) -> Record:
    status = messages.Status(row.status)
    return Record(
        id=row.id,
        status=status,
        workflow_id=row.workflow_id,
        workflow_name=row.workflow_name,
        organization_id=row.organization_id,
        outcome=messages.Outcome(status=status, result=row.result, error=row.error, duration_ms=row.duration_ms),
    )
