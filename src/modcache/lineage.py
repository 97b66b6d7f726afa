"""Which PostgreSQL cluster, and which timeline of it, the cache is filled from: a server that is not that
cluster, or is on an older timeline, is refused before anything is read from it (issue 11).

With a multi-host URL (``postgresql://u@h1,h2/db?target_session_attrs=read-write``) every new connection goes to
the first host that accepts writes. After a failover the old primary may come back writable (split brain, a node
restored from an old disk): it is then the first such host again, and a full resync from it would roll the cache
back to its older data -- prune what was added since, restore what was changed. Nothing in the rows says so.
PostgreSQL does: every promotion starts a new **timeline** (the first 8 hex digits of the current WAL file's name,
``pg_control_checkpoint()`` on a standby), and every cluster made by ``initdb`` has its own
``pg_control_system().system_identifier``, kept by its replicas.

``Lineage`` holds the highest (system, timeline) this process has read from, and the one recorded in the cache's
status hash by the last full resync (``source_system``/``source_timeline``, learnt before the first read: a
restarted modcache that first reaches the old primary must refuse it too). ``connect`` checks each new asyncpg
connection (the SQLAlchemy pool's and the listener's): a server of another system, or on an older timeline, is
closed and the other hosts of the URL are tried in turn; if none passes, ``StaleSource`` (a ``SourceUnavailable``:
retried, and shown in the status) says which server, which timeline and why. A server that does not let us read
its identity is accepted, with one warning.

Moving the cache to another cluster on purpose (a restore into a new ``initdb``, a migration): delete the status
hash (``DEL <prefix>modcache:status``) and restart modcache; the next full resync records the new cluster.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import asyncpg

from modcache import endpoints, errors

log = logging.getLogger(__name__)

IDENTITY_SQL = """
SELECT (SELECT system_identifier FROM pg_control_system())::text,
       CASE WHEN pg_is_in_recovery() THEN (SELECT timeline_id FROM pg_control_checkpoint())::bigint
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint END,
       host(inet_server_addr()), inet_server_port()
"""


@dataclasses.dataclass(frozen=True)
class Identity:
    system: str
    timeline: int
    server: str  # host:port, for messages


class StaleSource(errors.SourceUnavailable):
    """Every server the URL reaches is another cluster, or on an older timeline, than the cache was filled from."""


class Lineage:
    """The (system, timeline) the cache is filled from, as far as this process knows (see the module)."""

    def __init__(self) -> None:
        self.system: str | None = None
        self.timeline = 0
        self.refusals = 0  # servers refused (a metric: modcache_source_refusals_total)
        self._said: str | None = None  # the last refusal logged (the same one, retried, is not logged again)
        self._unreadable_said = False

    def learn(self, system: str, timeline: int) -> None:
        """What the cache's status hash recorded (an empty ``system``: nothing recorded)."""
        if system and self.system is None:
            self.system = system
        if system == self.system and timeline > self.timeline:
            self.timeline = timeline

    def problem(self, identity: Identity) -> str | None:
        """Why ``identity`` must not be synced from, or None (and then it is what the cache is filled from)."""
        if self.system is not None and identity.system != self.system:
            return (
                f"PostgreSQL at {identity.server} is another cluster (system identifier {identity.system}) than the "
                f"cache was filled from ({self.system}); refusing to sync from it (moved on purpose? see "
                "docs/topologies.md)"
            )
        if identity.timeline < self.timeline:
            return (
                f"PostgreSQL at {identity.server} is on timeline {identity.timeline}, older than timeline "
                f"{self.timeline} the cache was filled from: a former primary that came back (split brain) or a "
                "stale node; refusing to sync from it"
            )
        self.system, self.timeline = identity.system, identity.timeline
        return None

    def refuse(self, reason: str) -> None:
        self.refusals += 1
        if reason != self._said:
            log.warning("%s", reason)
            self._said = reason

    async def admit(self, conn: Any) -> str | None:
        """Why the server ``conn`` reached must not be synced from, or None."""
        try:
            row = await conn.fetchrow(IDENTITY_SQL, timeout=10)
        except asyncpg.PostgresError as e:  # a managed service may revoke pg_control_*: accepted, said once
            if not self._unreadable_said:
                log.warning("cannot read the PostgreSQL server's identity (%s): its timeline is not checked", e)
                self._unreadable_said = True
            return None
        server = "a local socket" if row[2] is None else f"{row[2]}:{row[3]}"
        problem = self.problem(Identity(str(row[0]), int(row[1]), server))
        if problem is not None:
            self.refuse(problem)
        return problem


async def connect(dsn: str, *, lineage: Lineage | None, **options: Any) -> Any:
    """``asyncpg.connect(dsn, **options)``, refusing a server ``lineage`` does not admit: then each host the URL
    names is tried on its own, in order (``target_session_attrs`` still applies), and the first admitted wins."""
    conn = await asyncpg.connect(dsn, **options)
    if lineage is None:
        return conn
    problem = await _checked(conn, lineage)
    if problem is None:
        return conn
    for host, port in endpoints.check_postgres(dsn):
        try:
            other = await asyncpg.connect(dsn, host=host, port=port, **options)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            continue  # down, or not a primary: the next one
        if await _checked(other, lineage) is None:
            return other
    raise StaleSource(problem)


async def _checked(conn: Any, lineage: Lineage) -> str | None:
    try:
        problem = await lineage.admit(conn)
    except BaseException:
        conn.terminate()
        raise
    if problem is not None:
        await conn.close()
    return problem
