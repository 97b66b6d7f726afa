"""Expired (or deleted) content key -> restored by the Watcher from Redis keyspace events.

Fixture: 10,000 modules x 4 KiB, a private redis-server (``hz 100``, so Redis notices an expired key within
~10 ms; Redis's own expiry delay is reported separately), and a modcache Watcher in a child process. The index
entry stays in every case: exactly the partial expiry that broke Bifrost (bifrost-contract.md failure mode 1).

For each of N keys in turn: ``PEXPIRE key 1`` and timestamp Redis's ``expired`` key event (or ``del``: when the
millisecond has already passed, Redis deletes the key at once) and the ``set`` event of the restored key; then
the same with ``DEL``. No polling: every wait is on a key event.

The naive reference: the original plan's design has no event path; a partial expiry stays broken until its next sync
(~20 s at 100,000 modules, on the next execution message).

    ./dev bench core_expiry [--keys N] [--modules N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

import redis.asyncio as aioredis

from bench import _support as sup
from modcache import keys, settings

TARGET_P99_MS = 50.0
WAIT_S = 10.0
BOUND_S = 600


async def _expire(
    args: argparse.Namespace, client: aioredis.Redis, clock: sup.KeyEvents, ks: keys.KeySpace
) -> tuple[list[float], list[float]]:
    from_event, from_call = [], []
    for n in range(args.keys):
        key = ks.content(sup.module_path(n % args.modules))
        expired = clock.expect("expired", key, "del")  # Redis deletes (a `del` event) if 1 ms passed already
        restored = clock.expect("set", key)
        called = time.perf_counter()
        await client.pexpire(key, 1)
        try:
            gone = await asyncio.wait_for(expired, WAIT_S)
            back = await asyncio.wait_for(restored, WAIT_S)
        except TimeoutError:
            state = f"exists={await client.exists(key)} pttl={await client.pttl(key)} expired_seen={expired.done()}"
            with contextlib.suppress(TimeoutError):
                late = await asyncio.wait_for(restored, WAIT_S)
                state += f"; restored after {late - called:.3f} s"
            raise SystemExit(f"expiry {n} of {key}: no event within {WAIT_S} s ({state})") from None
        from_event.append(back - gone)
        from_call.append(back - called)
    return from_event, from_call


async def _delete(
    args: argparse.Namespace, client: aioredis.Redis, clock: sup.KeyEvents, ks: keys.KeySpace
) -> list[float]:
    latencies = []
    for n in range(args.keys):
        key = ks.content(sup.module_path((n + args.keys) % args.modules))
        restored = clock.expect("set", key)
        called = time.perf_counter()
        await client.delete(key)
        latencies.append(await asyncio.wait_for(restored, WAIT_S) - called)
    return latencies


async def _warm_up(client: aioredis.Redis, clock: sup.KeyEvents, ks: keys.KeySpace) -> None:
    """Delete one key and wait for it to come back: the watcher's keyspace subscription is live."""
    key = ks.content(sup.module_path(0))
    restored = clock.expect("set", key)
    await client.delete(key)
    await asyncio.wait_for(restored, 30)


async def bench(args: argparse.Namespace) -> None:
    with sup.private_redis("--hz", "100") as redis_url:
        async with sup.bench_database() as database_url:
            await sup.print_machine_info(database_url=database_url, redis_url=redis_url)
            load_s = await sup.load_modules(database_url, args.modules)
            print(f"fixture: {args.modules} modules x {sup.MODULE_BYTES} B loaded server-side in {load_s:.1f} s")
            ks = settings.Settings().keyspace()
            client = aioredis.Redis.from_url(redis_url, decode_responses=True)
            try:
                async with sup.KeyEvents(redis_url, ["set", "expired", "del"]) as clock:
                    with sup.watcher_process(database_url, redis_url):
                        await sup.wait_for_status(redis_url, ks)
                        await _warm_up(client, clock, ks)
                        from_event, from_call = await _expire(args, client, clock, ks)
                        deleted = await _delete(args, client, clock, ks)
                        index_size = await client.scard(ks.index)
            finally:
                await client.aclose()
    print(f"\n{args.keys} partial expiries and {args.keys} deletions, one at a time (index entry kept):")
    sup.summary("PEXPIRE 1 -> restored (incl. Redis's expiry)", from_call)
    sup.summary("DEL -> restored", deleted, TARGET_P99_MS)
    sup.summary("key expired (event) -> restored", from_event, TARGET_P99_MS)
    print(f"  index still lists {index_size} paths (never touched)")


def main() -> None:
    parser = argparse.ArgumentParser(prog="./dev bench core_expiry")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--modules", type=int, default=10_000)
    args = parser.parse_args()
    asyncio.run(asyncio.wait_for(bench(args), BOUND_S))


if __name__ == "__main__":
    main()
