"""The pure core: compare the source of truth with the cache and say what to do, and why.

``compute`` takes two snapshots (what PostgreSQL holds, what Redis holds) and returns an immutable ``Plan`` of
``Item(operation, path, reason, old, new)``. Nothing here reads the clock, the network or the environment; the
CLI, the operator's status and events, and the logs all print the plan as it is.

Reasons, in the words of the failure modes they repair:

* ``missing`` -- a live module's content key is gone (expired, evicted, deleted): workers get ImportError;
* ``stale``   -- the content key holds other content than the source (hash differs): workers run old code;
* ``orphan``  -- a content key exists for a path that is no longer a live module (deleted, renamed, type
  changed): workers can still import it;
* ``index``   -- only the bookkeeping drifted: the index lacks a present module or lists an absent key, or
  the manifest disagrees with a correct content key.

Corruption is drift too, each kind under its own reason, never authority:

* ``corrupt``   -- the content key holds a value that is not exactly what modcache writes for the hash its manifest
  entry records (another length, or, when whole values are verified, other bytes: forged content that kept the
  ``hash`` field, a reordered value, garbage);
* ``wrongtype`` -- the content key is not a STRING (a HASH, a SET, ...);
* ``manifest``  -- the manifest entry is not one modcache writes (unparsable, an old format, a generation above
  anything modcache could have written);
* ``invalid``   -- an index member or manifest field that names no module content key of this cache (a bad path
  such as ``modcache:generation``, or a path inside another cache's longer prefix): only that member/field is
  removed (``unlist``); no key is derived from it, let alone deleted.

Keys modcache owns beside the content keys (index, manifest, generation, status) that are of the wrong type or
hold an unbelievable value are listed as ``KeyRepair`` items in ``Plan.repairs``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence

from modcache import modules

#: In ``CacheView.content``: the key exists but its hash was not confirmed to be any expected value.
UNVERIFIED = ""


class Operation(enum.StrEnum):
    PUT = "put"  # write content key + index + manifest from the source
    DELETE = "delete"  # remove content key + index entry + manifest entry
    REINDEX = "reindex"  # content is right; fix index and manifest only
    UNLIST = "unlist"  # an invalid name: remove exactly that index member and manifest field, touch no other key


class Reason(enum.StrEnum):
    MISSING = "missing"
    STALE = "stale"
    ORPHAN = "orphan"
    INDEX = "index"
    CORRUPT = "corrupt"
    WRONGTYPE = "wrongtype"
    MANIFEST = "manifest"
    INVALID = "invalid"


#: The reasons a person always sees counted (the others are shown when they occur).
CLASSIC_REASONS = (Reason.MISSING, Reason.STALE, Reason.ORPHAN, Reason.INDEX)


@dataclasses.dataclass(frozen=True, slots=True)  # 1,000,000 of them after a flush: no per-item dict
class Item:
    operation: Operation
    path: str
    reason: Reason
    old: str | None  # the cached hash as observed (None: absent, "": present but unverified)
    new: str | None  # the source hash to write (None for DELETE)
    detail: str = ""  # why, when the reason alone does not say (the problem with an invalid name)

    def __str__(self) -> str:
        shown = self.path if self.reason is not Reason.INVALID else repr(self.path)
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.operation.value:<7} {self.reason.value:<7} {shown}{detail}"


@dataclasses.dataclass(frozen=True)
class KeyRepair:
    """One of modcache's own keys (``role``: index, manifest, generation, status) that cannot be believed."""

    role: str
    key: str
    problem: str

    def __str__(self) -> str:
        return f"repair  {self.role} {self.key!r}: {self.problem}"


@dataclasses.dataclass(frozen=True)
class SourceView:
    """The live modules of the source: path -> content_hash, plus rows that were rejected, and the content size of
    the large ones (above ``SMALL_BYTES``; the others count as that much when batches are bounded by bytes)."""

    live: Mapping[str, str]
    rejected: tuple[modules.Rejected, ...] = ()
    large: Mapping[str, int] = dataclasses.field(default_factory=dict)


