"""The ``executions`` table: leases, fenced outcomes, owed replies and crash recovery (issue 10).

PostgreSQL, not the broker, owns an execution once it is claimed. Every running execution carries a **lease**
(``lease_owner``, ``lease_token``, ``lease_expires_at``, all compared against the database's clock):

* ``claim`` takes it: a new execution, a PENDING one (a retry, or a row another system created) or a RUNNING one
  whose lease expired and whose crash policy allows another attempt becomes RUNNING with ``attempt + 1`` and a
  fresh **fencing token** (``lease_token + 1``). Anything else is left alone and read back: finished (never run
  again), or running under a live lease (``Busy``: someone else runs it);
* the owner ``renew``\\ s the leases of everything it runs, in one statement per interval;
* ``finish_leased`` records outcomes **only for the current token** (``WHERE lease_token = :token``): a consumer
  that lost its lease (it stalled past the expiry and the execution was recovered) records nothing;
* an execution with a ``reply_to`` stays leased by the owner after its outcome until ``mark_replied`` (usually
  folded into the next ``finish_leased``): if the owner dies in between, the reply is still owed and a sweeper
  sends it from the stored outcome;
* ``sweep`` is crash recovery: rows whose lease expired are handled by their workflow's policy in one
  statement (``FOR UPDATE SKIP LOCKED``, so concurrent sweepers split the work): RUNNING with attempts left ->
  PENDING (the sweeper republishes its message; once the broker confirmed it, ``republished`` extends the lease
  to ``unowned_s``), RUNNING without -> FAILED ``consumer died mid-run``; PENDING -> republished again (the last
  republish was not confirmed, or its message vanished); finished with a reply owed -> replied.
  The sweeper takes each row's lease while it acts on it, so a sweeper that dies mid-way is itself recovered.

So RUNNING is never permanent: a live owner renews and finishes (the executor's timeout bounds every run), a
dead one's lease expires and some sweeper applies the policy. Attempts count runs: 1 is the first.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NewType

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.ext.asyncio import AsyncSession

from modcache import schema
from modcache_consumer import database, messages

E = schema.Execution
Owner = NewType("Owner", str)

#: The error of an execution whose consumer died (or stopped) while it ran and whose policy says fail.
DIED_MID_RUN = "consumer died mid-run"


@dataclasses.dataclass(frozen=True)
class Lease:
    """A claim on one execution: only the holder of ``token`` may record its outcome."""

    execution_id: uuid.UUID
    token: int
    attempt: int


@dataclasses.dataclass(frozen=True)
class Record:
    id: uuid.UUID
    status: messages.Status
    workflow_id: uuid.UUID | None
    workflow_name: str | None
    organization_id: uuid.UUID | None
    outcome: messages.Outcome
    attempt: int = 0
    leased: bool = False  # a live lease exists (someone runs it, or is about to reply)
    owner: str | None = None  # who holds that lease
    replied: bool = False  # its reply was sent (replied_at is set)...
    reply_to: str | None = None  # ...to this queue, with this correlation id
    correlation_id: str | None = None
    parameters: Any = None  # as stored (``read`` only)
    token: int | None = None  # the lease's fencing token (``read`` only)

    def same(self, request: messages.ExecutionRequest, organization_id: uuid.UUID | None) -> bool:
        """Whether ``request`` (its organization resolved to ``organization_id``) is this row's execution."""
        return (self.workflow_id, self.organization_id, self.parameters) == (
            request.workflow_id,
            organization_id,
            request.parameters,
        )

    def answers(self, request: messages.ExecutionRequest) -> bool:
        """Whether ``request`` is the one this row replies to (same reply queue and correlation id)."""
        return (self.reply_to, self.correlation_id) == (request.reply_to, request.correlation_id)

    def replied_to(self, request: messages.ExecutionRequest) -> bool:
        """Whether ``request`` already had its reply: a duplicate."""
        return self.replied and self.answers(request)


class Foreign(Exception):
    """A request names the id of another execution (another workflow, organization or parameters): it may neither
    run in that row nor be answered from it."""

    def __init__(self, execution_id: uuid.UUID) -> None:
        super().__init__(
            f"execution id {execution_id} belongs to another execution (its workflow, organization or parameters "
            "differ)"
        )


