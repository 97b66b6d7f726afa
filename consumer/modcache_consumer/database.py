"""The consumer's persistent database access, done right (bifrost-contract.md, defect 5).

One ``AsyncEngine`` and its pool live as long as the consumer; that is the "persistent session". Each unit of
work gets its **own short AsyncSession** inside one transaction (``session()``): it commits or rolls back and
returns its connection to the pool when the block ends, so no session is ever shared by concurrent tasks and no
backend sits "idle in transaction" between messages (migrations are never blocked).

A stale pooled connection is replaced without a round trip on every checkout:

* a connection whose socket is already closed (``pg_terminate_backend``, a PostgreSQL restart: the loop saw
  the close while idle) is discarded on checkout, at no cost;
* a connection idle longer than ``ping_after_idle_s`` is pinged once before use (a silently dead peer);
* anything else surfaces as a disconnect error inside the unit, which ``run`` retries once on a fresh
  connection (units are idempotent, see ``executions``).

SQLAlchemy's own ``pool_pre_ping`` would instead cost BEGIN, a query and ROLLBACK on every checkout -- the
original plan's per-message ``SELECT 1`` under another name. Errors leave as ``SourceUnavailable`` (connection
problems) or unchanged (bugs), never with the URL in them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from modcache import db, errors

log = logging.getLogger(__name__)

T = TypeVar("T")
AfterCommit = Callable[[], Awaitable[None]]

_AFTER_COMMIT = "modcache_after_commit"
_IDLE_SINCE = "modcache_idle_since"
_UNIT = "modcache_unit"


class Observer(Protocol):
    """What this module reports (``metrics.Metrics`` implements it)."""

    def on_connect(self) -> None: ...

    def on_reconnect(self, reason: str) -> None: ...


class Unobserved:
    def on_connect(self) -> None: ...

    def on_reconnect(self, reason: str) -> None: ...


class Database:
    def __init__(
        self,
        *,
        url: str,
        pool_size: int = 5,
        pool_timeout_s: float = 10.0,
        ping_after_idle_s: float = 30.0,
        command_timeout_s: float | None = None,
        application_name: str = "modcache-consumer",
        observer: Observer | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.application_name = application_name
        self.engine: AsyncEngine = db.make_engine(  # multi-host and TLS URLs as libpq reads them
            url,
            pool_size=pool_size,
            application_name=application_name,
            command_timeout_s=command_timeout_s,  # a statement that hangs (a partition) is an outage, not a wait
            max_overflow=0,  # no overflow: no connection churn under load
            pool_timeout=pool_timeout_s,
            pool_pre_ping=False,  # see the module docstring: our checkout check is cheaper
            pool_recycle=-1,
            hide_parameters=True,  # errors reach logs; workflow parameters and config values must not
        )
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._ping_after_idle_s = ping_after_idle_s
        self._unit_timeout_s = command_timeout_s  # a unit that takes longer is an outage (a silent partition)
        self._kept: list[_Held] = []  # connections raw() keeps checked out between its units (see raw)
        self._max_kept = max(0, pool_size - 1)
        self._wanting = 0  # session units waiting to check out
        self._closing = False
        self._observer = observer or Unobserved()
        self._monotonic = monotonic
        sync_engine = self.engine.sync_engine
        sa.event.listen(sync_engine, "connect", self._on_connect)
        sa.event.listen(sync_engine, "checkin", self._on_checkin)
        sa.event.listen(sync_engine, "checkout", self._on_checkout)
        sa.event.listen(sync_engine, "invalidate", self._on_invalidate)

    async def start(self) -> None:
        """Open the first connection now, so a bad URL or a down server fails the consumer's start."""
        await self.run(lambda db: db.execute(sa.text("SELECT 1")))

    async def close(self) -> None:
        """Close every pooled connection (the end of the persistent session)."""
        self._closing = True
        while self._kept:
            await _quietly_close(self._kept.pop().conn)
        await self.engine.dispose()

    @asynccontextmanager
    async def session(self, *, autocommit: bool = False) -> AsyncIterator[AsyncSession]:
        """A unit of work: its own AsyncSession in one transaction, committed on success, rolled back on error.

        ``autocommit``: each statement commits by itself, for units whose statements are independent and
        idempotent (the hot path): no BEGIN/COMMIT round trips, and nothing can be left open in between.
        Callbacks registered with ``after_commit`` run once the commit succeeded (cache fills never precede it).
        """
        async with self._sessions() as db:
            db.info[_UNIT] = True
            async with db.begin():
                self._wanting += 1  # meanwhile raw keeps no connection it could have handed back
                try:
                    await self._lend()
                    # procured now (autocommit must be set as the connection is, before any statement)
                    await db.connection(execution_options={"isolation_level": "AUTOCOMMIT"} if autocommit else None)
                finally:
                    self._wanting -= 1
                yield db
            callbacks: list[AfterCommit] = db.info.pop(_AFTER_COMMIT, [])
        for callback in callbacks:
            await callback()

    async def run(self, unit: Callable[[AsyncSession], Awaitable[T]], *, autocommit: bool = False) -> T:
        """Run ``unit`` in its own session; retried once on a fresh connection if the connection died."""
        for attempt in (1, 2):
            try:
                async with asyncio.timeout(self._unit_timeout_s), self.session(autocommit=autocommit) as db:
                    return await unit(db)
            except sa.exc.DBAPIError as e:
                if e.connection_invalidated and attempt == 1:
                    log.info("database connection lost mid-unit; retrying on a fresh one")
                    continue
                raise _translate(e) from e
            except (OSError, TimeoutError, sa.exc.TimeoutError) as e:
                raise errors.SourceUnavailable(f"PostgreSQL unreachable: {errors.describe(e)}") from e
            except (asyncpg.InterfaceError, asyncpg.InternalClientError) as e:
                if not _lost(e):
                    raise
                if attempt == 1:  # e.g. while SQLAlchemy set up a new connection whose backend was terminated
                    continue
                raise errors.SourceUnavailable(f"PostgreSQL unavailable: {errors.describe(e)}") from e
        raise AssertionError("unreachable")

    async def raw(self, unit: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run ``unit`` on a pooled connection's asyncpg connection itself: each statement commits by itself
        (as ``run(..., autocommit=True)``), without SQLAlchemy's session and statement machinery, which costs
        more CPU than the statement (the hot path: claims, outcomes, replied marks; see ``Raw``). The same
        pool, checkout checks and error handling as ``run``: a dead connection is replaced and the unit
        retried once (units are idempotent), outages leave as ``SourceUnavailable``.

        A connection a unit used well is kept checked out for the next unit (``_Held``, at most
        ``pool_size - 1`` of them, so one is always left for everything else): taking it again costs a
        ``is_closed`` check, not SQLAlchemy's checkout and checkin (a third of the hot path's CPU). A session
        unit that finds the pool empty gets one of them back (``_lend``)."""
        for attempt in (1, 2):
            lost = False
            try:
                async with asyncio.timeout(self._unit_timeout_s):
                    held = await self._take()
                try:
                    async with asyncio.timeout(self._unit_timeout_s):
                        result = await unit(held.driver)
                except BaseException as e:
                    lost = isinstance(e, Exception) and _lost(e)
                    await self._give_back(held, e if lost else None, keep=False)
                    raise
                await self._give_back(held, None, keep=True)
                return result
            except Exception as e:
                if lost and attempt == 1:
                    log.info("database connection lost mid-unit; retrying on a fresh one")
                    continue
                if isinstance(e, sa.exc.DBAPIError):  # at checkout (connecting)
                    if e.connection_invalidated and attempt == 1:
                        continue
                    raise _translate(e) from e
                if _lost(e):  # while connecting (e.g. SQLAlchemy's codec setup on a terminated backend)
                    if attempt == 1:
                        continue
                    raise errors.SourceUnavailable(f"PostgreSQL unavailable: {errors.describe(e)}") from e
                raise
        raise AssertionError("unreachable")

    async def _take(self) -> _Held:
        """A kept connection that passes the checkout checks (closed: discarded; idle too long: pinged), or a
        fresh checkout from the pool."""
        while self._kept:
            held = self._kept.pop()
            idle_s = self._monotonic() - held.idle_since
            if not held.driver.is_closed():
                if idle_s <= self._ping_after_idle_s:
                    return held
                try:
                    await held.driver.execute("SELECT 1")
                    return held
                except Exception as e:
                    held.fairy.invalidate(e)
            await _quietly_close(held.conn)
        conn = await self.engine.connect()
        try:
            fairy = await conn.get_raw_connection()
        except BaseException:
            await conn.close()
            raise
        return _Held(conn=conn, fairy=fairy, driver=fairy.driver_connection, idle_since=0.0)

    async def _give_back(self, held: _Held, lost: BaseException | None, *, keep: bool) -> None:
        if lost is not None:
            held.fairy.invalidate(lost)
        elif keep and not self._closing and not self._wanting and len(self._kept) < self._max_kept:
            held.idle_since = self._monotonic()
            self._kept.append(held)
            return
        await _quietly_close(held.conn)

    async def _lend(self) -> None:
        """Before a session unit checks out: if every pooled connection is out and some are kept idle by
        ``raw``, return one to the pool (else the unit would wait for a connection nobody uses)."""
        pool = self.engine.sync_engine.pool
        checkedout, size = getattr(pool, "checkedout", None), getattr(pool, "size", None)
        if self._kept and callable(checkedout) and callable(size) and checkedout() >= size():
            await _quietly_close(self._kept.pop(0).conn)

    # -- pool events (called by SQLAlchemy, synchronously, inside its greenlet) -------------------------------

    def _on_connect(self, dbapi_conn: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = self._monotonic()
        self._observer.on_connect()

    def _on_checkin(self, dbapi_conn: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = self._monotonic()

    def _on_checkout(self, dbapi_conn: Any, record: Any, proxy: Any) -> None:
        if dbapi_conn.driver_connection.is_closed():
            raise sa.exc.DisconnectionError("connection was closed while pooled")
        idle_s = self._monotonic() - record.info.get(_IDLE_SINCE, self._monotonic())
        if idle_s > self._ping_after_idle_s:
            try:
                dbapi_conn.ping()
            except Exception as e:
                raise sa.exc.DisconnectionError(f"ping after {idle_s:.0f}s idle failed") from e

    def _on_invalidate(self, dbapi_conn: Any, record: Any, exception: BaseException | None) -> None:
        reason = errors.describe(exception) if exception is not None else "invalidated"
        log.info("replacing a database connection: %s", reason)
        self._observer.on_reconnect(reason)


@dataclasses.dataclass
class _Held:
    """A pooled connection ``raw`` holds: SQLAlchemy's connection, its pool entry and the asyncpg connection."""

    conn: AsyncConnection
    fairy: Any
    driver: asyncpg.Connection
    idle_since: float