#: Content bytes read (and so written) per batch at most; a batch holds at least one module however large. Bounds
#: the memory a batch takes (content, its JSON, the encoded write) and the size of one Redis script call.
BATCH_BYTES = 8 * 1024 * 1024
#: Modules up to this size count as this size in a batch (1,000 of them fill one): only larger ones are remembered.
SMALL_BYTES = 8 * 1024


def batches_by_bytes(paths: Sequence[str], large: Mapping[str, int], *, rows: int) -> Iterator[Sequence[str]]:
    """``paths`` in consecutive batches of at most ``rows`` paths and ``BATCH_BYTES`` of content."""
    if not large:  # every module is small: by count alone
        for start in range(0, len(paths), rows):
            yield paths[start : start + rows]
        return
    batch: list[str] = []
    used = 0
    for path in paths:
        size = max(SMALL_BYTES, large.get(path, 0))
        if batch and (len(batch) >= rows or used + size > BATCH_BYTES):
            yield batch
            batch, used = [], 0
        batch.append(path)
        used += size
    if batch:
        yield batch


@dataclasses.dataclass(frozen=True)
class CacheView:
    """What the cache holds for the paths in question.

    ``content`` maps a path to the hash its content key was verified to carry, ``UNVERIFIED`` if the key
    exists but its hash is unconfirmed, or None if the key is absent. Paths not in ``content`` are treated
    as absent. ``damage`` says why an ``UNVERIFIED`` key is wrong when that is known (``CORRUPT``, ``WRONGTYPE``);
    ``malformed`` are the paths whose manifest entry cannot be believed; ``invalid`` maps index members and
    manifest fields that name no content key of this cache to the problem with them. Every name in ``index``,
    ``manifest``, ``content`` and ``malformed`` has been validated (``keys.KeySpace.name_problem``).
    """

    index: frozenset[str]
    manifest: Mapping[str, str]
    content: Mapping[str, str | None]
    damage: Mapping[str, Reason] = dataclasses.field(default_factory=dict)
    malformed: frozenset[str] = frozenset()
    invalid: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def cached_count(self) -> int:
        return sum(1 for h in self.content.values() if h is not None)


@dataclasses.dataclass(frozen=True)
class Plan:
    items: tuple[Item, ...]
    rejected: tuple[modules.Rejected, ...] = ()
    repairs: tuple[KeyRepair, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.items or self.repairs)

    def counts(self) -> dict[Reason, int]:
        found = Counter(item.reason for item in self.items)
        return {reason: found.get(reason, 0) for reason in Reason}

    def by_operation(self, operation: Operation) -> list[Item]:
        return [item for item in self.items if item.operation is operation]

    def describe(self) -> str:
        """One line for logs and status: counts per reason, then rejected inputs."""
        if not self.items and not self.rejected and not self.repairs:
            return "in sync"
        parts = [f"{n} {reason.value}" for reason, n in self.counts().items() if n]
        parts += [f"{r.role} repaired" for r in self.repairs]
        if self.rejected:
            parts.append(f"{len(self.rejected)} rejected")
        return ", ".join(parts)


def compute(source: SourceView, cache: CacheView, repairs: Iterable[KeyRepair] = ()) -> Plan:
    """What to do to make ``cache`` serve exactly ``source``. Paths rejected in the source are left alone."""
    items = [item for path, digest in source.live.items() if (item := _for_live(path, digest, cache))]
    protected = source.live.keys() | {r.path for r in source.rejected}
    present = {p for p, h in cache.content.items() if h is not None}
    cached = cache.index | cache.manifest.keys() | cache.malformed | present
    items.extend(_for_dead(path, cache) for path in cached - protected)
    items.extend(Item(Operation.UNLIST, name, Reason.INVALID, None, None, why) for name, why in cache.invalid.items())
    items.sort(key=lambda item: item.path)
    return Plan(items=tuple(items), rejected=source.rejected, repairs=tuple(repairs))


