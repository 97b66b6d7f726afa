"""Pure: which ModuleCaches may write under their key prefix on a Redis database, and which are refused.

Two ModuleCaches collide when they write to the same Redis endpoint (host, port, database) and their key prefixes
overlap (the core's ``keys.prefixes_overlap``: one is a prefix of the other, or they are equal): one's full
resync would see the other's keys as its own. The
rule is deterministic whatever the order in which the operator learns about them: claims are taken oldest
first (``creationTimestamp``, then namespace and name), and a claim wins unless it overlaps an earlier winner.
A refused ModuleCache names the winner that blocks it; once that one goes away, the next evaluation lets it run.

Endpoints come from the resolved Redis URL and keep no credentials.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from modcache import endpoints, keys

DEFAULT_REDIS_PORT = 6379

Owner = tuple[str, str]  # (namespace, name) of a ModuleCache


@dataclasses.dataclass(frozen=True, order=True)
class Endpoint:
    """Where a Redis database is: host (or Unix socket path), port (0 for a socket) and database number."""

    host: str
    port: int
    db: int

    def describe(self) -> str:
        where = self.host if self.port == 0 else f"{self.host}:{self.port}"
        return f"{where}/{self.db}"


@dataclasses.dataclass(frozen=True)
class Claim:
    owner: Owner
    created: str  # creationTimestamp, RFC 3339 in UTC (so its text sorts as its time)
    endpoint: Endpoint
    prefix: str

    @property
    def seniority(self) -> tuple[str, str, str]:
        return (self.created, *self.owner)

    def describe(self) -> str:
        return f"ModuleCache {'/'.join(self.owner)} (keyPrefix {self.prefix!r})"


def endpoint(url: str) -> Endpoint:
    """The endpoint a Redis URL names, read as the client reads it (``endpoints.parse_redis``: the same parser
    as redis-py, so ``/1?db=0`` or ``/%31`` cannot pass for another database); the password is never kept.

    A Sentinel service is named by its sentinels and service name, a Cluster by its seed nodes (one keyspace:
    database 0). Different spellings of one server (a second DNS name, an IP) still look different: the
    server's ``run_id`` would tell, but is only known once connected."""
    parsed = endpoints.parse_redis(url)
    nodes = ",".join(sorted(f"{host.lower()}:{port}" for host, port in parsed.hosts))
    if parsed.topology is endpoints.Topology.SENTINEL:
        return Endpoint(host=f"sentinel {parsed.service} via {nodes}", port=0, db=parsed.db)
    if parsed.topology is endpoints.Topology.CLUSTER:
        return Endpoint(host=f"cluster of {nodes}", port=0, db=0)
    if parsed.socket is not None:
        return Endpoint(host=parsed.socket, port=0, db=parsed.db)
    host, port = parsed.hosts[0] if parsed.hosts else ("localhost", DEFAULT_REDIS_PORT)
    return Endpoint(host=host.lower(), port=port, db=parsed.db)


def collide(a: Claim, b: Claim) -> bool:
    return a.owner != b.owner and a.endpoint == b.endpoint and keys.prefixes_overlap(a.prefix, b.prefix)


def blockers(claims: Iterable[Claim]) -> dict[Owner, Claim]:
    """For each refused claim, the winning claim that blocks it (winners are absent)."""
    winners: dict[Endpoint, list[Claim]] = {}
    refused: dict[Owner, Claim] = {}
    for claim in sorted(claims, key=lambda c: c.seniority):
        same_place = winners.setdefault(claim.endpoint, [])
        blocker = next((w for w in same_place if keys.prefixes_overlap(w.prefix, claim.prefix)), None)
        if blocker is None:
            same_place.append(claim)
        else:
            refused[claim.owner] = blocker
    return refused
