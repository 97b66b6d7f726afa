"""The Redis adapter: reads the cache's state in a few round trips and applies plans atomically.

Everything that touches Redis for the module cache is here, in three Lua scripts:

* ``CHECK`` verifies a batch of content keys server-side: absent, present, or present with the expected hash
  (read from the value's tail with GETRANGE, since ``hash`` is the JSON's last field), one character per key;
* ``VERIFY`` walks the manifest with HSCAN and checks each entry's content key the same way, so a full resync
  reads the manifest and verifies every content key it names without sending a single key from the client;
* ``APPLY`` writes a batch of plan items. Each item changes content key, index and manifest together
  (atomic per item and per batch) and bumps the generation;
* ``GENERATION`` reads the generation counter, creating it from the server clock if it is gone.

The fence that makes concurrent writers safe: a writer reads the generation *before* it reads the source, and
passes it to ``APPLY``; an item whose manifest entry was written at a later generation was written by someone
who read the source later, so it is skipped and reported as ``conflicted`` for the caller to re-check.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions

from modcache import errors, keys, plan

T = TypeVar("T")

# Statuses CHECK returns per key.
CHECK_ABSENT, CHECK_MATCH, CHECK_OTHER, CHECK_PRESENT = "-", "=", "~", "+"
_NOT_MATCHED = re.compile(f"[^{re.escape(CHECK_MATCH)}]")
# How many trailing bytes hold `"hash": "<64 hex>"}` with room to spare.
TAIL_BYTES = 100

CHECK = """
local out = {}
for i, key in ipairs(KEYS) do
    local want = ARGV[i]
    if want == '' then
        out[i] = redis.call('EXISTS', key) == 1 and '+' or '-'
    else
        local tail = redis.call('GETRANGE', key, -100, -1)
        if tail == '' then
            out[i] = '-'
        elseif string.find(tail, want, 1, true) then
            out[i] = '='
        else
            out[i] = '~'
        end
    end
end
return table.concat(out)
"""

# KEYS: manifest; ARGV: content key prefix, HSCAN cursor, page size. Returns {next cursor, {path, manifest
# hash, ...}, one CHECK status character per entry}. Content keys are derived from the paths (like APPLY, the
# script spans the whole cache's keys, so it needs a single Redis, not a cluster).
VERIFY = """
local call, find, sub = redis.call, string.find, string.sub
local page = call('HSCAN', KEYS[1], ARGV[2], 'COUNT', ARGV[3])
local entries, codes, prefix, n = page[2], {}, ARGV[1], 0
for i = 1, #entries, 2 do
    local value = entries[i + 1]
    local want = sub(value, (find(value, ':', 1, true) or 0) + 1)
    local tail = call('GETRANGE', prefix .. entries[i], -100, -1)
    entries[i + 1] = want
    n = n + 1
    if tail == '' then
        codes[n] = '-'
    elseif want ~= '' and find(tail, want, 1, true) then
        codes[n] = '='
    else
        codes[n] = '~'
    end
end
return {page[1], entries, table.concat(codes)}
"""

GENERATION = """
local g = redis.call('GET', KEYS[1])
if not g then
    local t = redis.call('TIME')
    g = tostring(t[1]) .. string.format('%06d', tonumber(t[2]))
    redis.call('SET', KEYS[1], g)