@dataclasses.dataclass(frozen=True)
class Busy:
    """Running under a live lease elsewhere (or here): its owner records the outcome and replies."""

    record: Record | None  # None: this consumer itself runs it (a second delivery)


class Action(enum.StrEnum):
    """What a sweeper does next with a row it recovered."""

    REPUBLISH = "republish"  # PENDING: publish its message again (a retry, by policy)
    REPLY = "reply"  # finished with a reply owed: send it, then mark_replied
    NOTHING = "nothing"  # failed by policy, nobody waits for a reply


#: Where a reply goes: (reply_to, correlation_id).
Target = tuple[str, str | None]


@dataclasses.dataclass(frozen=True)
class Recovered:
    """One row a sweep took over, with what to do about it."""

    action: Action
    request: messages.ExecutionRequest
    record: Record
    previous_status: messages.Status
    waiting: tuple[Target, ...] = ()  # other callers owed the same reply


def targets(stored: Any) -> tuple[Target, ...]:
    """The waiting callers as stored (``waiting_replies``, JSON text or parsed); anything malformed is skipped."""
    if isinstance(stored, str):
        stored = json.loads(stored)
    found = []
    for item in stored if isinstance(stored, list) else ():
        if isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and item[0]:
            found.append((item[0], item[1] if isinstance(item[1], str) else None))
    return tuple(found)


# Plain SQL with typed parameters: built once; executing it costs no per-call statement analysis.
_JSON = pg.JSONB(none_as_null=True)
_LEASE = "now() + make_interval(secs => :lease_s)"
# A request may act on an existing row only if it is the same execution: the row's workflow, organization and
# parameters (attack-8b A11: a message naming another organization's execution id took over its PENDING row).
_SAME = """executions.workflow_id IS NOT DISTINCT FROM EXCLUDED.workflow_id
      AND executions.organization_id IS NOT DISTINCT FROM EXCLUDED.organization_id
      AND executions.parameters = EXCLUDED.parameters"""
# The same for an outcome decided before any run, where the request may leave the organization to the workflow.
_SAME_UNLEASED = """executions.workflow_id IS NOT DISTINCT FROM EXCLUDED.workflow_id
      AND (EXCLUDED.organization_id IS NULL OR executions.organization_id IS NOT DISTINCT FROM EXCLUDED.organization_id)
      AND executions.parameters = EXCLUDED.parameters"""
_NO_REPLY_OWED = "e.reply_to IS NULL AND e.waiting_replies = '[]'::jsonb"
_EXPIRED = "COALESCE(executions.lease_expires_at, executions.updated_at + make_interval(secs => :unowned_s)) < now()"
_CLAIM = sa.text(
    f"""
    INSERT INTO executions (id, workflow_id, workflow_name, organization_id, status, parameters, started_at,
        lease_owner, lease_token, lease_expires_at, attempt, max_attempts, reply_to, correlation_id)
    VALUES (:id, :workflow_id, :workflow_name, :organization_id, 'RUNNING', :parameters, now(),
        :owner, 1, {_LEASE}, 1, :max_attempts, :reply_to, :correlation_id)
    ON CONFLICT (id) DO UPDATE SET status = 'RUNNING', workflow_name = EXCLUDED.workflow_name,
        organization_id = EXCLUDED.organization_id, started_at = now(), updated_at = now(),
        lease_owner = EXCLUDED.lease_owner, lease_token = executions.lease_token + 1,
        lease_expires_at = EXCLUDED.lease_expires_at,
        attempt = executions.attempt + CASE WHEN executions.status = 'RUNNING'
            AND executions.lease_owner = EXCLUDED.lease_owner THEN 0 ELSE 1 END,
        max_attempts = EXCLUDED.max_attempts, replied_at = NULL,
        reply_to = COALESCE(executions.reply_to, EXCLUDED.reply_to),
        correlation_id = CASE WHEN executions.reply_to IS NULL THEN EXCLUDED.correlation_id
            ELSE executions.correlation_id END
    WHERE (executions.status = 'PENDING'
       OR (executions.status = 'RUNNING' AND executions.lease_owner = EXCLUDED.lease_owner)
       OR (executions.status = 'RUNNING' AND {_EXPIRED} AND GREATEST(executions.attempt, 1) < executions.max_attempts))
      AND {_SAME}
    RETURNING id, lease_token, attempt
    """
).bindparams(sa.bindparam("parameters", type_=_JSON))

