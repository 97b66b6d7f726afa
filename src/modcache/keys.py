"""Every Redis key, PostgreSQL channel and queue name modcache uses, in one place.

The compatibility layout that existing Bifrost workers read:

* ``{prefix}{path}`` -- STRING, JSON ``{"content": str, "path": str, "hash": str}`` (hash last, so the
  tail of the value carries it; see ``rediscache``);
* ``{prefix}index`` -- SET of module paths (not keys).

Keys modcache adds beside it. Module paths always end in ``.py``, so none of these can collide with one:

* ``{prefix}modcache:manifest`` -- HASH path -> ``"{generation}:{sha256}"``: what modcache last wrote,
  and at which generation (the write fence that makes concurrent writers safe);
* ``{prefix}modcache:generation`` -- STRING integer, bumped on every applied module change; starts at a
  time-derived value so it stays monotonic even after the key is lost (FLUSHDB, eviction);
* ``{prefix}modcache:status`` -- HASH, the last full sync's summary (see ``rediscache.SyncStatus``).
"""

from __future__ import annotations

import dataclasses

DEFAULT_PREFIX = "bifrost:module:"
MODULE_SUFFIX = ".py"

#: PostgreSQL NOTIFY channel the trigger in ``modcache.triggers`` sends module path hints on.
NOTIFY_CHANNEL = "modcache_modules"

#: RabbitMQ names used by the execution consumer (the defaults; ``dead_letter_exchange``/``poison_queue`` derive
#: the companions of any other queue name, so a deployment or a test can run beside them).
EXECUTIONS_QUEUE = "workflow-executions"
#: Header on a poisoned message saying why it was set aside.
POISON_REASON_HEADER = "x-modcache-poison-reason"

#: Organization/config cache keys used by the consumer's ConfigResolver (behind an optional namespace).
ORG_CACHE_PREFIX = "modcache:org:"
CONFIG_CACHE_PREFIX = "modcache:config:"


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


@dataclasses.dataclass(frozen=True)
class KeySpace:
    """The names of one cache's keys, derived from its prefix."""

    prefix: str = DEFAULT_PREFIX

    def content(self, path: str) -> str:
        return f"{self.prefix}{path}"

    def path_of(self, key: str) -> str | None:
        """The module path a content key holds, or None if the key is not a module content key."""
        if not key.startswith(self.prefix) or not key.endswith(MODULE_SUFFIX):
            return None
        return key[len(self.prefix) :]

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
    def scan_pattern(self) -> str:
        """A SCAN MATCH pattern for this prefix's content keys (glob characters escaped)."""
        escaped = "".join(f"\\{c}" if c in "*?[]\\" else c for c in self.prefix)
        return f"{escaped}*{MODULE_SUFFIX}"
