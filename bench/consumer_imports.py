"""Import overhead in a fresh execution: a workflow importing 10 workspace modules (4 KiB each), again and again.

Measured inside the execution (``prepare_ms`` + ``load_ms``: executing the workflow's module body, which runs
the 10 imports), every execution a fresh process cloned from the executor's template, in the same run:

* template memory warm, cache unchanged: the template was taught the verified lookups at this generation and
  compiled them, so the imports cost no round trip and no compile (target <= 2 ms);
* generation moved (another module changed before each run): the template's memory is a generation old, so
  every lookup goes over the channel to the consumer and Redis (then the template is taught again);
* cold template (never taught): every lookup over the channel and every module compiled in the execution.

    ./dev bench consumer_imports [--runs 300]
"""

from __future__ import annotations

import argparse
import asyncio
import uuid

import redis.asyncio as aioredis

from bench import _consumer_kit as kit
from modcache import db, engine, pgsource, rediscache
from modcache_consumer import crypto, executor, protocol, readiness, serving

MODULES = 10
IMPORTS = "".join(f"import lib.m{n}\n" for n in range(MODULES))
WORKFLOW = IMPORTS + "def run():\n    return lib.m9.V\n"


async def run(args: argparse.Namespace) -> None:
    await kit.print_machine_info()
    print(f"workload: a workflow importing {MODULES} workspace modules of 4 KiB, a fresh process per execution")
    async with kit.scratch_database() as url, kit.scratch_keyspace() as keyspace:
        await kit.load_modules(url, MODULES)
        await kit.load_modules(url, 1, prefix="other/x")
        source = pgsource.PgSource(engine=db.make_engine(url))
        cache = rediscache.RedisCache.from_url(kit.REDIS_URL, keyspace=keyspace)
        sync = engine.Engine(source=source, cache=cache)
        await sync.full_resync()
        await cache.write_status({"writer": "bench"})
        guard = readiness.CacheGuard(engine=sync, cache=cache)
        client = aioredis.Redis.from_url(kit.REDIS_URL, decode_responses=True)
        modules = serving.ModuleServer(client=client, keyspace=keyspace, repair=guard.repair)
        taught = executor.Executor(teacher=modules)
        cold = executor.Executor(teacher=None)
        await taught.start()
        await cold.start()
        try:
            rows = await _scenarios(taught, cold, guard, modules, source, sync, args.runs)
        finally:
            await taught.close()
            await cold.close()
            await client.aclose()
            await guard.close()
            await cache.close()
            await source.close()
    for label, samples in rows:
        print(f"{label:<62} {kit.describe_ms([s / 1000 for s in samples])}")


async def _scenarios(taught, cold, guard, modules, source, sync, runs):  # type: ignore[no-untyped-def]
    async def once(the_executor: executor.Executor) -> float:
        job: protocol.Job = {
            "op": "run",
            "execution_id": str(uuid.uuid4()),
            "workflow": {"name": "bench", "path": "workflows/bench.py", "code": WORKFLOW, "function_name": "run"},
            "parameters": {},
            "config": {},
            "organization": None,
            "generation": await guard.check(),
        }
        session = serving.Session(modules=modules, config={}, secrets=crypto.Secrets([]))
        outcome = await the_executor.run(job, timeout_s=60, session=session)
        assert outcome.status == "SUCCESS", outcome.error
        return float(outcome.timings_ms["prepare_ms"] + outcome.timings_ms["load_ms"])

    async def touch(path: str, n: int) -> None:
        await source.put_module(path, f"V = {n}\n#{'x' * 4000}\n".encode())
        await sync.apply_paths([path])

    await once(taught)  # the first execution reads them; the template is taught afterwards
    warm = [await once(taught) for _ in range(runs)]
    trips = modules.round_trips
    warm_again = [await once(taught) for _ in range(20)]
    assert modules.round_trips == trips, "the warm executions went to Redis"
    moved = []
    for n in range(runs):
        await touch("other/x0.py", n)
        moved.append(await once(taught))
    cold_runs = [await once(cold) for _ in range(runs)]
    return [
        ("fresh execution, template memory warm (cache unchanged)", warm + warm_again),
        ("fresh execution, generation moved (another module changed)", moved),
        ("fresh execution, cold template (every import over the channel)", cold_runs),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="./dev bench consumer_imports")
    parser.add_argument("--runs", type=int, default=300)
    asyncio.run(run(parser.parse_args()))
