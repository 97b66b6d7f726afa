"""Every Redis key, PostgreSQL channel and queue name modcache uses, and the formats of what it stores there.

The compatibility layout that existing Bifrost workers read (byte-compatible, see ``modules.encode_cached``):

* ``{prefix}{path}`` -- STRING, JSON ``{"content": str, "path": str, "hash": str}``;
* ``{prefix}index`` -- SET of module paths (not keys).

Keys modcache adds beside it. Module paths always end in ``.py``, so none of these can collide with one:

* ``{prefix}modcache:manifest`` -- HASH path -> ``"{generation}:{sha256}:{length}"`` (``encode_manifest``): what
  modcache last wrote for the path, at which generation (the write fence that makes concurrent writers safe), and
  the exact byte length of the value it wrote (what the routine resync checks, see ``docs/integrity.md``);
* ``{prefix}modcache:generation`` -- STRING integer, bumped on every applied batch; starts at the server clock in
  microseconds, so it stays monotonic even after the key is lost (FLUSHDB, eviction);
* ``{prefix}modcache:status`` -- HASH, the last full sync's summary (``SyncStatus``);
* ``{prefix}modcache:expected:index`` / ``{prefix}modcache:expected:manifest`` -- SET / HASH, what modcache's own
  writes left in the index and the manifest (every ``APPLY`` changes both copies in the same script): a keyspace
  event names the index or the manifest, not the member, and Redis diffs two SETs in C (``SDIFF``), so a watcher
  finds the members someone else changed without a full resync (``rediscache.INDEX_CHANGES``). Never authority:
  what differs is compared with the source, and a copy that cannot be believed makes a full resync rebuild it;
* ``{prefix}modcache:expected:manifest:spare`` -- HASH, a second copy of the manifest (``APPLY`` writes it too): a
  manifest whose fields someone else changed gets its copy back by ``RENAME`` (O(1)), and the copy is then made
  again from the spare, after the manifest is right (``rediscache.PUT_BACK``).

Everything read back from Redis is judged by the functions here before it is believed: ``KeySpace.name_problem``
for anything that names a key (index members, manifest fields, event channels, SCAN results, NOTIFY paths),
``parse_manifest`` and ``generation_problem`` for the fence. A value that fails is drift to repair, never authority.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import TypedDict

from modcache import modules

DEFAULT_PREFIX = "bifrost:module:"
MODULE_SUFFIX = ".py"

#: PostgreSQL NOTIFY channel the trigger in ``modcache.triggers`` sends module path hints on.
NOTIFY_CHANNEL = "modcache_modules"

#: RabbitMQ names used by the execution consumer (the defaults; ``dead_letter_exchange``/``poison_queue`` derive
#: the companions of any other queue name, so a deployment or a test can run beside them).
EXECUTIONS_QUEUE = "workflow-executions"
#: Header on a poisoned message saying why it was set aside.
POISON_REASON_HEADER = "x-modcache-poison-reason"
#: Header on an execution republished by a sweep (its consumer died; the crash policy retries): the attempt.
RETRY_ATTEMPT_HEADER = "x-modcache-retry-attempt"

#: Organization/config cache keys used by the consumer's ConfigResolver (behind an optional namespace).
ORG_CACHE_PREFIX = "modcache:org:"
CONFIG_CACHE_PREFIX = "modcache:config:"

#: How far above the server clock (microseconds) a generation may be and still be believed: generations start at
#: the clock and grow by one per applied batch, so only a forged value or a clock stepped back by more than this
#: exceeds it. Everything stays far below 2**53, so Lua's doubles hold every believed generation exactly.
GENERATION_SLACK_US = 10 * 24 * 3600 * 1_000_000

_MANIFEST = re.compile(r"([1-9][0-9]{0,17}):([0-9a-f]{64}):([1-9][0-9]{0,9})")
_GENERATION = re.compile(r"[1-9][0-9]{0,17}")
#: A page of manifest values, each followed by a newline (``manifest_columns``): the same rule as ``_MANIFEST``.
_MANIFEST_LINES = re.compile(r"(?:[1-9][0-9]{0,17}:[0-9a-f]{64}:[1-9][0-9]{0,9}\n)*")


def dead_letter_exchange(queue: str) -> str:
    """The exchange ``queue`` dead-letters into (rejected messages end up in its poison queue)."""
    return f"{queue}.dlx"


def poison_queue(queue: str) -> str:
    """Where malformed and rejected messages of ``queue`` wait for a person."""
    return f"{queue}.poison"


def org_cache_key(org_id: str, namespace: str = "") -> str:
    return f"{namespace}{ORG_CACHE_PREFIX}{org_id}"


def config_cache_key(scope: str, namespace: str = "") -> str:
    """One scope's own config rows (``GLOBAL`` or an organization id), not merged with the other scope."""
    return f"{namespace}{CONFIG_CACHE_PREFIX}{scope}"