def without_orphans(the_plan: Plan) -> Plan:
    """The plan minus the removal of orphaned content keys (``prune: false``); bookkeeping fixes stay."""
    return dataclasses.replace(the_plan, items=tuple(i for i in the_plan.items if i.reason is not Reason.ORPHAN))


def _for_live(path: str, digest: str, cache: CacheView) -> Item | None:
    held = cache.content.get(path)
    if held is None:
        return Item(Operation.PUT, path, Reason.MISSING, None, digest)
    if held != digest:
        return Item(Operation.PUT, path, cache.damage.get(path, Reason.STALE), held, digest)
    if path in cache.malformed:
        return Item(Operation.REINDEX, path, Reason.MANIFEST, held, digest)
    if path not in cache.index or cache.manifest.get(path) != digest:
        return Item(Operation.REINDEX, path, Reason.INDEX, held, digest)
    return None


def _for_dead(path: str, cache: CacheView) -> Item:
    held = cache.content.get(path)
    reason = Reason.INDEX if held is None else Reason.ORPHAN
    return Item(Operation.DELETE, path, reason, held, None)


DIGEST_CHUNK = 5_000


def source_digest(modules_by_path: Mapping[str, str]) -> str:
    """A short, order-independent fingerprint of the source (like Flux's applied revision)."""
    # "path\0hash\n" per module in path order, built by C-level joins (a Python f-string and a hash update per module
    # took 0.15-0.2 s at 100,000 modules) DIGEST_CHUNK modules at a time (the whole buffer at once, with its 100,000
    # lines, was the peak of a no-drift resync's memory: +30 MB); a listing already in path order is not sorted again
    paths = list(modules_by_path)
    items = iter(modules_by_path.items() if paths == sorted(paths) else sorted(modules_by_path.items()))
    del paths
    digest = hashlib.sha256()
    while chunk := list(itertools.islice(items, DIGEST_CHUNK)):
        digest.update(("\n".join(map("\0".join, chunk)) + "\n").encode())
    return f"sha256:{digest.hexdigest()[:16]}"


@dataclasses.dataclass(frozen=True)
class Report:
    """The outcome of one sync: the plan, what was applied, and the facts status and CLI show."""

    plan: Plan
    applied: Mapping[Reason, int]
    superseded: int  # writes skipped because a newer write landed first (see rediscache's fence)
    vanished: int  # planned PUTs whose source row was no longer a live module when its content was read
    source_count: int
    cached_count: int
    digest: str
    duration_s: float
    dry_run: bool = False
    full: bool = True
    deep: bool = False  # every content key's whole value was compared with what the source row makes
    claimed: int = 0  # content keys taken on their own claim of path and hash (a deep resync must follow)

    @property
    def repaired(self) -> int:
        return sum(self.applied.values())

    def to_dict(self) -> dict[str, object]:
        return {
            "full": self.full,
            "deep": self.deep,
            "claimed": self.claimed,
            "dry_run": self.dry_run,
            "planned": {r.value: n for r, n in self.plan.counts().items()},
            "applied": {r.value: self.applied.get(r, 0) for r in Reason},
            "superseded": self.superseded,
            "vanished": self.vanished,
            "rejected": [{"path": r.path, "reason": r.reason.value, "detail": r.detail} for r in self.plan.rejected],
            "invalid": [{"name": i.path, "detail": i.detail} for i in self.plan.items if i.reason is Reason.INVALID],
            "repairs": [{"role": r.role, "key": r.key, "problem": r.problem} for r in self.plan.repairs],
            "source_modules": self.source_count,
            "cached_modules": self.cached_count,
            "source_digest": self.digest,
            "duration_s": round(self.duration_s, 4),
        }


def count_applied(items: Iterable[Item]) -> dict[Reason, int]:
    found = Counter(item.reason for item in items)
    return {reason: found.get(reason, 0) for reason in Reason}