_CLAIM_RAW = database.Raw(_CLAIM, json_params=("parameters",))

_RETURNED = "id, status, workflow_id, workflow_name, organization_id, result, error, duration_ms, attempt"
_READ = sa.text(
    f"""
    SELECT {_RETURNED}, COALESCE(lease_expires_at > now(), false) AS leased, lease_owner,
        replied_at IS NOT NULL AS replied, reply_to, correlation_id, parameters, lease_token
    FROM executions WHERE id = :id
    """
)
# An outcome without a lease (the execution failed before it could run: unknown workflow, bad organization).
_FINISH_UNLEASED = (
    sa.text(
        f"""
    INSERT INTO executions (id, workflow_id, organization_id, parameters, status, result, error, finished_at,
        duration_ms, reply_to, correlation_id, lease_owner, lease_expires_at)
    VALUES (:id, :workflow_id, :organization_id, :parameters, :status, :result, :error, now(), :duration_ms,
        :reply_to, :correlation_id, CAST(:reply_owner AS varchar),
        CASE WHEN CAST(:reply_owner AS varchar) IS NULL THEN NULL ELSE {_LEASE} END)
    ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, result = EXCLUDED.result, error = EXCLUDED.error,
        finished_at = now(), duration_ms = EXCLUDED.duration_ms, updated_at = now(),
        reply_to = EXCLUDED.reply_to, correlation_id = EXCLUDED.correlation_id, replied_at = NULL,
        lease_owner = EXCLUDED.lease_owner, lease_expires_at = EXCLUDED.lease_expires_at
    WHERE (executions.status = 'PENDING' OR (executions.status = 'RUNNING' AND {_EXPIRED})) AND {_SAME_UNLEASED}
    RETURNING id
    """
    )
    .bindparams(sa.bindparam("parameters", type_=_JSON), sa.bindparam("result", type_=_JSON))
    .columns(E.id)
)
# Outcomes of leased runs, many at once; each only if its token is still the current one. The same statement
# marks earlier executions' replies sent (``_REPLIED``, folded in: one statement per batch, not two).
_FINISH_LEASED = sa.text(
    f"""
    WITH marked AS (
        UPDATE executions SET replied_at = now(), lease_owner = NULL, lease_expires_at = NULL
        WHERE id = ANY(CAST(:replied AS uuid[])) AND lease_owner = :owner AND status NOT IN ('PENDING', 'RUNNING')
        RETURNING id
    )
    UPDATE executions AS e SET status = v.status, result = v.result::jsonb, error = v.error, finished_at = now(),
        duration_ms = v.duration_ms, updated_at = now(),
        lease_owner = CASE WHEN {_NO_REPLY_OWED} THEN NULL ELSE e.lease_owner END,
        lease_expires_at = CASE WHEN {_NO_REPLY_OWED} THEN NULL ELSE {_LEASE} END
    FROM unnest(CAST(:ids AS uuid[]), CAST(:tokens AS bigint[]), CAST(:statuses AS text[]),
                CAST(:results AS text[]), CAST(:errors AS text[]), CAST(:durations AS integer[]))
         AS v(id, token, status, result, error, duration_ms)
    WHERE e.id = v.id AND e.lease_token = v.token AND e.status = 'RUNNING' AND e.lease_owner = :owner
    RETURNING e.id, e.waiting_replies
    """
)
_FINISH_LEASED_RAW = database.Raw(_FINISH_LEASED)
# A lease is renewed only while it is still the one held: the same token (a run's lease; a later claim, even by
# this consumer, took a new one) and not PENDING (a sweep took the run over: attack-10 F4). A hold without a
# token is a finished row whose reply is owed. A row someone else has locked is skipped this round (neither
# renewed nor lost): one admin's ``SELECT ... FOR UPDATE`` blocked the whole statement, so every other lease of
# the consumer ran out and their runs were stopped (attack-10b N1).
_RENEW = sa.text(
    f"""
    WITH seen AS (
        SELECT e.id, e.lease_owner = :owner AND e.status <> 'PENDING'
            AND (e.lease_token = v.token OR (v.token IS NULL AND e.status <> 'RUNNING')) AS ours
        FROM executions AS e JOIN unnest(CAST(:ids AS uuid[]), CAST(:tokens AS bigint[])) AS v(id, token)
            ON e.id = v.id
        FOR UPDATE OF e SKIP LOCKED
    ), renewed AS (
        UPDATE executions AS e SET lease_expires_at = {_LEASE} FROM seen WHERE e.id = seen.id AND seen.ours
    )
    SELECT id, ours FROM seen
    """
)
_POSTPONE = sa.text(
    f"""
    UPDATE executions SET status = 'PENDING', attempt = attempt - 1, lease_expires_at = {_LEASE}, updated_at = now()
    WHERE id = :id AND lease_token = :token AND lease_owner = :owner AND status = 'RUNNING'
    """
)
_REPUBLISHED = sa.text(
    """
    UPDATE executions SET lease_expires_at = now() + make_interval(secs => :unowned_s)
    WHERE id = :id AND lease_owner = :owner AND status = 'PENDING'
    """
)
_RELEASE = sa.text(
    "UPDATE executions SET lease_expires_at = now() WHERE id = ANY(CAST(:ids AS uuid[])) AND lease_owner = :owner"
)
_REPLIED = sa.text(
    """
    UPDATE executions SET replied_at = now(), lease_owner = NULL, lease_expires_at = NULL
    WHERE id = ANY(CAST(:ids AS uuid[])) AND lease_owner = :owner AND status NOT IN ('PENDING', 'RUNNING')
    """
)
_REPLIED_RAW = database.Raw(_REPLIED)
_TARGET = "jsonb_build_array(jsonb_build_array(CAST(:reply_to AS text), CAST(:correlation_id AS text)))"
# Another caller of an execution that is not finished yet: answered with its outcome (by the owner, or by the sweep
# that sends owed replies); not the row's own caller, not twice, at most :max_waiting of them.
_WAIT = sa.text(
    f"""
    UPDATE executions SET waiting_replies = waiting_replies || {_TARGET}
    WHERE id = :id AND status IN ('PENDING', 'RUNNING')
      AND (reply_to IS DISTINCT FROM :reply_to OR correlation_id IS DISTINCT FROM :correlation_id)
      AND NOT waiting_replies @> {_TARGET} AND jsonb_array_length(waiting_replies) < :max_waiting
    RETURNING id
    """
)
_SWEEP = sa.text(
    f"""
    WITH due AS (
        SELECT id, status AS previous,
            CASE WHEN status <> 'RUNNING' THEN status
                 WHEN GREATEST(attempt, 1) < max_attempts THEN 'PENDING' ELSE 'FAILED' END AS status
        FROM executions
        WHERE (lease_owner IS NOT NULL OR status = 'RUNNING') AND {_EXPIRED}
          AND (CAST(:only AS uuid) IS NULL OR id = CAST(:only AS uuid))
        ORDER BY lease_expires_at NULLS FIRST
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ), decided AS (
        SELECT e.id, d.previous, d.status,
            d.status = 'PENDING' OR (d.status <> 'RUNNING' AND NOT ({_NO_REPLY_OWED}) AND e.replied_at IS NULL)
                AS owned
        FROM executions AS e JOIN due AS d ON d.id = e.id
    )
    UPDATE executions AS e SET
        status = d.status,
        error = CASE WHEN d.previous = 'RUNNING' AND d.status = 'FAILED' THEN :reason ELSE e.error END,
        finished_at = CASE WHEN d.previous = 'RUNNING' AND d.status = 'FAILED' THEN now() ELSE e.finished_at END,
        duration_ms = CASE WHEN d.previous = 'RUNNING' AND d.status = 'FAILED'
            THEN LEAST(extract(epoch FROM now() - COALESCE(e.started_at, now())) * 1000, 2147483647)::integer
            ELSE e.duration_ms END,  -- a run started over 24.8 days ago overflowed int4 and failed every sweep (F2)
        lease_owner = CASE WHEN d.owned THEN :owner ELSE NULL END,
        lease_expires_at = CASE WHEN d.owned THEN {_LEASE} ELSE NULL END,
        updated_at = now()
    FROM decided AS d
    WHERE e.id = d.id
    RETURNING e.id, e.status, e.workflow_id, e.workflow_name, e.organization_id, e.result, e.error, e.duration_ms,
        e.attempt, e.parameters, e.reply_to, e.correlation_id, e.lease_owner, d.previous, d.owned, e.waiting_replies
    """
)


