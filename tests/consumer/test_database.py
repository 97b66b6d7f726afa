"""The persistent database access against a real PostgreSQL: lifecycle, reconnects, no shared sessions,
no idle-in-transaction backends (bifrost-contract.md, defect 5)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from modcache import errors
from modcache_consumer import database


class Counting:
    def __init__(self) -> None:
        self.connects = 0
        self.reconnects: list[str] = []

    def on_connect(self) -> None:
        self.connects += 1

    def on_reconnect(self, reason: str) -> None:
        self.reconnects.append(reason)


@pytest.fixture
def app_name() -> str:
    return f"t-db-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def db(database_url: str, app_name: str) -> AsyncIterator[tuple[database.Database, Counting]]:
    observer = Counting()
    the_db = database.Database(url=database_url, pool_size=5, application_name=app_name, observer=observer)
    await the_db.start()
    yield the_db, observer
    await the_db.close()


async def backends(database_url: str, app_name: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(
            "SELECT pid, state FROM pg_stat_activity WHERE application_name = $1", app_name
        )
        return rows
    finally:
        await conn.close()


async def terminate(database_url: str, app_name: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        killed: int = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1", app_name
        )
        return killed
    finally:
        await conn.close()


async def backend_pid(session: AsyncSession) -> int:
    pid: int = (await session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
    return pid


async def test_start_opens_the_pool_and_close_ends_every_backend(database_url: str, app_name: str) -> None:
    the_db = database.Database(url=database_url, application_name=app_name)
    assert await backends(database_url, app_name) == []
    await the_db.start()
    assert [r["state"] for r in await backends(database_url, app_name)] == ["idle"]
    await the_db.close()
    assert await backends(database_url, app_name) == []


async def test_terminated_backend_between_units_is_replaced_and_the_next_unit_succeeds(
    db: tuple[database.Database, Counting], database_url: str, app_name: str
) -> None:
    the_db, observer = db
    first = await the_db.run(backend_pid)
    assert await terminate(database_url, app_name) == 1
    second = await the_db.run(backend_pid)  # no error reaches the caller
    assert second != first
    assert len(observer.reconnects) == 1
    assert observer.connects == 2


async def test_backend_terminated_inside_a_unit_is_retried_on_a_fresh_connection(
    db: tuple[database.Database, Counting], database_url: str, app_name: str
) -> None:
    the_db, observer = db
    attempts: list[int] = []

    async def unit(session: AsyncSession) -> int:
        pid = await backend_pid(session)
        attempts.append(pid)
        if len(attempts) == 1:
            await terminate(database_url, app_name)
        return await backend_pid(session)

    result = await the_db.run(unit)
    assert len(attempts) == 2
    assert result == attempts[1] != attempts[0]
    assert observer.reconnects


async def test_twenty_concurrent_units_each_get_their_own_session(db: tuple[database.Database, Counting]) -> None:
    the_db, observer = db

    async def unit(session: AsyncSession) -> tuple[AsyncSession, int]:
        await session.execute(sa.text("SELECT pg_sleep(0.02)"))
        return session, await backend_pid(session)

    results = await asyncio.gather(*(the_db.run(unit) for _ in range(20)))  # never "another operation in progress"
    assert len({id(session) for session, _ in results}) == 20  # all alive in `results`: ids are distinct objects
    assert len({pid for _, pid in results}) <= 5  # the pool bounds the backends
    assert observer.connects <= 5


async def test_no_backend_stays_idle_in_transaction_after_units_succeed_or_fail(
    db: tuple[database.Database, Counting], database_url: str, app_name: str
) -> None:
    the_db, _ = db

    async def failing(session: AsyncSession) -> None:
        await session.execute(sa.text("SELECT * FROM workflows"))
        raise LookupError("a bug in the unit")

    await asyncio.gather(*(the_db.run(backend_pid) for _ in range(5)))
    with pytest.raises(LookupError):
        await the_db.run(failing)
    states = [r["state"] for r in await backends(database_url, app_name)]
    assert states
    assert set(states) == {"idle"}
    conn = await asyncpg.connect(database_url)
    try:  # a migration-style lock is granted at once: no transaction holds the table
        await conn.execute("SET lock_timeout = '2s'; ALTER TABLE workflows ADD COLUMN probe int")
    finally:
        await conn.close()


async def test_after_commit_callbacks_run_after_the_commit_and_never_after_a_rollback(
    db: tuple[database.Database, Counting], database_url: str
) -> None:
    the_db, _ = db
    seen: list[int] = []

    async def count_elsewhere() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            seen.append(await conn.fetchval("SELECT count(*) FROM organizations"))
        finally:
            await conn.close()

    async def insert(session: AsyncSession, *, fail: bool) -> None:
        await session.execute(sa.text("INSERT INTO organizations (name) VALUES ('acme')"))
        assert database.after_commit(session, count_elsewhere)
        if fail:
            raise LookupError("rolled back")

    with pytest.raises(LookupError):
        await the_db.run(lambda s: insert(s, fail=True))
    assert seen == []
    await the_db.run(lambda s: insert(s, fail=False))
    assert seen == [1]  # ran once the row was visible to other connections


async def test_after_commit_refuses_a_session_it_does_not_own(db: tuple[database.Database, Counting]) -> None:
    the_db, _ = db
    async with AsyncSession(the_db.engine) as foreign:
        assert database.after_commit(foreign, asyncio.sleep) is False


async def test_an_unreachable_server_is_source_unavailable_without_the_password() -> None:
    from modcache import errors

    the_db = database.Database(url="postgresql://user:hunter2@127.0.0.1:1/none")
    with pytest.raises(errors.SourceUnavailable) as caught:
        await the_db.start()
    await the_db.close()
    assert "hunter2" not in str(caught.value)


async def test_an_autocommit_unit_commits_each_statement_at_once(
    db: tuple[database.Database, Counting], database_url: str, app_name: str
) -> None:
    the_db, _ = db
    seen_elsewhere: list[int] = []

    async def unit(session: AsyncSession) -> None:
        await session.execute(sa.text("INSERT INTO organizations (name) VALUES ('acme')"))
        conn = await asyncpg.connect(database_url)
        try:
            seen_elsewhere.append(await conn.fetchval("SELECT count(*) FROM organizations"))
        finally:
            await conn.close()

    await the_db.run(unit)  # one transaction: the row is invisible to others until the unit ends
    await the_db.run(unit, autocommit=True)  # each statement commits by itself: visible at once
    assert seen_elsewhere == [0, 2]
    assert {r["state"] for r in await backends(database_url, app_name)} == {"idle"}


class _DriverError(Exception):
    """What SQLAlchemy's asyncpg adapter puts in ``DBAPIError.orig``: the message and the server's SQLSTATE."""

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "unavailable"),
    [
        ("57P03", True),  # "the database system is starting up": every restart, raised at connect as a plain Error
        ("57P01", True),  # admin shutdown
        ("53300", True),  # too many connections
        ("08006", True),  # connection failure
        ("42P01", False),  # undefined table: a bug, not an outage
        (None, False),
    ],
)
def test_server_states_that_mean_try_later_become_source_unavailable(sqlstate: str | None, unavailable: bool) -> None:
    error = sa.exc.DBAPIError("connect", None, _DriverError("the server said no", sqlstate))
    translated = database._translate(error)
    assert isinstance(translated, errors.SourceUnavailable) is unavailable
    assert (translated is error) is not unavailable


# -- Database.raw: the hot path's plain asyncpg statements ---------------------------------------------------


async def test_a_raw_unit_whose_backend_is_terminated_is_retried_once_on_a_fresh_connection(
    db: tuple[database.Database, Counting], database_url: str, app_name: str
) -> None:
    the_db, observer = db
    attempts: list[int] = []

    async def unit(conn: asyncpg.Connection) -> int:
        attempts.append(await conn.fetchval("SELECT pg_backend_pid()"))
        if len(attempts) == 1:
            await terminate(database_url, app_name)
        pid: int = await conn.fetchval("SELECT pg_backend_pid()")
        return pid

    assert await the_db.raw(unit) == attempts[1] != attempts[0]
    assert len(observer.reconnects) == 1
    assert await the_db.raw(lambda conn: conn.fetchval("SELECT 1")) == 1  # the pool is healthy again


async def test_a_raw_unit_that_keeps_losing_its_connection_is_source_unavailable(
    db: tuple[database.Database, Counting], database_url: str, app_name: str
) -> None:
    the_db, _ = db

    async def unit(conn: asyncpg.Connection) -> None:
        await terminate(database_url, app_name)
        await conn.fetchval("SELECT 1")

    with pytest.raises(errors.SourceUnavailable):
        await the_db.raw(unit)


async def test_a_raw_statement_the_server_refuses_is_raised_as_it_is_and_the_connection_kept(
    db: tuple[database.Database, Counting],
) -> None:
    the_db, observer = db
    with pytest.raises(asyncpg.UndefinedTableError):
        await the_db.raw(lambda conn: conn.fetch("SELECT * FROM no_such_table"))
    assert await the_db.raw(lambda conn: conn.fetchval("SELECT 1")) == 1
    assert (observer.connects, observer.reconnects) == (1, [])


def test_raw_numbers_named_parameters_once_each_and_leaves_casts_alone() -> None:
    raw = database.Raw(sa.text("SELECT CAST(:a AS int), :b::text, make_interval(secs => :a)"), json_params=("b",))
    assert raw.sql == "SELECT CAST($1 AS int), $2::text, make_interval(secs => $1)"
    assert raw.args({"a": 3, "b": {"k": [1]}}) == [3, '{"k": [1]}']
