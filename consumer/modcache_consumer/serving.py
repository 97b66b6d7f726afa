"""What the consumer answers on an execution's channel: module lookups, repairs and its own secrets.

Executions hold no Redis client and no key, so every read of the module cache happens here:

* ``lookup``: one MULTI/EXEC round trip (content keys, manifest entries, index membership, generation); each
  content's SHA-256 is checked against the cache's ``hash`` before it is handed over (a mismatch counts as
  absent, so the repair rewrites it); ``manifest``, ``directory`` (every directory of an indexed path, computed
  once per generation) and ``repair`` (single-flight, through ``readiness.CacheGuard.repair``);
* ``secret``: a secret config of *this* execution's scope (its organization's and the global ones), decrypted
  here when the workflow reads it; the execution never sees a Fernet token or key;
* verified lookups are remembered per generation and taught to the template (``learned``), which compiles
  them once, so the next executions import unchanged modules without a round trip.

Nothing here raises for what an execution asked: a bad request is answered with an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.exceptions

from modcache import errors, keys, modules, rediscache
from modcache_consumer import configs, crypto, protocol

log = logging.getLogger(__name__)

Repair = Callable[[list[str]], Awaitable[None]]
MAX_PATHS = 64
MAX_LEARNED = 4096
#: What one generation's lessons may hold, as JSON (module content, directories): well below the control frame's
#: limit, so a lesson always fits one frame, and a bound on what the consumer keeps for the template.
MAX_LESSON_BYTES = 16 * 1024**2


class ModuleServer:
    """Cache reads on behalf of executions, shared by all of them (they only read)."""

    def __init__(self, *, client: rediscache.Client, keyspace: keys.KeySpace, repair: Repair) -> None:
        self._client = client
        self._keyspace = keyspace
        self._repair = repair
        self._directories: tuple[int | None, frozenset[str]] | None = None
        self._learned_generation: int | None = None
        self._learned: dict[tuple[str, ...], list[protocol.RawEntry]] = {}
        self._taught: set[tuple[str, ...]] = set()
        self._learned_directories: dict[str, bool] = {}
        self._taught_directories: set[str] = set()
        self.lesson_bytes = 0  # what the lessons of this generation hold, as JSON (MAX_LESSON_BYTES)
        self.round_trips = 0  # to Redis, for lookups and manifests (tests and benchmarks read it)

    async def lookup(self, paths: Sequence[str]) -> tuple[int | None, list[protocol.RawEntry]]:
        ks = self._keyspace
        self.round_trips += 1
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.get(ks.generation)
            for path in paths:  # one GET each, not MGET: a Cluster client refuses MGET inside a pipeline
                pipe.get(ks.content(path))
            pipe.hmget(ks.manifest, list(paths))
            pipe.smismember(ks.index, list(paths))
            generation, *contents, manifest, indexed = await pipe.execute()
        entries = [
            verified_entry(path, value, held, bool(member))
            for path, value, held, member in zip(paths, contents, manifest, indexed, strict=True)
        ]
        current = _int(generation)
        if current is not None and _settled(entries):
            self._remember(current, tuple(paths), entries)
        return current, entries

    async def manifest(self, paths: Sequence[str]) -> tuple[int | None, dict[str, str]]:
        self.round_trips += 1
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.get(self._keyspace.generation)
            pipe.hmget(self._keyspace.manifest, list(paths) or ["\x00"])
            generation, held = await pipe.execute()
        found = {p: h for p, v in zip(paths, held, strict=False) if (h := keys.manifest_hash(v)) is not None}
        return _int(generation), found

    async def is_directory(self, rel: str, generation: int | None) -> bool:
        if self._directories is None or self._directories[0] != generation or generation is None:
            members = await self._client.smembers(self._keyspace.index)
            dirs = {path.rsplit("/", n)[0] for path in map(str, members) for n in range(1, path.count("/") + 1)}
            self._directories = (generation, frozenset(dirs))
        found = rel in self._directories[1]
        if generation is not None and generation == self._learned_generation and rel not in self._learned_directories:
            size = len(rel) + 16
            if len(self._learned_directories) < MAX_LEARNED and self.lesson_bytes + size <= MAX_LESSON_BYTES:
                self._learned_directories[rel] = found
                self.lesson_bytes += size
        return found

    async def repair(self, paths: list[str]) -> None:
        await self._repair(paths)

    def learned(self) -> protocol.Learned | None:
        """Verified lookups the template has not been taught yet (at the newest generation seen)."""
        fresh: list[list[Any]] = []
        budget = protocol.MAX_LESSON_SOURCE_BYTES  # one lesson compiles quickly; the rest goes in the next ones
        for candidates, entries in self._learned.items():
            size = _source_bytes(entries)
            if candidates in self._taught or size > budget:
                continue
            budget -= size
            fresh.append([list(candidates), entries])
        dirs = [[d, v] for d, v in self._learned_directories.items() if d not in self._taught_directories]
        if self._learned_generation is None or not (fresh or dirs):
            return None
        self._taught.update(tuple(c) for c, _ in fresh)
        self._taught_directories.update(self._learned_directories)
        return {"op": "learn", "generation": self._learned_generation, "lookups": fresh, "directories": dirs}

    def _remember(self, generation: int, candidates: tuple[str, ...], entries: list[protocol.RawEntry]) -> None:
        if self._learned_generation is None or generation > self._learned_generation:
            self._learned_generation, self._learned, self._taught = generation, {}, set()
            self._learned_directories, self._taught_directories = {}, set()
            self.lesson_bytes = 0
        if generation != self._learned_generation or candidates in self._learned or len(self._learned) >= MAX_LEARNED:
            return
        if any(len(e["content"] or "") > protocol.MAX_TAUGHT_MODULE_BYTES for e in entries):
            return  # too large to compile in the template (attack-8c C1): served over the channel on demand
        size = len(json.dumps([list(candidates), entries]))  # as the lesson will carry it (attack-8b A2)
        if self.lesson_bytes + size <= MAX_LESSON_BYTES:
            self._learned[candidates] = entries
            self.lesson_bytes += size


def _source_bytes(entries: list[protocol.RawEntry]) -> int:
    return sum(len(e["content"] or "") for e in entries)


class Session:
    """One execution's side of the conversation: its modules, its organization's configs, nothing else."""

    def __init__(self, *, modules: ModuleServer, config: configs.ConfigMap, secrets: crypto.Secrets) -> None:
        self._modules = modules
        self._config = config
        self._secrets = secrets

    async def answer(self, frame: dict[str, Any]) -> dict[str, Any]:
        try:
            return {"op": "answer", **await self._answer(frame)}
        except errors.ConfigError as e:
            return {"op": "answer", "error": e.reason}
        except (redis.exceptions.RedisError, OSError, errors.CacheUnavailable) as e:
            return {"op": "answer", "error": f"the module cache is unavailable ({type(e).__name__})"}
        except errors.ModcacheError as e:
            return {"op": "answer", "error": errors.describe(e)}

    async def _answer(self, frame: dict[str, Any]) -> dict[str, Any]:
        op = frame["op"]
        if op == "lookup":
            generation, entries = await self._modules.lookup(_paths(frame))
            return {"generation": generation, "entries": entries}
        if op == "manifest":
            generation, hashes = await self._modules.manifest(_paths(frame))
            return {"generation": generation, "hashes": hashes}
        if op == "directory":
            rel, generation = frame.get("rel"), frame.get("generation")
            if not isinstance(rel, str) or not (generation is None or isinstance(generation, int)):
                raise errors.InputError("directory", "malformed request")
            if modules.path_problem(f"{rel}/__init__.py") is not None:
                raise errors.InputError(rel[:200], "not a workspace directory")
            return {"directory": await self._modules.is_directory(rel, generation)}
        if op == "repair":
            await self._modules.repair(_paths(frame))
            return {"error": None}
        if op == "secret":
            return {"value": self._secret(frame.get("key"))}
        raise errors.InputError(str(op)[:40], "unknown request")

    def _secret(self, key: object) -> str:
        item = self._config.get(key) if isinstance(key, str) else None
        if item is None or item.get("type") != configs.SECRET:
            raise errors.ConfigError(str(key)[:100], "no such secret config for this execution")
        return self._secrets.decrypt(str(item["value"]), name=str(key))


def _settled(entries: list[protocol.RawEntry]) -> bool:
    """A lookup worth remembering: it found content, or found nothing the cache knows (no repair pending)."""
    found = any(e["content"] is not None for e in entries)
    known = any(e["indexed"] or e["manifest_hash"] is not None for e in entries)
    return found or not known


def withhold_secrets(config: configs.ConfigMap) -> dict[str, Any]:
    """The config map as an execution receives it: secret values stay with the consumer."""
    return {k: ({"type": v["type"]} if v.get("type") == configs.SECRET else dict(v)) for k, v in config.items()}


def verified_entry(path: str, value: str | None, held: str | None, indexed: bool) -> protocol.RawEntry:
    content = digest = None
    if value is not None:
        try:
            cached = modules.decode_cached(value)
            content, digest = cached["content"], cached["hash"]
        except ValueError:
            pass  # a corrupt value is treated as missing: the repair rewrites it
    if content is not None and hashlib.sha256(content.encode()).hexdigest() != digest:
        log.warning("module cache: %s does not match its hash; treating it as missing", path)
        content = digest = None
    entry = keys.parse_manifest(held)
    # a value's own hash is only as good as its writer: another Redis writer can recompute it (attack-9d F8). What
    # modcache wrote is in its manifest too, in the same script: content only modcache's manifest vouches for runs
    if content is not None and (entry is None or entry.hash != digest):
        log.warning("module cache: %s is not what modcache's manifest says it wrote; treating it as missing", path)
        content = digest = None
    return {
        "path": path,
        "content": content,
        "hash": digest,
        "manifest_generation": entry.generation if entry is not None else None,
        "manifest_hash": entry.hash if entry is not None else None,
        "indexed": indexed,
    }


def _paths(frame: dict[str, Any]) -> list[str]:
    paths = frame.get("paths")
    if not isinstance(paths, list) or len(paths) > MAX_PATHS or not all(isinstance(p, str) for p in paths):
        raise errors.InputError("paths", "malformed request")
    bad = next((p for p in paths if modules.path_problem(p)), None)
    if bad is not None:
        raise errors.InputError(bad[:200], "not a workspace path")
    if len(set(paths)) != len(paths):
        raise errors.InputError("paths", "a path is named twice")
    return paths


def _int(value: Any) -> int | None:
    return int(value) if value is not None else None
