"""Commit -> cache updated, with a running Watcher: single-row changes and one 10,000-row transaction.

Fixture: 10,000 modules x 4 KiB in a throw-away database, a private redis-server, and a modcache Watcher in a
child process (LISTEN + coalescing applier, as ``modcache sync --watch`` runs it). This process commits
changes one at a time and timestamps (a) just before sending the committing statement, (b) when the commit is
acknowledged, (c) when its own LISTEN connection receives the trigger's NOTIFY (the floor: PostgreSQL's
delivery alone), and (d) when Redis publishes the ``set`` key event of the module's content key (the cache
holds the new content). Latency is (d) - (a). No polling: every wait is on an event.

The naive reference is the floor (c) - (a) measured on the same commits; the original plan's design has no
commit-driven path at all (its sync runs on the next execution message and takes ~20 s at 100,000 modules).

    ./dev bench core_latency [--changes N] [--modules N]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time

import asyncpg

from bench import _support as sup
from modcache import keys, settings

TARGET_P99_MS = 20.0
TARGET_BULK_S = 2.0
WAIT_S = 10.0
BOUND_S = 600

UPDATE_SQL = "UPDATE workspace_files SET content = $2, content_hash = $3, size_bytes = $4 WHERE path = $1"
BULK_SQL = """
UPDATE workspace_files SET content = content || E'# bulk edit\\n',
    content_hash = encode(sha256(convert_to(content || E'# bulk edit\\n', 'UTF8')), 'hex')
WHERE entity_type = 'module' AND NOT is_deleted
"""


def _revision(path: str, n: int) -> tuple[str, str, int]:
    text = (f"# {path} revision {n}\n" + "VALUE = 1  # padding\n" * 200)[: sup.MODULE_BYTES - 1] + "\n"
    raw = text.encode()
    return text, hashlib.sha256(raw).hexdigest(), len(raw)


class NotifyClock:
    """This process's own LISTEN: when did the trigger's NOTIFY for a path arrive."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}

    def __call__(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        now = time.perf_counter()
        for path in json.loads(payload).get("paths", []):
            self.arrived.setdefault(path, now)


async def _warm_up(writer: asyncpg.Connection, clock: sup.KeyEvents, ks: keys.KeySpace) -> None:
    """One change end to end, to be sure the watcher's listener is live before measuring."""
    path = sup.module_path(0)
    text, digest, size = _revision(path, 0)
    seen = clock.expect("set", ks.content(path))
    await writer.execute(UPDATE_SQL, path, text, digest, size)
    await asyncio.wait_for(seen, WAIT_S)


async def _single_changes(
    args: argparse.Namespace, writer: asyncpg.Connection, clock: sup.KeyEvents, ks: keys.KeySpace
) -> None:
    notify = NotifyClock()
    await writer.add_listener(keys.NOTIFY_CHANNEL, notify)
    total, after_commit, floor = [], [], []
    for n in range(args.changes):
        path = sup.module_path(1 + n % (args.modules - 1))
        text, digest, size = _revision(path, n + 1)
        seen = clock.expect("set", ks.content(path))
        notify.arrived.pop(path, None)
        sent = time.perf_counter()
        await writer.execute(UPDATE_SQL, path, text, digest, size)
        committed = time.perf_counter()
        updated = await asyncio.wait_for(seen, WAIT_S)
        total.append(updated - sent)
        after_commit.append(updated - committed)
        if path in notify.arrived:
            floor.append(notify.arrived[path] - sent)
    await writer.remove_listener(keys.NOTIFY_CHANNEL, notify)
    print(f"\n{args.changes} single-row changes, one at a time (UPDATE content + hash, autocommit):")
    sup.summary("floor: statement sent -> NOTIFY received", floor)
    sup.summary("statement sent -> cache updated (incl. commit)", total)
    sup.summary("commit acknowledged -> cache updated", after_commit, TARGET_P99_MS)


async def _bulk(args: argparse.Namespace, writer: asyncpg.Connection, clock: sup.KeyEvents) -> float:
    done = clock.expect_count("set", args.modules)
    sent = time.perf_counter()
    await writer.execute(BULK_SQL)
    committed = time.perf_counter()
    finished = await asyncio.wait_for(done, 60)
    print(f"\n{args.modules} rows changed in one transaction (one UPDATE statement, content + hash of every row):")
    sup.row("UPDATE statement incl. commit (PostgreSQL's own time)", f"{committed - sent:.3f} s")
    sup.row(
        "commit acknowledged -> all content keys updated",
        f"{finished - committed:.3f} s",
        f"<= {TARGET_BULK_S} s",
        sup.verdict(finished - committed, TARGET_BULK_S),
    )
    sup.row("statement sent -> all content keys updated", f"{finished - sent:.3f} s")
    return finished - committed


async def _converged(database_url: str, redis_url: str) -> str:
    async with sup.modcache_engine(database_url, redis_url) as eng:
        left = await eng.full_resync(dry_run=True)
    return left.plan.describe()


async def bench(args: argparse.Namespace) -> None:
    with sup.private_redis() as redis_url:
        async with sup.bench_database() as database_url:
            await sup.print_machine_info(database_url=database_url, redis_url=redis_url)
            load_s = await sup.load_modules(database_url, args.modules)
            print(f"fixture: {args.modules} modules x {sup.MODULE_BYTES} B loaded server-side in {load_s:.1f} s")
            ks = settings.Settings().keyspace()
            async with sup.KeyEvents(redis_url, ["set"]) as clock:
                with sup.watcher_process(database_url, redis_url):
                    await sup.wait_for_status(redis_url, ks)
                    writer = await asyncpg.connect(settings.asyncpg_dsn(database_url))
                    try:
                        await _warm_up(writer, clock, ks)
                        await _single_changes(args, writer, clock, ks)
                        await _bulk(args, writer, clock)
                    finally:
                        await writer.close()
            print(f"\ncache vs. source afterwards (dry-run full resync): {await _converged(database_url, redis_url)}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="./dev bench core_latency")
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--modules", type=int, default=10_000)
    args = parser.parse_args()
    asyncio.run(asyncio.wait_for(bench(args), BOUND_S))


if __name__ == "__main__":
    main()
