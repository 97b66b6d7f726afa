"""The PostgreSQL adapter: the source of truth, read as cheaply as the job allows.

A full sync lists ``(path, content_hash)`` without content (about 0.2 s for 100,000 rows); content is read only
for the modules that must be written, in batches, straight from asyncpg (the ORM's row processing would double
the cost of the hot listings). The SQLAlchemy engine owns the pool and its pre-ping.

``listen`` turns PostgreSQL LISTEN into an async iterator of typed events (connected, paths, resync, lost), with
reconnects, backoff and keepalive inside, so the watcher only orchestrates.

Row rules (Bifrost's): a live module is ``entity_type = 'module' AND NOT is_deleted``; rows with a bad path,
NULL content, oversized or non-UTF-8 content, or a hash that disagrees with the content are returned as
``modules.Rejected`` and never stop the other rows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from modcache import backoff, errors, keys, lineage, modules, plan

T = TypeVar("T")

LIVE = "entity_type = 'module' AND NOT is_deleted"

#: Text read as the bytes stored, unconverted: only a SQL_ASCII database can hold text that is not UTF-8, and such a
#: row must be rejected by ``modules`` rather than fail the whole statement (a conversion to UTF-8 would).
_RAW = "convert_to({}, getdatabaseencoding())"

#: One row: the paths and the hashes each as one NUL-separated string of their stored bytes (PostgreSQL text holds no
#: NUL), the sizes as an array. Two values instead of 200,000 array elements: a third of the client's time, and no
#: 200,000 bytes objects alive beside their decoded strings (the peak of a no-drift resync's memory). ``size`` is -1
#: for NULL content (``octet_length`` of a TOASTed value reads its header, not the value). In path order (the
#: live-modules index is walked): in a database with a C collation that is the code-point order
#: ``plan.source_digest`` hashes in, so it need not sort 100,000 paths again (it checks, and sorts when the collation
#: orders otherwise).
LIST_SQL = f"""
SELECT coalesce(string_agg({_RAW.format("path")}, '\\x00'::bytea), ''::bytea),
       coalesce(string_agg(coalesce({_RAW.format("content_hash")}, ''::bytea), '\\x00'::bytea), ''::bytea),
       coalesce(array_agg(coalesce(size, -1)), '{{}}')
FROM (SELECT path, content_hash, octet_length(content) AS size FROM workspace_files WHERE {LIVE} ORDER BY path) AS live
"""

#: ``LIST_SQL`` for a UTF8 database, whose text is valid UTF-8 by construction: the stored bytes *are* the text, so
#: ``convert_to`` (a function call, an encoding lookup and a validation per value: a third of the query's time) is left
#: out and the values are joined as text, by ``LIST_SEPARATOR``. Text may hold that character: a listing split into
#: more parts than rows is read again with ``LIST_SQL`` (never taken apart wrongly).
LIST_SEPARATOR = "\x01"
LIST_TEXT_SQL = f"""
SELECT coalesce(string_agg(path, E'\\x01'), ''),
       coalesce(string_agg(coalesce(content_hash, ''), E'\\x01'), ''),
       coalesce(array_agg(coalesce(size, -1)), '{{}}')
FROM (SELECT path, content_hash, octet_length(content) AS size FROM workspace_files WHERE {LIVE} ORDER BY path) AS live
"""

FETCH_SQL = f"""
SELECT path, {_RAW.format("content_hash")}, {_RAW.format("content")} AS raw
FROM workspace_files WHERE path = ANY($1::text[]) AND {LIVE}
"""

SIZES_SQL = f"""
SELECT path, octet_length(content) FROM workspace_files
WHERE path = ANY($1::text[]) AND {LIVE} AND octet_length(content) > $2
"""

UPSERT_SQL = """
INSERT INTO workspace_files (path, content, content_hash, size_bytes, entity_type, is_deleted)
VALUES ($1, $2, $3, $4, 'module', false)
ON CONFLICT (path) DO UPDATE SET content = EXCLUDED.content, content_hash = EXCLUDED.content_hash,
    size_bytes = EXCLUDED.size_bytes, entity_type = 'module', is_deleted = false, updated_at = now()
WHERE (workspace_files.content, workspace_files.content_hash, workspace_files.entity_type,
       workspace_files.is_deleted) IS DISTINCT FROM (EXCLUDED.content, EXCLUDED.content_hash, 'module', false)
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Module:
    """A live module read with its content, validated."""

    path: str
    content: str
    hash: str