async def _quietly_close(conn: AsyncConnection) -> None:
    """Return ``conn`` to the pool (a connection already invalidated is discarded there)."""
    try:
        await conn.close()
    except Exception as e:
        log.info("closing a database connection failed: %s", errors.describe(e))


def after_commit(db: AsyncSession, callback: AfterCommit) -> bool:
    """Run ``callback`` after ``db``'s unit of work commits; False if ``db`` is not a ``Database.session()``
    (then nobody would run it: the caller skips the side effect rather than run it before a commit)."""
    if not db.info.get(_UNIT):
        return False
    db.info.setdefault(_AFTER_COMMIT, []).append(callback)
    return True


#: SQLSTATEs meaning "this server cannot serve you now", which asyncpg raises at connect as a plain Error (not an
#: OperationalError): connection exceptions (class 08), too many connections (53300), and admin shutdown, crash
#: shutdown and "the database system is starting up" (57P01-57P03, met during every restart), and a primary that a
#: failover has just made a replica (25006, read-only: the next connection reaches the new primary).
UNAVAILABLE_SQLSTATES = ("08", "53300", "57P01", "57P02", "57P03", "25006")


class Raw:
    """A ``sa.text`` statement for asyncpg too (``Database.raw``): the same SQL with ``:name`` parameters
    numbered ``$1..$n``; parameters named in ``json`` are sent as JSON text (asyncpg's jsonb codec)."""

    def __init__(self, statement: sa.TextClause, *, json_params: Iterable[str] = ()) -> None:
        self.names: list[str] = []
        self.sql = _PARAMETER.sub(self._number, statement.text)
        self._json = frozenset(json_params)

    def _number(self, match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in self.names:
            self.names.append(name)
        return f"${self.names.index(name) + 1}"

    def args(self, values: Mapping[str, Any]) -> list[Any]:
        return [json.dumps(values[n]) if n in self._json and values[n] is not None else values[n] for n in self.names]

    async def fetch(
        self, db: AsyncSession | asyncpg.Connection, text: sa.TextClause, values: Mapping[str, Any]
    ) -> Sequence[Mapping[str, Any]]:
        """Rows of ``text`` (this statement) as mappings, through a session or an asyncpg connection."""
        if isinstance(db, AsyncSession):
            result = await db.execute(text, dict(values))
            returns_rows = getattr(result, "returns_rows", True)  # a CursorResult: False for UPDATE without RETURNING
            return [dict(row._mapping) for row in result] if returns_rows else []
        rows: list[Mapping[str, Any]] = await db.fetch(self.sql, *self.args(values))
        return rows


_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")


#: What asyncpg says when the connection under a statement died or its protocol is in a state it cannot leave
#: (a backend terminated while pooled, or while SQLAlchemy set up a new connection's codecs: its FATAL message
#: arrived before our next statement). A unit never shares its connection, so "another operation" is never ours.
#: Other InterfaceErrors (a wrong number of arguments, bad data) are bugs and stay so.
_CONNECTION_GONE = ("connection is closed", "connection was closed", "another operation is in progress")


def _lost(e: BaseException) -> bool:
    """Whether ``e`` (or what it wraps) means the connection or the server went away, not a bug or a refused
    statement (attack-10 F10: a terminated backend met while connecting was taken for a bug: executions failed
    without running, and a run's outcome was replaced by 'could not be stored')."""
    return any(_gone(cause) for cause in _causes(e))


def _gone(e: BaseException) -> bool:
    if isinstance(e, OSError | TimeoutError | sa.exc.TimeoutError | asyncpg.PostgresConnectionError):
        return True
    if isinstance(e, asyncpg.InternalClientError):
        return True
    if isinstance(e, asyncpg.InterfaceError) and not isinstance(e, ValueError):  # DataError & co. are bugs
        return any(words in str(e) for words in _CONNECTION_GONE)
    if isinstance(e, asyncpg.PostgresError):
        return str(e.sqlstate or "").startswith(UNAVAILABLE_SQLSTATES)
    return False


def _causes(e: BaseException) -> Iterable[BaseException]:
    """``e``, then what it wraps (SQLAlchemy's ``orig``, the adapter's ``__cause__``), a few levels deep."""
    found: BaseException | None = e
    for _ in range(5):
        if found is None:
            return
        yield found
        found = getattr(found, "orig", None) or found.__cause__


def _translate(e: sa.exc.DBAPIError) -> Exception:
    sqlstate = str(getattr(e.orig, "sqlstate", None) or "")
    unavailable = isinstance(e, sa.exc.OperationalError | sa.exc.InterfaceError) or sqlstate.startswith(
        UNAVAILABLE_SQLSTATES
    )
    if e.connection_invalidated or unavailable or _lost(e):
        return errors.SourceUnavailable(f"PostgreSQL failed: {errors.describe(e.orig or e)}")
    return e
