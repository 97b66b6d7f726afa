"""An independent judge of convergence: reads the rows and the keys directly and compares exact values.

It shares no code with the engine: what a worker must find is computed here from the rows with ``json.dumps`` and
``hashlib``, and compared with what Redis holds (content keys, index, manifest, generation). Keys the test
planted outside the cache's own names (``untouchable``) must still hold exactly what was planted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Mapping

import asyncpg
import redis.asyncio as aioredis

LIVE_SQL = """
SELECT path, content, content_hash FROM workspace_files
WHERE entity_type = 'module' AND NOT is_deleted AND content IS NOT NULL
"""
_GOOD = re.compile(r"(?:(?!\.{1,2}/)[^/\\\x00]+/)*[^/\\\x00]*\.py")
#: Rows or keys judged between two yields to the event loop: the judge runs on the loop of the watcher it judges, and
#: one check of 10,000 modules in one piece (0.1 s of CPU) held it for 50-90 ms at a time (load 5), each repair's
#: every round trip waiting behind it.
YIELD_EVERY = 500


async def expected_values(database_url: str, *, max_bytes: int = 64 * 1024) -> dict[str, str]:
    """path -> the exact content-key value a worker must read, for every servable live row."""
    return (await _expected(database_url, max_bytes=max_bytes))[0]


async def _expected(database_url: str, *, max_bytes: int) -> tuple[dict[str, str], dict[str, str]]:
    """``expected_values`` and each of those paths' content hash."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(LIVE_SQL)
    finally:
        await conn.close()
    wanted, digests = {}, {}
    for n, (path, content, digest) in enumerate(rows, 1):
        if n % YIELD_EVERY == 0:
            await asyncio.sleep(0)
        raw = content.encode()
        if len(path) > 1000 or not _GOOD.fullmatch(path) or len(raw) > max_bytes:
            continue
        if hashlib.sha256(raw).hexdigest() != digest:
            continue
        wanted[path] = json.dumps({"content": content, "path": path, "hash": digest})
        digests[path] = digest
    return wanted, digests


async def differences(
    database_url: str,
    client: aioredis.Redis,
    prefix: str,
    untouchable: Mapping[str, str] = {},
    *,
    max_bytes: int = 64 * 1024,
) -> list[str]:
    """Everything that differs between what workers must see and what Redis holds (empty: converged); rows larger
    than ``max_bytes`` are not expected to be cached."""
    wanted, digests = await _expected(database_url, max_bytes=max_bytes)
    found: list[str] = []
    values = await client.mget([prefix + p for p in wanted]) if wanted else []
    for n, ((p, v), got) in enumerate(zip(wanted.items(), values, strict=True), 1):
        if n % YIELD_EVERY == 0:
            await asyncio.sleep(0)
        if got != v:
            found.append(f"content of {p!r}")
    content_keys = {k async for k in client.scan_iter(match=_glob(prefix) + "*.py", count=1000)}
    extra = {k for k in content_keys if k[len(prefix) :] not in wanted and k not in untouchable}
    found += [f"orphan content key {k!r}" for k in sorted(extra)]
    found += await _bookkeeping(client, prefix, wanted, digests)
    for key, value in untouchable.items():
        if await client.get(key) != value:
            found.append(f"foreign key {key!r} was touched")
    return found


async def _bookkeeping(
    client: aioredis.Redis, prefix: str, wanted: Mapping[str, str], digests: Mapping[str, str]
) -> list[str]:
    found = []
    index, manifest = prefix + "index", prefix + "modcache:manifest"
    kinds = {key: await client.type(key) for key in (index, manifest, prefix + "modcache:generation")}
    if wanted and (kinds[index], kinds[manifest]) != ("set", "hash"):
        return [f"bookkeeping types {kinds}"]
    try:
        members = await client.smembers(index) if kinds[index] == "set" else set()
        entries = await client.hgetall(manifest) if kinds[manifest] == "hash" else {}
    except UnicodeDecodeError:  # a decoding client cannot read a name that is not UTF-8: not converged
        return ["the index or the manifest names something that is not UTF-8"]
    if members != set(wanted):
        found.append(
            f"index differs: extra {sorted(members - set(wanted))[:5]}, lacks {sorted(set(wanted) - members)[:5]}"
        )
    if set(entries) != set(wanted):
        found.append(f"manifest fields differ: {sorted(set(entries) ^ set(wanted))[:5]}")
    top = 0
    for n, (path, value) in enumerate(entries.items(), 1):
        if n % YIELD_EVERY == 0:
            await asyncio.sleep(0)
        gen, _, rest = value.partition(":")
        digest, _, length = rest.partition(":")
        want = wanted.get(path)
        if want is not None and (digest != digests[path] or length != str(len(want.encode()))):
            found.append(f"manifest entry of {path!r} is {value!r}")
        top = max(top, int(gen)) if gen.isdigit() else top
    generation = (
        await client.get(prefix + "modcache:generation") if kinds[prefix + "modcache:generation"] == "string" else None
    )
    if wanted and (generation is None or not generation.isdigit() or int(generation) < top):
        found.append(f"generation {generation!r} below the manifest's {top}")
    return found


async def converged(
    database_url: str,
    client: aioredis.Redis,
    prefix: str,
    *,
    within_s: float,
    untouchable: Mapping[str, str] = {},
) -> list[str]:
    """Await convergence (another component's progress: checked every 20 ms, or as often as the check's own cost
    allows, until the deadline); returns what still differed at the deadline (empty: converged in time)."""
    deadline = time.monotonic() + within_s
    while True:
        began = time.monotonic()
        left = await differences(database_url, client, prefix, untouchable)
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(max(0.02, time.monotonic() - began))  # the judge takes at most half the CPU


def _glob(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