@dataclasses.dataclass(frozen=True)
class ModuleRow:
    """A module as ``modcache modules ls`` shows it."""

    path: str
    hash: str
    size_bytes: int | None


class PgSource:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        max_module_bytes: int = modules.DEFAULT_MAX_MODULE_BYTES,
        lineage: lineage.Lineage | None = None,
    ) -> None:
        self.engine = engine
        self.max_module_bytes = max_module_bytes
        # the cluster and timeline the cache is filled from, checked by ``engine``'s connections: the one given, or
        # the one ``db.make_engine`` attached to the engine (None only for an engine made elsewhere: not checked)
        self.lineage = lineage if lineage is not None else lineage_module.of(engine)

    async def close(self) -> None:
        await self.engine.dispose()

    async def list_modules(self) -> plan.SourceView:
        """Every live module's path and hash (no content), with rows that cannot be served set aside."""
        columns: list[Any] = list(await self._run(lambda c: c.fetchrow(_listing_sql(c))))
        # judged in a thread: at 1,000,000 rows this is seconds of CPU on a loaded machine, and the event loop must
        # keep reading the Redis replies in flight meanwhile (a blocked loop times them out)
        listed = await asyncio.to_thread(self._judge_listing, columns)
        if listed is None:  # a text value held the separator: read as stored bytes, NUL-separated
            columns = list(await self._run(lambda c: c.fetchrow(LIST_SQL)))
            listed = await asyncio.to_thread(self._judge_listing, columns)
        assert listed is not None  # NUL-separated: no text holds a NUL
        return listed

    def _judge_listing(self, columns: list[Any]) -> plan.SourceView | None:
        """The listing's columns (taken from the list: each column's bytes are freed once decoded); None when a text
        listing does not split into one value per row."""
        sizes: Sequence[int] = columns.pop()
        paths, digests = _texts(columns.pop(0), len(sizes)), _texts(columns.pop(0), len(sizes))
        if len(paths) != len(sizes) or len(digests) != len(sizes):
            return None
        limit = self.max_module_bytes
        large = _large(paths, sizes)
        if modules.all_paths_good(paths) and (not sizes or (min(sizes) >= 0 and max(sizes) <= limit)):
            return plan.SourceView(live=dict(zip(paths, digests, strict=True)), large=large)  # at C speed
        live: dict[str, str] = {}
        rejected: list[modules.Rejected] = []
        for path, digest, size in zip(paths, digests, sizes, strict=True):
            problem = modules.path_problem(path)
            if problem is not None:
                rejected.append(modules.Rejected(path, modules.Rejection.BAD_PATH, problem))
            elif size < 0:
                rejected.append(modules.Rejected(path, modules.Rejection.NULL_CONTENT))
            elif size > limit:
                rejected.append(modules.Rejected(path, modules.Rejection.TOO_LARGE, f"{size} > {limit} bytes"))
            else:
                live[path] = digest
        return plan.SourceView(live=live, rejected=tuple(rejected), large={p: n for p, n in large.items() if p in live})

    async def large_among(self, paths: Sequence[str]) -> dict[str, int]:
        """The content size of the live modules among ``paths`` larger than ``plan.SMALL_BYTES`` (for
        ``plan.batches_by_bytes``; ``octet_length`` of a TOASTed value reads its header, not the value)."""
        rows = await self._run(lambda c: c.fetch(SIZES_SQL, list(paths), plan.SMALL_BYTES))
        return {str(path): int(size) for path, size in rows}

    async def fetch(self, paths: Sequence[str]) -> tuple[dict[str, Module], list[modules.Rejected]]:
        """The live modules among ``paths``, with content; paths that are not live modules are left out."""
        rows = await self._run(lambda c: c.fetch(FETCH_SQL, list(paths)))
        found: dict[str, Module] = {}
        rejected: list[modules.Rejected] = []
        for path, digest, raw in rows:
            checked = self._validate(path, None if digest is None else digest.decode("utf-8", "replace"), raw)
            if isinstance(checked, Module):
                found[path] = checked
            else:
                rejected.append(checked)
        return found, rejected

    def _validate(self, path: str, digest: str | None, raw: bytes | None) -> Module | modules.Rejected:
        problem = modules.path_problem(path)
        if problem is not None:
            return modules.Rejected(path, modules.Rejection.BAD_PATH, problem)
        if raw is None:
            return modules.Rejected(path, modules.Rejection.NULL_CONTENT)
        text = modules.decode_content(path, raw, max_bytes=self.max_module_bytes)
        if isinstance(text, modules.Rejected):
            return text
        actual = modules.content_hash(raw)
        if digest is None:  # NOT NULL in modcache's schema, not in every Bifrost database
            return modules.Rejected(path, modules.Rejection.HASH_MISMATCH, "stored content_hash is NULL")
        if actual != digest:
            return modules.Rejected(
                path, modules.Rejection.HASH_MISMATCH, f"stored {digest[:12]}…, content {actual[:12]}…"
            )
        return Module(path=path, content=text, hash=digest)

    # -- writing the source of truth (CLI) -------------------------------------------------------------

    async def put_module(self, path: str, raw: bytes) -> bool:
        """Create or update a module from its bytes; True if a row changed. Validates like a sync does."""
        modules.check_path(path)
        text = modules.decode_content(path, raw, max_bytes=self.max_module_bytes)
        if isinstance(text, modules.Rejected):
            raise errors.InputError(path, text.reason.value + (f" ({text.detail})" if text.detail else ""))
        digest = modules.content_hash(raw)
        status: str = await self._run(lambda c: c.execute(UPSERT_SQL, path, text, digest, len(raw)))
        return status != "INSERT 0 0"

    async def remove_module(self, path: str, *, hard: bool = False) -> bool:
        """Soft-delete (Bifrost's way) or, with ``hard``, delete the row; True if a live module went away."""
        sql = (
            f"DELETE FROM workspace_files WHERE path = $1 AND {LIVE}"
            if hard
            else f"UPDATE workspace_files SET is_deleted = true, updated_at = now() WHERE path = $1 AND {LIVE}"
        )
        status: str = await self._run(lambda c: c.execute(sql, path))
        return not status.endswith(" 0")

    async def lineage_key(self) -> str | None:
        """The key that seals the cache's status record (``lineage.KEY_TABLE``), or None when this database has none
        or this role may not read it (then nothing a status record says about the source is believed)."""
        checked = self.lineage
        if checked is None or checked.connect is None:  # an engine made elsewhere: nothing is checked anyway
            try:
                found = await self._run(lambda c: c.fetchval(lineage_module.KEY_SQL))
            except errors.SourceUnavailable as e:
                if not isinstance(e.__cause__, asyncpg.UndefinedTableError | asyncpg.InsufficientPrivilegeError):
                    raise
                return None
            return found if isinstance(found, str) and found else None
        try:
            return await checked.read_key()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise errors.SourceUnavailable(f"PostgreSQL query failed: {errors.describe(e)}") from e

    async def module_rows(self) -> list[ModuleRow]:
        rows = await self._run(
            lambda c: c.fetch(f"SELECT path, content_hash, size_bytes FROM workspace_files WHERE {LIVE} ORDER BY path")
        )
        return [ModuleRow(path=r[0], hash=r[1], size_bytes=r[2]) for r in rows]

    # -- plumbing ------------------------------------------------------------------------------------------

    async def _run(self, call: Callable[[asyncpg.Connection[Any]], Awaitable[T]]) -> T:
        async with self._driver_connection() as conn:
            try:
                return await call(conn)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                raise errors.SourceUnavailable(f"PostgreSQL query failed: {errors.describe(e)}") from e

    @asynccontextmanager
    async def _driver_connection(self) -> AsyncIterator[asyncpg.Connection[Any]]:
        try:
            async with self.engine.connect() as conn:
                raw = await conn.get_raw_connection()
                driver: asyncpg.Connection[Any] = raw.driver_connection
                yield driver
        except (OSError, sa.exc.SQLAlchemyError) as e:
            raise errors.SourceUnavailable(f"PostgreSQL unreachable: {errors.describe(e)}") from e


