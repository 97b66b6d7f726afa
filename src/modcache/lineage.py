"""Which PostgreSQL cluster, and which timeline of it, the cache is filled from: a server that is not that
cluster, or is on an older timeline, is refused before anything is read from it (issue 11).

With a multi-host URL (``postgresql://u@h1,h2/db?target_session_attrs=read-write``) every new connection goes to
the first host that accepts writes. After a failover the old primary may come back writable (split brain, a node
restored from an old disk): it is then the first such host again, and a full resync from it would roll the cache
back to its older data -- prune what was added since, restore what was changed. Nothing in the rows says so.
PostgreSQL does: every promotion starts a new **timeline** (the first 8 hex digits of the current WAL file's name,
``pg_control_checkpoint()`` on a standby), and every cluster made by ``initdb`` has its own
``pg_control_system().system_identifier``, kept by its replicas.

A timeline number alone does not name a branch: an old primary promoted again (by a second failover manager in a
partition, or an operator promoting a stale standby) starts a timeline with the same number as the true primary's,
on a history of its own (attack-11b T3). So the WAL position is checked beside it: ``pg_current_wal_lsn()`` on a
primary, ``pg_last_wal_replay_lsn()`` on a standby, read when the connection is made, before anything is read
through it. The cache then holds what the server had at that position or later. A server on the recorded timeline
whose position is behind the highest one modcache has synced from is refused: it lacks some of what the cache
already holds (a stale branch with the same number, a lagging standby), and syncing from it would roll the cache
back. A server on a *newer* timeline but behind is either the new primary of a failover that lost the last
transactions (asynchronous replication) or a stale node promoted once more: it is taken only when no host of the
URL passes outright, so while the true primary is reachable it is the one read, and a failover that lost
transactions is still followed.

``Lineage`` holds the highest (system, timeline, position) this process has read from, and the one recorded in the
cache's status hash by the last full resync (``source_system``/``source_timeline``/``source_lsn``, learnt before
the first read: a restarted modcache that first reaches the old primary must refuse it too). Only a server that
passes raises them, so a stale branch that is refused never ratchets the true primary out.

Limits (``docs/topologies.md``): without the timeline history files (``pg_read_file`` needs privileges) a stale
branch that has written more WAL than the true primary since they split is not told apart -- one
``pg_switch_wal()``, or ``archive_timeout`` on an idle server, is enough (attack-11c U6): fencing the old primary is
required -- nor one promoted to a newer timeline when it is the only host the URL reaches.

``connect`` checks each new asyncpg connection (the SQLAlchemy pool's and the listener's): a server of another
system, on an older timeline or behind the recorded position, is closed and the other hosts of the URL are tried in
turn; if none passes, ``StaleSource`` (a ``SourceUnavailable``: retried, and shown in the status) says which
server, which timeline and why. A server that does not let us read its identity is accepted, with one warning.

The record is sealed (attack-9d F1): anyone who can write the status hash could otherwise raise the bar above every
server (``HSET ... source_timeline 99``) and no modcache would ever read PostgreSQL again, restarted or not. The
seal is an HMAC-SHA256 (``seal``) of the prefix and the three fields, keyed by a random key kept in PostgreSQL
(``KEY_TABLE``, made by ``db upgrade`` and ``db install-trigger``, readable by modcache's roles only): a stale former
primary holds the same key (it was replicated before the split), so a record a true modcache sealed still refuses
it, while of a record nobody sealed -- forged, or written before this -- only the system identifier is believed
(said once; the next full resync's sealed record replaces it). Without the key (no table, no SELECT on it) the same.
The limit: the key is the cluster's own, so a record of another cluster cannot be told from a forged one; it is
refused as another cluster's, as before, and a forged ``source_system`` therefore still stops every sync until the
record is deleted (``modcache status`` shows it; the refusal names the cluster).

Moving the cache to another cluster on purpose (a restore into a new ``initdb``, a migration): delete the status
hash (``DEL <prefix>modcache:status``) and restart modcache; the next full resync records the new cluster.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import hmac
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import asyncpg

from modcache import endpoints, errors

log = logging.getLogger(__name__)

IDENTITY_SQL = """
SELECT (SELECT system_identifier FROM pg_control_system())::text,
       CASE WHEN pg_is_in_recovery() THEN (SELECT timeline_id FROM pg_control_checkpoint())::bigint
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint END,
       host(inet_server_addr()), inet_server_port(),
       (coalesce(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END,
                 '0/0') - '0/0'::pg_lsn)::bigint
