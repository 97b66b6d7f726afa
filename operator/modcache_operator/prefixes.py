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
import urllib.parse
from collections.abc import Iterable

from modcache import keys

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
    """The endpoint of a ``redis://``, ``rediss://`` or ``unix://`` URL; the password is never kept."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    if parts.scheme == "unix":
        return Endpoint(host=parts.path, port=0, db=_int(query.get("db", ["0"])[0]))
    path_db = parts.path.strip("/")
    db = _int(path_db) if path_db else _int(query.get("db", ["0"])[0])
    return Endpoint(host=(parts.hostname or "localhost").lower(), port=parts.port or DEFAULT_REDIS_PORT, db=db)


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


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0