def prefixes_overlap(a: str, b: str) -> bool:
    """Whether two caches' prefixes can name the same key in one Redis database (one is a prefix of the other).

    ``sec:module:`` and ``sec:module:t2/`` overlap: ``sec:module:t2/x.py`` is a content key of both."""
    return a.startswith(b) or b.startswith(a)


# -- the manifest -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """One manifest value: the generation it was written at, the module's hash and the content value's length."""

    generation: int
    hash: str
    length: int


def encode_manifest(generation: int, digest: str, length: int) -> str:
    return f"{generation}:{digest}:{length}"


def parse_manifest(value: str | bytes | None) -> ManifestEntry | None:
    """The entry, or None if ``value`` is not exactly what ``encode_manifest`` writes (old formats included)."""
    if value is None:
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    found = _MANIFEST.fullmatch(text)
    if found is None:
        return None
    return ManifestEntry(int(found[1]), found[2], int(found[3]))


def manifest_columns(values: Sequence[str], *, limit: int) -> tuple[list[str], list[int], int] | None:
    """The hashes, the lengths and the highest generation of a page of manifest values, if every one is exactly what
    ``encode_manifest`` writes with a generation of at most ``limit``; None if any is not (then ``parse_manifest``
    each). One regular expression over the page and one split, not 5,000 matches: a full resync reads 100,000."""
    if not values:
        return [], [], 0
    joined = "\n".join(values) + "\n"
    if joined.count("\n") != len(values) or _MANIFEST_LINES.fullmatch(joined) is None:  # no value holds a newline
        return None
    parts = joined.replace("\n", ":").split(":")
    top = max(map(int, parts[0:-1:3]))
    if top > limit:
        return None
    return parts[1::3], list(map(int, parts[2::3])), top


def manifest_hash(value: str | bytes | None) -> str | None:
    """The module hash a manifest value records, or None if the value is not one modcache writes."""
    entry = parse_manifest(value)
    return None if entry is None else entry.hash


def parse_generation(value: str | bytes | None) -> int | None:
    """The generation a value read from Redis holds, or None if it is not a positive integer (only ASCII digits:
    ``"²".isdigit()`` is true, but it is no generation)."""
    if value is None:
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return int(text) if _GENERATION.fullmatch(text) else None


def generation_problem(value: str | bytes | None, *, clock_us: int) -> str | None:
    """Why a generation value read from Redis cannot be believed, or None if it can."""
    if value is None:
        return "missing"
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    if _GENERATION.fullmatch(text) is None:
        return "not a positive integer"
    if int(text) > clock_us + GENERATION_SLACK_US:
        return "far above the server clock"
    return None


# -- the sync status record -----------------------------------------------------------------------------------


class SyncStatus(TypedDict):
    """The ``{prefix}modcache:status`` hash: the last full sync, as ``modcache status`` and the consumer read it.

    Written only by ``RedisCache.write_status`` (the whole hash at once, so no field of another schema survives)."""

    last_success_at: str  # ISO 8601, UTC, seconds
    generation: str
    source_modules: str
    cached_modules: str
    source_digest: str
    last_drift: str  # JSON object: reason -> count
    rejected: str
    duration_s: str
    deep: str  # "1" if the sync verified every content key's whole value, else "0"
    source_system: str  # PostgreSQL's system identifier the cache is filled from ("" unknown; ``lineage``)
    source_timeline: str  # the highest timeline of it synced from ("0" unknown): an older one is refused
    source_lsn: str  # the highest WAL position of it synced from ("0/0" unknown): a server behind it is refused
    source_seal: str  # HMAC of the prefix and the 3 fields above (``lineage.seal``): unsealed ones are not believed