@dataclasses.dataclass(frozen=True)
class Terms:
    """The lease terms every statement of one consumer uses."""

    owner: Owner
    lease_s: float  # a lease lives this long after each claim or renewal
    unowned_s: float  # a RUNNING row with no lease (written before leases existed) counts as expired after this


async def claim(
    db: AsyncSession,
    request: messages.ExecutionRequest,
    *,
    terms: Terms,
    workflow_name: str | None = None,
    organization_id: uuid.UUID | None = None,
    max_attempts: int = 1,
) -> Lease | Record | Busy:
    """Take the lease and mark the execution RUNNING; else what is there: a finished Record, or Busy. Foreign if
    the row is another execution's (another workflow, organization or parameters): it is left alone."""
    values = _claim_values(request, terms, workflow_name, organization_id, max_attempts)
    row = (await db.execute(_CLAIM, values)).first()
    if row is not None:
        return Lease(execution_id=row.id, token=row.lease_token, attempt=row.attempt)
    record = await read(db, request.execution_id)
    assert record is not None  # the insert conflicted: the row exists
    if not record.same(request, values["organization_id"]):
        raise Foreign(request.execution_id)
    if record.status is messages.Status.RUNNING and not record.leased:  # expired, no attempts left: fail it now
        swept = await sweep(db, terms=terms, only=request.execution_id)
        return swept[0].record if swept else await claim_again(db, request, terms=terms)
    if not record.status.finished:
        return Busy(record)
    return record