"""


#: The seal's key: one row, made once per cluster (replicas and a restored copy hold the same key).
KEY_TABLE = "modcache_lineage_key"
KEY_STATEMENTS = (
    f"CREATE TABLE IF NOT EXISTS {KEY_TABLE} (id smallint PRIMARY KEY CHECK (id = 1), key text NOT NULL)",
    # gen_random_uuid() draws from pg_strong_random: 244 random bits in two of them
    f"INSERT INTO {KEY_TABLE} VALUES (1, replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '')) "
    "ON CONFLICT (id) DO NOTHING",
    f"REVOKE ALL ON {KEY_TABLE} FROM PUBLIC",
)
KEY_SQL = f"SELECT key FROM {KEY_TABLE} WHERE id = 1"


_UNRECORDED: contextvars.ContextVar[bool] = contextvars.ContextVar("modcache_lineage_unrecorded", default=False)


@contextlib.contextmanager
def unrecorded() -> Iterator[None]:
    """Connections made inside are checked for the cluster only, and what they reach is not recorded: for reading
    what every server of the cluster holds alike (the seal's key) before the record can be believed. Such a
    connection must not be pooled: it may reach a server the record, once believed, refuses."""
    token = _UNRECORDED.set(True)
    try:
        yield
    finally:
        _UNRECORDED.reset(token)


def seal(key: str, prefix: str, system: str, timeline: int, lsn: int) -> str:
    """The status record's seal over what it says the cache is filled from (hex HMAC-SHA256)."""
    message = "\0".join((prefix, system, str(timeline), lsn_text(lsn)))
    return hmac.new(key.encode(), message.encode(), hashlib.sha256).hexdigest()


def sealed(key: str | None, prefix: str, recorded: tuple[str, int, int], found: str) -> bool:
    """Whether ``found`` is ``recorded``'s seal under ``key`` (never without a key)."""
    return key is not None and hmac.compare_digest(seal(key, prefix, *recorded), found)


@dataclasses.dataclass(frozen=True)
class Identity:
    system: str
    timeline: int
    server: str  # host:port, for messages
    lsn: int = 0  # the WAL position (bytes): pg_current_wal_lsn(), or pg_last_wal_replay_lsn() on a standby


def lsn_text(lsn: int) -> str:
    """A WAL position the way PostgreSQL writes it (``0/3000148``)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """``lsn_text`` read back (0 for anything else: nothing recorded)."""
    high, slash, low = text.partition("/")
    try:
        return (int(high, 16) << 32) + int(low, 16) if slash and high.isalnum() and low.isalnum() else 0
    except ValueError:
        return 0


class StaleSource(errors.SourceUnavailable):
    """Every server the URL reaches is another cluster, or on an older timeline, than the cache was filled from."""


class Lineage:
    """The (system, timeline) the cache is filled from, as far as this process knows (see the module)."""

    def __init__(self) -> None:
        self.system: str | None = None
        self.timeline = 0
        self.lsn = 0  # the highest WAL position synced from (``Identity.lsn``)
        self.refusals = 0  # servers refused (a metric: modcache_source_refusals_total)
        self._said: str | None = None  # the last refusal logged (the same one, retried, is not logged again)
        # opens a checked connection to the source (``db.make_engine`` sets it): how ``read_key`` reaches the cluster
        self.connect: Callable[[], Awaitable[Any]] | None = None
        self._unreadable_said = False

    def learn(self, system: str, timeline: int, lsn: int = 0) -> bool:
        """What the cache's status hash recorded (an empty ``system``: nothing recorded). True when that raised
        the bar: a connection admitted before (the consumer's first ``SELECT 1``) may be to a server the record
        refuses, and must not be reused (``Engine.learn_lineage`` drops the pool)."""
        before = (self.system, self.timeline, self.lsn)
        if system and self.system is None:
            self.system = system
        if system == self.system:
            self.timeline = max(self.timeline, timeline)
            self.lsn = max(self.lsn, lsn)
        return before != (self.system, self.timeline, self.lsn)

    def problem(self, identity: Identity, *, lenient: bool = False) -> str | None:
        """Why ``identity`` must not be synced from, or None (and then it is what the cache is filled from).

        A server on a newer timeline but behind the recorded position is either the new primary of a failover
        that lost the last transactions or a stale node promoted again: refused unless ``lenient`` (``connect``
        is, once no host of the URL passes without it)."""
        if self.system is not None and identity.system != self.system:
            return (
                f"PostgreSQL at {identity.server} is another cluster (system identifier {identity.system}) than the "
                f"cache was filled from ({self.system}); refusing to sync from it (moved on purpose? see "
                "docs/topologies.md)"
            )
        if _UNRECORDED.get():
            return None
        if identity.timeline < self.timeline:
            return (
                f"PostgreSQL at {identity.server} is on timeline {identity.timeline}, older than timeline "
                f"{self.timeline} the cache was filled from: a former primary that came back (split brain) or a "
                "stale node; refusing to sync from it"
            )
        if identity.lsn < self.lsn and identity.timeline == self.timeline:
            return (
                f"PostgreSQL at {identity.server} is at WAL position {lsn_text(identity.lsn)} (timeline "
                f"{identity.timeline}), behind {lsn_text(self.lsn)} the cache was already filled from: a former "
                "primary promoted again on a branch of its own (split brain), or a lagging node; refusing to sync "
                "from it"
            )
        if identity.lsn < self.lsn:
            said = (
                f"PostgreSQL at {identity.server} is on timeline {identity.timeline}, newer than timeline "
                f"{self.timeline} the cache was filled from, but at WAL position {lsn_text(identity.lsn)}, behind "
                f"{lsn_text(self.lsn)}: the new primary of a failover that lost the last transactions, or a stale "
                "node promoted again"
            )
            if not lenient:
                return f"{said}; trying the URL's other hosts first"
            log.warning("%s; no host of the URL is ahead of it: syncing from it (see docs/topologies.md)", said)
        self.system, self.timeline, self.lsn = identity.system, identity.timeline, identity.lsn
        return None

    async def read_key(self) -> str | None:
        """The seal's key (``KEY_TABLE``), or None when the database has none or the role may not read it. Read
        before the record is believed, so on a connection of its own, checked for the cluster only and closed after
        (``unrecorded``): any server of the cluster holds the same key."""
        if self.connect is None:
            return None
        with unrecorded():
            conn = await self.connect()
        try:
            found = await conn.fetchval(KEY_SQL, timeout=10)
        except (asyncpg.UndefinedTableError, asyncpg.InsufficientPrivilegeError):
            return None
        finally:
            await conn.close()
        return found if isinstance(found, str) and found else None

    def refuse(self, reason: str) -> None:
        self.refusals += 1
        if reason != self._said:
            log.warning("%s", reason)
            self._said = reason

    async def admit(self, conn: Any, *, lenient: bool = False) -> str | None:
        """Why the server ``conn`` reached must not be synced from, or None (``lenient``: see ``problem``)."""
        try:
            row = await conn.fetchrow(IDENTITY_SQL, timeout=10)
        except asyncpg.PostgresError as e:  # a managed service may revoke pg_control_*: accepted, said once
            if not self._unreadable_said:
                log.warning("cannot read the PostgreSQL server's identity (%s): its timeline is not checked", e)
                self._unreadable_said = True
            return None
        server = "a local socket" if row[2] is None else f"{row[2]}:{row[3]}"
        problem = self.problem(Identity(str(row[0]), int(row[1]), server, int(row[4])), lenient=lenient)
        if problem is not None:
            self.refuse(problem)
        return problem


_OF_ENGINE: weakref.WeakKeyDictionary[Any, Lineage] = weakref.WeakKeyDictionary()


def attach(engine: Any, lineage: Lineage) -> None:
    """Say that ``engine``'s connections are checked by ``lineage`` (``db.make_engine`` does, for every engine)."""
    _OF_ENGINE[engine] = lineage


def of(engine: Any) -> Lineage | None:
    """The lineage that checks ``engine``'s connections (``attach``), so a ``PgSource`` built on an engine of
    ``db.make_engine`` -- the consumer's ``Database`` is one -- uses the very check its connections pass through and
    records it (attack-11c U3: the consumer's resync read with no check and erased the record)."""
    return _OF_ENGINE.get(engine)


async def connect(dsn: str, *, lineage: Lineage | None, **options: Any) -> Any:
    """``asyncpg.connect(dsn, **options)``, refusing a server ``lineage`` does not admit: then each host the URL
    names is tried on its own, in order (``target_session_attrs`` still applies), and the first admitted wins; if
    none is, the first on a newer timeline though behind the recorded position (``Lineage.problem``)."""
    try:
        conn = await asyncpg.connect(dsn, **options)
    except asyncpg.exceptions.ClientConfigurationError as e:  # a TLS file or mode it cannot use: names no secret
        raise errors.ConfigError("MODCACHE_DATABASE_URL", f"asyncpg refuses the connection settings: {e}") from None
    except ValueError as e:  # asyncpg's DSN parser quotes what it could not read: a part of the password, maybe
        if isinstance(e, OSError):  # ssl.SSLCertVerificationError is a ValueError too: the server's, not the URL's
            raise
        raise errors.ConfigError("MODCACHE_DATABASE_URL", "asyncpg cannot read the URL: check its shape") from None
    if lineage is None:
        return conn
    problem = await _checked(conn, lineage)
    if problem is None:
        return conn
    for lenient in (False, True):
        for host, port in endpoints.check_postgres(dsn):
            try:
                other = await asyncpg.connect(dsn, host=host, port=port, **options)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                continue  # down, or not a primary: the next one
            if await _checked(other, lineage, lenient=lenient) is None:
                return other
    raise StaleSource(problem)


async def _checked(conn: Any, lineage: Lineage, *, lenient: bool = False) -> str | None:
    try:
        problem = await lineage.admit(conn, lenient=lenient)
    except BaseException:
        conn.terminate()
        raise
    if problem is not None:
        await conn.close()
    return problem