def _large(paths: Sequence[str], sizes: Sequence[int]) -> dict[str, int]:
    if not sizes or max(sizes) <= plan.SMALL_BYTES:
        return {}
    return {p: n for p, n in zip(paths, sizes, strict=True) if n > plan.SMALL_BYTES}


def _listing_sql(conn: asyncpg.Connection[Any]) -> str:
    """The listing query for the database ``conn`` is connected to (``LIST_TEXT_SQL`` when its text is UTF-8)."""
    return LIST_TEXT_SQL if conn.get_settings().server_encoding == "UTF8" else LIST_SQL


def _texts(raw: bytes | str, count: int) -> list[str]:
    """``count`` stored texts as str, all at once: NUL-separated bytes (``LIST_SQL``; bytes that are not UTF-8 become
    lone surrogates, which ``modules.path_problem`` rejects and a hash comparison never matches), or text separated by
    ``LIST_SEPARATOR`` (``LIST_TEXT_SQL``; more than ``count`` parts when a value holds it)."""
    if not count:
        return []
    if isinstance(raw, str):
        return raw.split(LIST_SEPARATOR)
    return raw.decode("utf-8", "surrogateescape").split("\0")


# -- LISTEN ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Listening:
    """The listener is connected and LISTENing (after every (re)connect: notifications sent while it was away are
    lost, so the caller resyncs). ``server`` is the address of the PostgreSQL server it reached: with a multi-host
    URL, a failover shows as a new one."""

    detail: str
    server: str = ""