STATUS_FIELDS = tuple(SyncStatus.__annotations__)


# -- key names --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeySpace:
    """The names of one cache's keys, derived from its prefix.

    ``excluded`` are the longer prefixes of other caches in the same Redis database (``sec:module:t2/`` inside
    ``sec:module:``): their keys are never this cache's, so nothing here names, scans, deletes or writes them."""

    prefix: str = DEFAULT_PREFIX
    excluded: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        longer = tuple(p for p in self.excluded if p.startswith(self.prefix) and p != self.prefix)
        object.__setattr__(self, "excluded", longer)

    def content(self, path: str) -> str:
        return f"{self.prefix}{path}"

    def name_problem(self, path: str) -> str | None:
        """Why ``path`` does not name a content key of this cache, or None if it does (the one rule for every name
        read from the source, the index, the manifest, NOTIFY payloads, key events and SCAN)."""
        problem = modules.path_problem(path)
        if problem is not None:
            return problem
        key = self.content(path)
        for other in self.excluded:
            if key.startswith(other):
                return f"belongs to the cache with prefix {other!r}"
        return None

    def path_of(self, key: str) -> str | None:
        """The module path a content key holds, or None if the key is not a content key of this cache."""
        if not key.startswith(self.prefix):
            return None
        path = key[len(self.prefix) :]
        return path if self.name_problem(path) is None else None

    @property
    def index(self) -> str:
        return f"{self.prefix}index"

    @property
    def manifest(self) -> str:
        return f"{self.prefix}modcache:manifest"

    @property
    def generation(self) -> str:
        return f"{self.prefix}modcache:generation"

    @property
    def status(self) -> str:
        return f"{self.prefix}modcache:status"

    @property
    def writes_channel(self) -> str:
        """The Pub/Sub channel on which modcache's write script brackets its own writes (see ``rediscache``)."""
        return f"{self.prefix}modcache:writes"

    @property
    def expected_index(self) -> str:
        return f"{self.prefix}modcache:expected:index"

    @property
    def expected_manifest(self) -> str:
        return f"{self.prefix}modcache:expected:manifest"

    @property
    def spare_manifest(self) -> str:
        return f"{self.prefix}modcache:expected:manifest:spare"

    def expected(self) -> tuple[str, str, str]:
        """The copies of the index and the manifest that only modcache writes (see the module docstring)."""
        return self.expected_index, self.expected_manifest, self.spare_manifest

    def bookkeeping(self) -> dict[str, str]:
        """Role -> key of modcache's own keys beside the content keys (``index`` is Bifrost's)."""
        return {"index": self.index, "manifest": self.manifest, "generation": self.generation, "status": self.status}

    @property
    def scan_pattern(self) -> str:
        """A SCAN MATCH pattern for this prefix's content keys (glob characters escaped)."""
        return f"{glob_escape(self.prefix)}*{MODULE_SUFFIX}"

    def keyspace_pattern(self, db: int) -> str:
        """The PSUBSCRIBE pattern of this prefix's keyspace notification channels in database ``db``."""
        return f"__keyspace@{db}__:{glob_escape(self.prefix)}*"


def glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def hash_tag(prefix: str) -> str | None:
    """The Redis Cluster hash tag the prefix gives every key under it, or None.

    Redis hashes only what is between the first ``{`` and the next ``}`` when that is not empty; the tag must close
    inside the prefix, or a module path with a ``}`` would move its key to another slot."""
    start = prefix.find("{")
    end = prefix.find("}", start + 1) if start >= 0 else -1
    return prefix[start + 1 : end] if end > start + 1 else None