async def try_claim(
    db: asyncpg.Connection,
    request: messages.ExecutionRequest,
    *,
    terms: Terms,
    workflow_name: str | None = None,
    organization_id: uuid.UUID | None = None,
    max_attempts: int = 1,
) -> Lease | None:
    """``claim``'s first statement alone, on a plain asyncpg connection (``Database.raw``, the hot path): the
    lease, or None when the row exists and is not claimable (then ``claim`` finds out what is there)."""
    values = _claim_values(request, terms, workflow_name, organization_id, max_attempts)
    row = await db.fetchrow(_CLAIM_RAW.sql, *_CLAIM_RAW.args(values))
    if row is None:
        return None
    return Lease(execution_id=row["id"], token=row["lease_token"], attempt=row["attempt"])


def _claim_values(
    request: messages.ExecutionRequest,
    terms: Terms,
    workflow_name: str | None,
    organization_id: uuid.UUID | None,
    max_attempts: int,
) -> dict[str, Any]:
    return {
        "id": request.execution_id,
        "workflow_id": request.workflow_id,
        "workflow_name": workflow_name,
        "organization_id": organization_id or request.organization_id,
        "parameters": request.parameters,
        "owner": terms.owner,
        "lease_s": terms.lease_s,
        "unowned_s": terms.unowned_s,
        "max_attempts": max_attempts,
        "reply_to": request.reply_to,
        "correlation_id": request.correlation_id,
    }


async def claim_again(db: AsyncSession, request: messages.ExecutionRequest, *, terms: Terms) -> Busy | Record:
    """Another sweeper took the row between our two statements: report what it left."""
    record = await read(db, request.execution_id)
    assert record is not None
    return record if record.status.finished else Busy(record)


