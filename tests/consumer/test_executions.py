"""Leases, fencing, owed replies and crash recovery of ``executions``, against the real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from modcache_consumer import database, executions, messages

A = executions.Terms(owner=executions.Owner("consumer-a"), lease_s=30.0, unowned_s=60.0)
B = executions.Terms(owner=executions.Owner("consumer-b"), lease_s=30.0, unowned_s=60.0)
DONE = messages.Outcome(messages.Status.SUCCESS, result={"n": 1}, duration_ms=3)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[database.Database]:
    the_db = database.Database(url=database_url, pool_size=2, application_name="modcache-test")
    yield the_db
    await the_db.close()


def request(execution_id: uuid.UUID | None = None, *, reply_to: str | None = "replies") -> messages.ExecutionRequest:
    return messages.ExecutionRequest(
        execution_id=messages.ExecutionId(execution_id or uuid.uuid4()),
        workflow_id=messages.WorkflowId(uuid.uuid4()),
        parameters={"n": 1},
        reply_to=reply_to,
        correlation_id="c-1" if reply_to else None,
    )


async def row(url: str, execution_id: uuid.UUID) -> asyncpg.Record:
    conn = await asyncpg.connect(url)
    try:
        found = await conn.fetchrow("SELECT * FROM executions WHERE id = $1", execution_id)
    finally:
        await conn.close()
    assert found is not None
    return found


async def sql(url: str, statement: str, *args: Any) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement, *args)
    finally:
        await conn.close()


async def expire(url: str, execution_id: uuid.UUID) -> None:
    await sql(url, "UPDATE executions SET lease_expires_at = now() - interval '1 s' WHERE id = $1", execution_id)


async def test_a_claim_takes_a_lease_with_token_and_attempt_and_a_second_claim_is_busy(
    db: database.Database, database_url: str
) -> None:
    req = request()
    first = await db.run(lambda s: executions.claim(s, req, terms=A, max_attempts=3))
    second = await db.run(lambda s: executions.claim(s, req, terms=B, max_attempts=3))
    assert isinstance(first, executions.Lease)
    assert (first.token, first.attempt) == (1, 1)
    assert isinstance(second, executions.Busy)
    assert second.record.leased
    stored = await row(database_url, req.execution_id)
    assert (stored["status"], stored["lease_owner"], stored["max_attempts"]) == ("RUNNING", "consumer-a", 3)
    assert (stored["reply_to"], stored["correlation_id"]) == ("replies", "c-1")


async def test_only_the_current_token_records_an_outcome(db: database.Database, database_url: str) -> None:
    req = request()
    old = await db.run(lambda s: executions.claim(s, req, terms=A, max_attempts=2))
    assert isinstance(old, executions.Lease)
    await expire(database_url, req.execution_id)
    new = await db.run(lambda s: executions.claim(s, req, terms=B, max_attempts=2))  # a retry by policy
    assert isinstance(new, executions.Lease)
    assert (new.token, new.attempt) == (2, 2)
    stale = messages.Outcome(messages.Status.FAILED, error="late")
    assert await db.run(lambda s: executions.finish_leased(s, [(old, stale)], terms=A)) == set()
    assert await db.run(lambda s: executions.finish_leased(s, [(new, DONE)], terms=B)) == {req.execution_id}
    stored = await row(database_url, req.execution_id)
    assert (stored["status"], stored["attempt"], stored["lease_owner"]) == ("SUCCESS", 2, "consumer-b")
    assert stored["replied_at"] is None  # the reply is still owed, under B's lease


async def test_a_finished_execution_is_never_claimed_again(db: database.Database) -> None:
    req = request(reply_to=None)
    lease = await db.run(lambda s: executions.claim(s, req, terms=A))
    assert isinstance(lease, executions.Lease)
    await db.run(lambda s: executions.finish_leased(s, [(lease, DONE)], terms=A))
    again = await db.run(lambda s: executions.claim(s, req, terms=B))
    assert isinstance(again, executions.Record)
    assert (again.status, again.outcome.result, again.leased) == (messages.Status.SUCCESS, {"n": 1}, False)


async def test_outcomes_are_recorded_in_one_batch(db: database.Database, database_url: str) -> None:
    reqs = [request(reply_to=None) for _ in range(5)]
    leases = [await db.run(lambda s, r=r: executions.claim(s, r, terms=A)) for r in reqs]
    batch = [(lease, DONE) for lease in leases if isinstance(lease, executions.Lease)]
    assert await db.run(lambda s: executions.finish_leased(s, batch, terms=A)) == {r.execution_id for r in reqs}
    stored = await row(database_url, reqs[0].execution_id)
    assert (stored["lease_owner"], stored["lease_expires_at"]) == (None, None)  # no reply owed: lease ended


async def test_an_outcome_batch_marks_earlier_replies_sent_in_the_same_statement(
    db: database.Database, database_url: str
) -> None:
    answered, running, foreign = request(), request(), request()
    leases = {}
    for r in (answered, running, foreign):
        leases[r.execution_id] = await db.run(lambda s, r=r: executions.claim(s, r, terms=B if r is foreign else A))
    for done in (answered, foreign):
        owner = B if done is foreign else A
        lease = leases[done.execution_id]
        assert await db.run(lambda s, x=lease, o=owner: executions.finish_leased(s, [(x, DONE)], terms=o))
    replied = [answered.execution_id, foreign.execution_id]  # foreign: B owes that reply, A cannot mark it
    recorded = await db.run(
        lambda s: executions.finish_leased(s, [(leases[running.execution_id], DONE)], terms=A, replied=replied)
    )
    assert recorded == {running.execution_id}
    marked, fresh, untouched = [await row(database_url, r.execution_id) for r in (answered, running, foreign)]
    assert (marked["replied_at"] is not None, marked["lease_owner"]) == (True, None)
    assert (fresh["status"], fresh["replied_at"], fresh["lease_owner"]) == ("SUCCESS", None, "consumer-a")
    assert (untouched["replied_at"], untouched["lease_owner"]) == (None, "consumer-b")
    await db.run(lambda s: executions.finish_leased(s, [], terms=A, replied=[running.execution_id]))  # marks alone
    assert (await row(database_url, running.execution_id))["replied_at"] is not None


async def test_renew_keeps_only_the_leases_still_held(db: database.Database, database_url: str) -> None:
    ours, lost, stale, swept = request(), request(), request(), request()
    tokens = {}
    for r in (ours, lost, stale, swept):
        lease = await db.run(lambda s, r=r: executions.claim(s, r, terms=A, max_attempts=2))
        assert isinstance(lease, executions.Lease)
        tokens[r.execution_id] = lease.token
    await expire(database_url, lost.execution_id)
    await db.run(lambda s: executions.claim(s, lost, terms=B, max_attempts=2))  # taken over by B
    await db.run(lambda s: executions.claim(s, stale, terms=A, max_attempts=2))  # claimed again by A: a new token
    await expire(database_url, swept.execution_id)
    await db.run(lambda s: executions.sweep(s, terms=A))  # A's own sweep made its run PENDING (attack-10 F4)
    seen = await db.run(lambda s: executions.renew(s, tokens, terms=A))
    assert seen == {
        ours.execution_id: True,
        lost.execution_id: False,
        stale.execution_id: False,
        swept.execution_id: False,
    }


async def test_a_sweep_fails_an_expired_run_by_default_and_owes_its_reply(
    db: database.Database, database_url: str
) -> None:
    req = request()
    await db.run(lambda s: executions.claim(s, req, terms=A))
    assert await db.run(lambda s: executions.sweep(s, terms=B)) == []  # the lease is live
    await expire(database_url, req.execution_id)
    [recovered] = await db.run(lambda s: executions.sweep(s, terms=B))
    assert recovered.action is executions.Action.REPLY
    assert (recovered.previous_status, recovered.record.status) == (messages.Status.RUNNING, messages.Status.FAILED)
    assert recovered.record.outcome.error == executions.DIED_MID_RUN
    assert (recovered.request.reply_to, recovered.request.correlation_id) == ("replies", "c-1")
    assert await db.run(lambda s: executions.sweep(s, terms=A)) == []  # B holds it while replying
    await db.run(lambda s: executions.mark_replied(s, [req.execution_id], owner=B.owner))
    stored = await row(database_url, req.execution_id)
    assert stored["replied_at"] is not None
    assert stored["lease_owner"] is None


async def test_a_sweep_requeues_a_run_with_attempts_left_and_the_retry_claims_it(
    db: database.Database, database_url: str
) -> None:
    req = request(reply_to=None)
    await db.run(lambda s: executions.claim(s, req, terms=A, max_attempts=2))
    await expire(database_url, req.execution_id)
    [recovered] = await db.run(lambda s: executions.sweep(s, terms=B))
    assert (recovered.action, recovered.record.status) == (executions.Action.REPUBLISH, messages.Status.PENDING)
    assert recovered.request.parameters == {"n": 1}
    retry = await db.run(lambda s: executions.claim(s, req, terms=A, max_attempts=2))
    assert isinstance(retry, executions.Lease)
    assert retry.attempt == 2
    await expire(database_url, req.execution_id)
    [final] = await db.run(lambda s: executions.sweep(s, terms=B))  # attempts exhausted: fail
    assert (final.action, final.record.status) == (executions.Action.NOTHING, messages.Status.FAILED)
    assert (await row(database_url, req.execution_id))["lease_owner"] is None


async def test_a_republish_that_was_lost_is_republished_again(db: database.Database, database_url: str) -> None:
    req = request(reply_to=None)
    await db.run(lambda s: executions.claim(s, req, terms=A, max_attempts=2))
    await expire(database_url, req.execution_id)
    await db.run(lambda s: executions.sweep(s, terms=B))
    await expire(database_url, req.execution_id)  # B died before its republish reached the broker
    [again] = await db.run(lambda s: executions.sweep(s, terms=A))
    assert again.action is executions.Action.REPUBLISH


async def test_a_redelivered_run_with_no_attempts_left_is_failed_by_the_claim(
    db: database.Database, database_url: str
) -> None:
    req = request()
    await db.run(lambda s: executions.claim(s, req, terms=A))
    await expire(database_url, req.execution_id)
    got = await db.run(lambda s: executions.claim(s, req, terms=B))
    assert isinstance(got, executions.Record)
    assert (got.status, got.outcome.error, got.leased) == (messages.Status.FAILED, executions.DIED_MID_RUN, True)


async def test_a_running_row_without_a_lease_expires_after_the_unowned_grace(
    db: database.Database, database_url: str
) -> None:
    old, recent = uuid.uuid4(), uuid.uuid4()
    for execution_id, age in ((old, 120.0), (recent, 1.0)):
        await sql(
            database_url,
            "INSERT INTO executions (id, status, updated_at) VALUES ($1, 'RUNNING', now() - make_interval(secs => $2))",
            execution_id,
            age,
        )
    recovered = await db.run(lambda s: executions.sweep(s, terms=A))
    assert [(r.record.id, r.record.status) for r in recovered] == [(old, messages.Status.FAILED)]


async def test_release_lets_the_next_sweep_recover_at_once(db: database.Database) -> None:
    req = request(reply_to=None)
    await db.run(lambda s: executions.claim(s, req, terms=A))
    await db.run(lambda s: executions.release(s, [req.execution_id], owner=A.owner))
    [recovered] = await db.run(lambda s: executions.sweep(s, terms=B))
    assert recovered.record.status is messages.Status.FAILED


async def test_an_unleased_outcome_owes_its_reply_until_marked(db: database.Database, database_url: str) -> None:
    req = request()
    failed = messages.Outcome(messages.Status.FAILED, error="no such workflow", duration_ms=0)
    record = await db.run(lambda s: executions.finish_unleased(s, req, failed, terms=A))
    assert (record.status, record.leased, record.replied) == (messages.Status.FAILED, True, False)
    await db.run(lambda s: executions.mark_replied(s, [req.execution_id], owner=A.owner))
    assert (await db.run(lambda s: executions.read(s, req.execution_id))).replied  # type: ignore[union-attr]