@dataclasses.dataclass(frozen=True)
class Hinted:
    """A notification named these paths (a hint: the rows are re-read; the names are judged before use)."""

    paths: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ResyncAsked:
    """A notification asked for a full resync (TRUNCATE), or could not be understood."""


@dataclasses.dataclass(frozen=True)
class ListenerLost:
    detail: str


SourceEvent = Listening | Hinted | ResyncAsked | ListenerLost
_LOST = object()


async def listen(
    dsn: str,
    *,
    backoff_max_s: float,
    keepalive_s: float,
    rng: random.Random | None = None,
    lineage: lineage.Lineage | None = None,
) -> AsyncIterator[SourceEvent]:
    """Notifications on ``keys.NOTIFY_CHANNEL`` as typed events, forever: connects, LISTENs, reconnects with
    jittered exponential backoff, and pings an idle connection to catch half-open sockets. With a ``lineage``, a
    server of another cluster or on an older timeline is not listened to (its NOTIFYs are not the source's)."""
    retry = backoff.Backoff(0.2, backoff_max_s, rng or random.Random())
    while True:
        queue: asyncio.Queue[object] = asyncio.Queue()
        conn: Any = None
        detail = "connection lost"
        try:
            conn = await _connect(dsn, queue, lineage)
            server = await _server_address(conn)
            retry.reset()
            yield Listening(f"listening on {keys.NOTIFY_CHANNEL} at {server}", server)
            while (event := await _next(conn, queue, keepalive_s)) is not _LOST:
                yield event  # type: ignore[misc]
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            detail = errors.describe(e)
        except lineage_module.StaleSource as e:
            detail = str(e)
        finally:
            if conn is not None:
                conn.terminate()
        yield ListenerLost(detail)
        await asyncio.sleep(retry.next_s())


async def _connect(dsn: str, queue: asyncio.Queue[object], checked: lineage.Lineage | None) -> Any:
    conn = await lineage_module.connect(
        dsn, lineage=checked, timeout=10, server_settings={"application_name": "modcache-listener"}
    )
    conn.add_termination_listener(lambda _conn: queue.put_nowait(_LOST))
    await conn.add_listener(keys.NOTIFY_CHANNEL, lambda *args: queue.put_nowait(_event(args[3])))
    return conn


async def _server_address(conn: Any) -> str:
    """``host:port`` of the server ``conn`` reached (of the several a multi-host URL names)."""
    address, port = await conn.fetchrow("SELECT host(inet_server_addr()), inet_server_port()", timeout=10)
    return "a local socket" if address is None else f"{address}:{port}"


async def _next(conn: Any, queue: asyncio.Queue[object], keepalive_s: float) -> object:
    """The next notification; after an idle spell, ping the connection (a dead one ends the wait)."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), keepalive_s)
        except TimeoutError:
            await conn.execute("SELECT 1", timeout=5)


def _event(payload: str) -> SourceEvent:
    try:
        data = json.loads(payload)
        paths = data.get("paths", [])
        if data.get("resync") or not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            return ResyncAsked()
    except (ValueError, AttributeError, TypeError, RecursionError):  # any role with CONNECT may send anything
        return ResyncAsked()
    return Hinted(tuple(paths))


lineage_module = lineage  # inside listen and PgSource, ``lineage`` is a parameter