async def finish_unleased(
    db: AsyncSession, request: messages.ExecutionRequest, outcome: messages.Outcome, *, terms: Terms
) -> Record:
    """Record an outcome decided before any run (unless one is stored); return what is stored either way.
    With a ``reply_to`` the row stays leased by ``terms.owner`` until ``mark_replied``."""
    values: dict[str, Any] = {
        "id": request.execution_id,
        "workflow_id": request.workflow_id,
        "organization_id": request.organization_id,
        "parameters": request.parameters,
        "status": outcome.status.value,
        "result": outcome.result,
        "error": outcome.error,
        "duration_ms": outcome.duration_ms,
        "reply_to": request.reply_to,
        "correlation_id": request.correlation_id,
        "reply_owner": terms.owner if request.reply_to else None,
        "lease_s": terms.lease_s,
        "unowned_s": terms.unowned_s,
    }
    await db.execute(_FINISH_UNLEASED, values)
    record = await read(db, request.execution_id)
    assert record is not None  # just written, or already there
    if not record.same(request, request.organization_id or record.organization_id):
        raise Foreign(request.execution_id)
    return record


async def finish_leased(
    db: AsyncSession | asyncpg.Connection,
    outcomes: Sequence[tuple[Lease, messages.Outcome]],
    *,
    terms: Terms,
    replied: Sequence[uuid.UUID] = (),
) -> set[uuid.UUID]:
    """Record many outcomes in one statement; returns the ids recorded (the others' leases were lost). The same
    statement does ``mark_replied`` for ``replied`` (other executions, finished earlier)."""
    return set(await finish_leased_waiting(db, outcomes, terms=terms, replied=replied))


async def finish_leased_waiting(
    db: AsyncSession | asyncpg.Connection,
    outcomes: Sequence[tuple[Lease, messages.Outcome]],
    *,
    terms: Terms,
    replied: Sequence[uuid.UUID] = (),
) -> dict[uuid.UUID, tuple[Target, ...]]:
    """``finish_leased``, returning for each execution recorded the other callers waiting for its reply."""
    if not outcomes and not replied:
        return {}
    values = {
        "replied": list(replied),
        "ids": [lease.execution_id for lease, _ in outcomes],
        "tokens": [lease.token for lease, _ in outcomes],
        "statuses": [o.status.value for _, o in outcomes],
        "results": [None if o.result is None else json.dumps(o.result) for _, o in outcomes],
        "errors": [o.error for _, o in outcomes],
        "durations": [o.duration_ms for _, o in outcomes],
        "owner": terms.owner,
        "lease_s": terms.lease_s,
    }
    rows = await _FINISH_LEASED_RAW.fetch(db, _FINISH_LEASED, values)
    return {row["id"]: targets(row["waiting_replies"]) for row in rows}


async def wait_for_outcome(
    db: AsyncSession, request: messages.ExecutionRequest, *, max_waiting: int = 16
) -> Record | None:
    """``request`` (with a reply address) names an execution that is not finished: have its reply sent to this
    caller too when it is. None: it will be (or this caller is the row's own, or one of too many); a finished
    Record: it finished meanwhile, reply from it now."""
    values = {
        "id": request.execution_id,
        "reply_to": request.reply_to,
        "correlation_id": request.correlation_id,
        "max_waiting": max_waiting,
    }
    if (await db.execute(_WAIT, values)).first() is not None:
        return None
    record = await read(db, request.execution_id)
    return record if record is not None and record.status.finished else None


async def renew(db: AsyncSession, held: Mapping[uuid.UUID, int | None], *, terms: Terms) -> dict[uuid.UUID, bool]:
    """Extend the leases ``terms.owner`` holds: execution id -> the token of its run's lease, or None for a
    finished execution whose reply is owed. Returns, for each row it could look at, whether its lease is still
    held (and so was extended); rows locked by someone else are missing (not renewed this time, not lost)."""
    if not held:
        return {}
    values = {"ids": list(held), "tokens": list(held.values()), "owner": terms.owner, "lease_s": terms.lease_s}
    return {row.id: bool(row.ours) for row in await db.execute(_RENEW, values)}


