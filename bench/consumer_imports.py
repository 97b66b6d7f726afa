"""Import overhead in a reused worker: a workflow importing 10 workspace modules, executed again and again.

Measured inside the worker (``prepare_ms`` = the generation check and eviction, ``load_ms`` = executing the
workflow's module body, which runs the 10 imports), on one long-lived worker, in the same run:

* ours, cache unchanged: the generation did not move, so nothing is checked (target <= 1 ms);
* ours, generation moved by an unrelated module: one HMGET of the manifest for the loaded modules;
* ours, one of the 10 modules changed: that module (and its importers) is evicted and re-imported;
* naive, Bifrost's later fix: every workspace module evicted whenever the cache version changes, so all 10
  are fetched from Redis and compiled again.

    ./dev bench consumer_imports [--runs 300]
"""

from __future__ import annotations

import argparse
import asyncio
import uuid

from bench import _consumer_kit as kit
from modcache import db, engine, pgsource, rediscache
from modcache_consumer import pool, protocol, readiness

MODULES = 10
IMPORTS = "".join(f"import lib.m{n}\n" for n in range(MODULES))
WORKFLOW = IMPORTS + "def run():\n    return lib.m9.V\n"
EVICT_ALL = (
    "import sys\n"
    "for name in [m for m in sys.modules if m == 'lib' or m.startswith('lib.')]:\n"
    "    del sys.modules[name]\n" + WORKFLOW
)


async def run(args: argparse.Namespace) -> None:
    await kit.print_machine_info()
    print(f"workload: a workflow importing {MODULES} workspace modules of 4 KiB, one reused worker")
    async with kit.scratch_database() as url, kit.scratch_keyspace() as keyspace:
        await kit.load_modules(url, MODULES)
        await kit.load_modules(url, 1, prefix="other/x")
        source = pgsource.PgSource(engine=db.make_engine(url))
        cache = rediscache.RedisCache.from_url(kit.REDIS_URL, keyspace=keyspace)
        sync = engine.Engine(source=source, cache=cache)
        await sync.full_resync()
        await cache.write_status({"writer": "bench"})
        guard = readiness.CacheGuard(engine=sync, cache=cache)
        init: protocol.Init = {
            "op": "init",
            "redis_url": kit.REDIS_URL,
            "key_prefix": keyspace.prefix,
            "memory_limit_bytes": None,
            "max_result_bytes": 1 << 20,
            "secret_keys": [],
        }
        workers = pool.WorkerPool(init=init, min_workers=1, max_workers=1)
        await workers.start()
        try:
            rows = await _scenarios(workers, guard, source, sync, args.runs)
        finally:
            await workers.close()
            await guard.close()
            await cache.close()
            await source.close()
    for label, samples in rows:
        print(f"{label:<58} {kit.describe_ms([s / 1000 for s in samples])}")


async def _scenarios(workers, guard, source, sync, runs):  # type: ignore[no-untyped-def]
    async def once(code: str) -> float:
        job: protocol.Job = {
            "op": "run",
            "execution_id": str(uuid.uuid4()),
            "workflow": {"name": "bench", "path": "workflows/bench.py", "code": code, "function_name": "run"},
            "parameters": {},
            "config": {},
            "organization": None,
            "generation": await guard.check(),
        }
        outcome = await workers.run(job, timeout_s=60, repair=guard.repair)
        assert outcome.status == "SUCCESS", outcome.error
        return outcome.timings_ms["prepare_ms"] + outcome.timings_ms["load_ms"]

    async def touch(path: str, n: int) -> None:
        await source.put_module(path, f"V = {n}\n#{'x' * 4000}\n".encode())
        await sync.apply_paths([path])

    await once(WORKFLOW)  # cold: first imports
    unchanged = [await once(WORKFLOW) for _ in range(runs)]
    moved = []
    for n in range(runs):
        await touch("other/x0.py", n)
        moved.append(await once(WORKFLOW))
    changed = []
    for n in range(runs):
        await touch("lib/m0.py", n)
        changed.append(await once(WORKFLOW))
    naive = [await once(EVICT_ALL) for _ in range(runs)]
    return [
        ("ours, cache unchanged", unchanged),
        ("ours, generation moved (another module changed)", moved),
        ("ours, 1 of the 10 modules changed", changed),
        ("naive: evict all workspace modules on a version change", naive),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="./dev bench consumer_imports")
    parser.add_argument("--runs", type=int, default=300)
    asyncio.run(run(parser.parse_args()))