end
return g
"""

# KEYS: generation, index, manifest, content keys...; ARGV: fence, ttl_s, ttl_jitter_s, seed, then
# (op, path, hash, value) per item. Returns one character per item: 'a' applied, 'c' conflicted.
APPLY = """
local fence = tonumber(ARGV[1])
local ttl, jitter, seed = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}
for i = 4, #KEYS do
    local base = 4 + (i - 4) * 4
    local op, path, hash, value = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4]
    local held = redis.call('HGET', KEYS[3], path)
    local held_gen = held and tonumber(string.match(held, '^(%d+):')) or 0
    if held_gen > fence then
        out[#out + 1] = 'c'
    else
        local gen = redis.call('INCR', KEYS[1])  -- ~1.7e15: exact in Lua's doubles; format it with %.0f
        if op == 'd' then
            redis.call('DEL', KEYS[i])
            redis.call('SREM', KEYS[2], path)
            redis.call('HDEL', KEYS[3], path)
        else
            if op == 'p' then
                if ttl > 0 then
                    redis.call('SET', KEYS[i], value, 'EX', ttl + ((i * 7919 + seed) % (jitter + 1)))
                else
                    redis.call('SET', KEYS[i], value)
                end
            end
            redis.call('SADD', KEYS[2], path)
            redis.call('HSET', KEYS[3], path, string.format('%.0f', gen) .. ':' .. hash)
        end
        out[#out + 1] = 'a'
    end
end
return table.concat(out)
"""

# KEYS: content keys; ARGV: ttl_s, ttl_jitter_s, seed. Refreshes the TTL of keys that exist.
TOUCH = """
local ttl, jitter, seed = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i, key in ipairs(KEYS) do
    redis.call('EXPIRE', key, ttl + ((i * 7919 + seed) % (jitter + 1)))
end
return #KEYS
"""

_OP_CODES = {plan.Operation.PUT: "p", plan.Operation.DELETE: "d", plan.Operation.REINDEX: "r"}


@dataclasses.dataclass(frozen=True)
class Write:
    """One plan item ready for APPLY: the item plus, for PUT, the JSON value to store."""

    item: plan.Item
    value: str = ""


@dataclasses.dataclass(frozen=True)
class Applied:
    applied: tuple[plan.Item, ...]
    conflicted: tuple[plan.Item, ...]


class RedisCache:
    """One module cache (one key prefix on one Redis database)."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        keyspace: keys.KeySpace,
        ttl_s: int | None = None,
        ttl_jitter_ratio: float = 0.2,
        check_batch_size: int = 5000,
    ) -> None:
        self.client = client
        self.keyspace = keyspace
        self._ttl_s = ttl_s or 0
        self._ttl_jitter_s = int(self._ttl_s * ttl_jitter_ratio)
        self._check_batch_size = check_batch_size
        self._check = client.register_script(CHECK)
        self._verify = client.register_script(VERIFY)
        self._apply = client.register_script(APPLY)
        self._generation = client.register_script(GENERATION)
        self._touch = client.register_script(TOUCH)

    @classmethod
    def from_url(cls, url: str, *, keyspace: keys.KeySpace, **options: Any) -> RedisCache:
        try:
            client = aioredis.Redis.from_url(url, decode_responses=True, health_check_interval=30)
        except ValueError as e:
            raise errors.ConfigError("redis_url", "not a valid Redis URL") from e
        return cls(client=client, keyspace=keyspace, **options)

    async def close(self) -> None:
        await self.client.aclose()

    async def ping(self) -> None:
        await _call(self.client.ping())

    async def generation(self, *, create: bool = True) -> int:
        """The current generation; read it *before* reading the source and pass it to ``apply``.

        A missing counter is created from the server clock, unless ``create`` is false (dry runs write
        nothing): then it reads as 0.
        """
        if not create:
            return int(await _call(self.client.get(self.keyspace.generation)) or 0)
        return int(await _call(self._generation(keys=[self.keyspace.generation])))

    async def read_bookkeeping(self) -> tuple[frozenset[str], dict[str, str]]:
        """The index and the manifest (path -> hash), in one round trip."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.smembers(self.keyspace.index)
            pipe.hgetall(self.keyspace.manifest)
            index, manifest = await _call(pipe.execute())
        return frozenset(index), {str(path): _manifest_hash(str(v)) for path, v in manifest.items()}

    async def read_index(self) -> frozenset[str]:
        members: set[str] = await _call(self.client.smembers(self.keyspace.index))  # type: ignore[arg-type]
        return frozenset(members)

    async def verify_manifest(
        self, *, on_page: Callable[[Mapping[str, str | None]], None] | None = None
    ) -> tuple[dict[str, str], dict[str, str | None]]:
        """The manifest (path -> hash) and, per entry, what ``check`` would say of its content key against that
        hash; paged with HSCAN (``check_batch_size`` entries per script call, so Redis stays responsive).

        The next page is requested before a page is handed to ``on_page``, so Redis verifies while we work."""
        ks = self.keyspace
        manifest: dict[str, str] = {}
        content: dict[str, str | None] = {}

        def request(cursor: str) -> asyncio.Future[Any]:
            return asyncio.ensure_future(
                _call(self._verify(keys=[ks.manifest], args=[ks.prefix, cursor, self._check_batch_size]))
            )

        pending: asyncio.Future[Any] | None = request("0")
        try:
            while pending is not None:
                cursor, entries, codes = await pending
                pending = None if str(cursor) == "0" else request(str(cursor))
                page = dict(zip(entries[::2], entries[1::2], strict=True))
                manifest.update(page)
                verified: dict[str, str | None] = dict(page)
                for mismatch in _NOT_MATCHED.finditer(codes):  # few: the common case stays C-level
                    path = entries[2 * mismatch.start()]
                    verified[path] = None if mismatch.group() == CHECK_ABSENT else plan.UNVERIFIED
                content.update(verified)
                if on_page is not None:
                    on_page(verified)
        finally:
            if pending is not None:
                pending.cancel()
        return manifest, content

    async def read_manifest(self, paths: Sequence[str]) -> dict[str, str]:
        """The manifest hashes of ``paths`` (absent paths are left out)."""
        if not paths:
            return {}
        values = await _call(self.client.hmget(self.keyspace.manifest, list(paths)))
        return {p: _manifest_hash(str(v)) for p, v in zip(paths, values, strict=True) if v is not None}

    async def read_index_members(self, paths: Sequence[str]) -> frozenset[str]:
        if not paths:
            return frozenset()
        flags = await _call(self.client.smismember(self.keyspace.index, list(paths)))
        return frozenset(p for p, member in zip(paths, flags, strict=True) if member)

    async def check(self, expected: Mapping[str, str]) -> dict[str, str | None]:
        """For each path: the expected hash if its content key carries it, ``UNVERIFIED`` if the key exists
        with another (or no expected) hash, None if it is absent. ``expected`` maps path -> hash or ""."""
        result: dict[str, str | None] = {}
        for batch in _batches(list(expected.items()), self._check_batch_size):
            codes = await _call(
                self._check(keys=[self.keyspace.content(p) for p, _ in batch], args=[h for _, h in batch])
            )
            for (path, want), code in zip(batch, codes, strict=True):
                result[path] = want if code == CHECK_MATCH else None if code == CHECK_ABSENT else plan.UNVERIFIED
        return result

    async def scan_paths(self) -> set[str]:
        """Every module path that has a content key under this prefix (SCAN, for keys nobody indexed)."""
        found: set[str] = set()
        async for key in self._scan():
            path = self.keyspace.path_of(key)
            if path is not None:
                found.add(path)
        return found

    def _scan(self) -> AsyncIterator[str]:
        return self.client.scan_iter(match=self.keyspace.scan_pattern, count=10_000)

    async def apply(self, writes: Sequence[Write], *, fence: int) -> Applied:
        """Apply ``writes`` unless a newer write (manifest generation > ``fence``) got there first."""
        ks = self.keyspace
        args: list[str | int] = [fence, self._ttl_s, self._ttl_jitter_s, random.randrange(1 << 30)]
        for w in writes:
            args += [_OP_CODES[w.item.operation], w.item.path, w.item.new or "", w.value]
        content_keys = [ks.content(w.item.path) for w in writes]
        codes = await _call(self._apply(keys=[ks.generation, ks.index, ks.manifest, *content_keys], args=args))
        applied = tuple(w.item for w, c in zip(writes, codes, strict=True) if c == "a")
        conflicted = tuple(w.item for w, c in zip(writes, codes, strict=True) if c == "c")
        return Applied(applied=applied, conflicted=conflicted)

    async def refresh_ttl(self, paths: Iterable[str]) -> None:
        """Give existing content keys a fresh jittered TTL (no-op when no TTL is configured)."""
        if not self._ttl_s:
            return
        for batch in _batches(list(paths), self._check_batch_size):
            seed = random.randrange(1 << 30)
            await _call(
                self._touch(
                    keys=[self.keyspace.content(p) for p in batch], args=[self._ttl_s, self._ttl_jitter_s, seed]
                )
            )

    async def write_status(self, fields: Mapping[str, str]) -> None:
        await _call(self.client.hset(self.keyspace.status, mapping=dict(fields)))  # type: ignore[arg-type]

    async def read_status(self) -> dict[str, str]:
        raw = await _call(self.client.hgetall(self.keyspace.status))
        return {str(k): str(v) for k, v in raw.items()}

    async def read_module(self, path: str) -> str | None:
        """The raw JSON value of one content key."""
        value = await _call(self.client.get(self.keyspace.content(path)))
        return value if value is None else str(value)


def _manifest_hash(value: str) -> str:
    return value.partition(":")[2]


def _batches(items: list[T], size: int) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def _call(awaitable: Awaitable[T]) -> T:
    """Await a Redis call, translating redis-py's errors into CacheUnavailable."""
    try:
        result = await awaitable
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
        raise errors.CacheUnavailable(f"Redis unreachable: {errors.describe(e)}") from e
    except redis.exceptions.RedisError as e:
        raise errors.CacheUnavailable(f"Redis error: {errors.describe(e)}") from e
    _raise_swallowed_cancel()
    return result


def _raise_swallowed_cancel() -> None:
    """Re-raise a cancellation that Python 3.11's ``asyncio.wait_for`` swallowed.

    redis-py sends every command through ``wait_for`` (``socket_timeout`` defaults to 5 s); before 3.12,
    ``wait_for`` returns the result instead of raising when the cancel arrives as the send completes
    (CPython gh-86296), and the cancelled task would carry on (a watcher that never stops).
    """
    task = asyncio.current_task()
    if sys.version_info < (3, 12) and task is not None and task.cancelling():
        raise asyncio.CancelledError


AsyncCall = Callable[[], Awaitable[Any]]