async def postpone(db: AsyncSession, lease: Lease, *, terms: Terms) -> None:
    """Nothing ran (the executor was gone after the claim): PENDING again, the attempt not used, still leased by
    ``terms.owner`` while its message is published again (``republished``); if that never happens, the lease
    expires and a sweep republishes it."""
    values = {"id": lease.execution_id, "token": lease.token, "owner": terms.owner, "lease_s": terms.lease_s}
    await db.execute(_POSTPONE, values)


async def republished(db: AsyncSession, execution_id: uuid.UUID, *, terms: Terms) -> None:
    """The broker confirmed a retry's message: it is queued durably and the consumer that takes it claims the row
    (or its redelivery does). Republish again only if the row is still PENDING after ``terms.unowned_s``."""
    await db.execute(_REPUBLISHED, {"id": execution_id, "owner": terms.owner, "unowned_s": terms.unowned_s})


async def release(db: AsyncSession, ids: Iterable[uuid.UUID], *, owner: Owner) -> None:
    """Let the leases on ``ids`` expire now (this consumer stops without finishing them): the next sweep
    applies their policy instead of waiting for the expiry."""
    wanted = list(ids)
    if wanted:
        await db.execute(_RELEASE, {"ids": wanted, "owner": owner})


async def mark_replied(db: AsyncSession | asyncpg.Connection, ids: Iterable[uuid.UUID], *, owner: Owner) -> None:
    """The replies of ``ids`` were sent: nothing is owed any more and their leases end."""
    wanted = list(ids)
    if wanted:
        await _REPLIED_RAW.fetch(db, _REPLIED, {"ids": wanted, "owner": owner})


async def sweep(
    db: AsyncSession,
    *,
    terms: Terms,
    limit: int = 100,
    only: uuid.UUID | None = None,
    reason: str = DIED_MID_RUN,
) -> list[Recovered]:
    """Take over up to ``limit`` rows whose lease expired and apply their policy (see the module docstring)."""
    values = {
        "owner": terms.owner,
        "lease_s": terms.lease_s,
        "unowned_s": terms.unowned_s,
        "limit": limit,
        "only": only,
        "reason": reason,
    }
    return [_recovered(row) for row in await db.execute(_SWEEP, values)]


async def read(db: AsyncSession, execution_id: uuid.UUID) -> Record | None:
    row = (await db.execute(_READ, {"id": execution_id})).first()
    if row is None:
        return None
    record = _record(row, leased=row.leased, owner=row.lease_owner, replied=row.replied)
    stored = {"reply_to": row.reply_to, "correlation_id": row.correlation_id, "parameters": row.parameters}
    return dataclasses.replace(record, **stored, token=row.lease_token)


def _recovered(row: sa.Row[Any]) -> Recovered:
    record = dataclasses.replace(
        _record(row, leased=row.owned, owner=row.lease_owner), reply_to=row.reply_to, correlation_id=row.correlation_id
    )
    request = messages.ExecutionRequest(
        execution_id=messages.ExecutionId(row.id),
        workflow_id=messages.WorkflowId(row.workflow_id),
        organization_id=messages.OrganizationId(row.organization_id) if row.organization_id else None,
        parameters=row.parameters or {},
        reply_to=row.reply_to,
        correlation_id=row.correlation_id,
    )
    waiting = targets(row.waiting_replies)
    if record.status is messages.Status.PENDING:
        action = Action.REPUBLISH
    elif row.owned:
        action = Action.REPLY
    else:
        action = Action.NOTHING
    previous = messages.Status(row.previous)
    return Recovered(action=action, request=request, record=record, previous_status=previous, waiting=waiting)


def _record(row: sa.Row[Any], *, leased: bool = False, owner: str | None = None, replied: bool = False) -> Record:
    status = messages.Status(row.status)
    return Record(
        id=row.id,
        status=status,
        workflow_id=row.workflow_id,
        workflow_name=row.workflow_name,
        organization_id=row.organization_id,
        outcome=messages.Outcome(status=status, result=row.result, error=row.error, duration_ms=row.duration_ms),
        attempt=row.attempt,
        leased=leased,
        owner=owner if leased else None,
        replied=replied,
    )
