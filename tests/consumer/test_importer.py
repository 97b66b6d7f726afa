"""Workers import workspace modules from the Redis cache: Bifrost's layout, packages and namespace packages,
repair of missing modules with no operator running, and reused workers that never keep stale code
(bifrost-contract.md, defects 1 and 7)."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis

from modcache import modules


async def test_modules_packages_and_namespace_packages_import(pools, harness) -> None:
    await harness.module("shared/halopsa/__init__.py", "from . import tickets\nNAME = 'halo'\n")
    await harness.module("shared/halopsa/tickets.py", "def count():\n    return 3\n")
    await harness.module("vendors/acme/client.py", "URL = 'https://acme.test'\n")  # no __init__.py anywhere
    await harness.converge()
    the_pool = await pools.pool()
    code = (
        "import shared.halopsa, vendors.acme.client\n"
        "from shared.halopsa.tickets import count\n"
        "def run():\n"
        "    return [shared.halopsa.NAME, count(), vendors.acme.client.URL, vendors.acme.client.__file__,\n"
        "            list(vendors.__path__), shared.halopsa.__file__]\n"
    )
    outcome = await pools.run(the_pool, code)
    assert outcome.result == [
        "halo",
        3,
        "https://acme.test",
        "vendors/acme/client.py",
        [],
        "shared/halopsa/__init__.py",
    ], outcome.error


async def test_a_workspace_module_never_shadows_the_standard_library(pools, harness) -> None:
    await harness.module("json.py", "def dumps(value):\n    return 'hijacked'\n")
    await harness.converge()
    the_pool = await pools.pool()
    outcome = await pools.run(the_pool, "import json\ndef run():\n    return json.dumps([1])\n")
    assert outcome.result == "[1]"


async def test_partial_expiry_with_no_operator_still_imports(pools, harness, redis_client: aioredis.Redis) -> None:
    """Defect 1: the index survives, the content key expired; the old check (SCARD index) saw nothing wrong."""
    await harness.module("modules/billing.py", "RATE = 3\n")
    await harness.module("modules/other.py", "X = 1\n")
    await harness.converge()
    billing_key = harness.keyspace.content("modules/billing.py")
    await redis_client.delete(billing_key)
    assert await redis_client.scard(harness.keyspace.index) == 2
    the_pool = await pools.pool()
    outcome = await pools.run(the_pool, "from modules.billing import RATE\ndef run():\n    return RATE\n")
    assert (outcome.status, outcome.result) == ("SUCCESS", 3), outcome.error
    assert modules.decode_cached(await redis_client.get(billing_key))["content"] == "RATE = 3\n"  # repaired


async def test_a_module_the_cache_never_saw_is_fetched_on_first_import(pools, harness) -> None:
    await harness.converge()
    await harness.module("modules/brand_new.py", "VALUE = 'fresh'\n", sync=False)  # no operator wrote it
    the_pool = await pools.pool()
    outcome = await pools.run(the_pool, "from modules.brand_new import VALUE\ndef run():\n    return VALUE\n")
    assert outcome.result == "fresh", outcome.error


async def test_twenty_executions_missing_the_same_module_repair_it_once(pools, harness, redis_client) -> None:
    await harness.module("modules/shared.py", "N = 7\n")
    await harness.converge()
    await redis_client.delete(harness.keyspace.content("modules/shared.py"))
    before = int(await redis_client.get(harness.keyspace.generation))
    the_pool = await pools.pool(min_workers=4, max_workers=4)
    code = "from modules.shared import N\ndef run():\n    return N\n"
    outcomes = await asyncio.gather(*(pools.run(the_pool, code) for _ in range(20)))
    assert [o.result for o in outcomes] == [7] * 20
    assert int(await redis_client.get(harness.keyspace.generation)) == before + 1  # one write, not twenty


SHOW_RATE = "import modules.billing\ndef run():\n    return [modules.billing.RATE, __import__('os').getpid()]\n"


async def test_a_changed_module_is_reimported_by_the_same_worker(pools, harness) -> None:
    """Defect 7: a reused worker kept the old module object in sys.modules."""
    await harness.module("modules/billing.py", "RATE = 1\n")
    await harness.converge()
    the_pool = await pools.pool(min_workers=1, max_workers=1)
    first = await pools.run(the_pool, SHOW_RATE)
    await harness.module("modules/billing.py", "RATE = 2\n")
    second = await pools.run(the_pool, SHOW_RATE)
    assert first.result[0] == 1
    assert second.result == [2, first.result[1]]  # same worker process, new code


async def test_only_changed_modules_and_their_importers_are_evicted(pools, harness) -> None:
    await harness.module("shared/rates.py", "RATE = 1\n")
    await harness.module("modules/billing.py", "from shared.rates import RATE\ndef total(n):\n    return n * RATE\n")
    await harness.module("modules/unrelated.py", "TOKEN = object()\n")
    await harness.converge()
    the_pool = await pools.pool(min_workers=1, max_workers=1)
    code = (
        "import sys, modules.billing, modules.unrelated\n"
        "def run():\n"
        "    ids = [id(sys.modules['modules.unrelated']), id(sys.modules['modules.billing'])]\n"
        "    return [modules.billing.total(10), *ids]\n"
    )
    first = await pools.run(the_pool, code)
    await harness.module("shared/rates.py", "RATE = 5\n")  # billing bound RATE at import: it must be re-run too
    second = await pools.run(the_pool, code)
    assert first.result[0] == 10
    assert second.result[0] == 50
    assert second.result[1] == first.result[1]  # unchanged and independent: the same module object
    assert second.result[2] != first.result[2]  # an importer of the changed module: re-imported


async def test_an_unchanged_cache_costs_a_reused_worker_no_round_trip(pools, harness) -> None:
    for n in range(10):
        await harness.module(f"lib/m{n}.py", f"V = {n}\n")
    await harness.converge()
    the_pool = await pools.pool(min_workers=1, max_workers=1)
    code = "".join(f"import lib.m{n}\n" for n in range(10)) + "def run():\n    return lib.m9.V\n"
    await pools.run(the_pool, code)
    again = await pools.run(the_pool, code)
    assert again.result == 9
    assert again.timings_ms["prepare_ms"] < 1.0
    assert again.timings_ms["load_ms"] < 1.0


async def test_a_deleted_module_stops_being_importable(pools, harness) -> None:
    await harness.module("modules/legacy.py", "X = 1\n")
    await harness.converge()
    the_pool = await pools.pool(min_workers=1, max_workers=1)
    code = "def run():\n    import modules.legacy\n    return modules.legacy.X\n"
    assert (await pools.run(the_pool, code)).result == 1
    await harness.source.remove_module("modules/legacy.py")
    await harness.sync_engine.apply_paths(["modules/legacy.py"])
    gone = await pools.run(the_pool, code)
    assert gone.status == "FAILED"
    assert gone.error.startswith("ModuleNotFoundError: No module named 'modules.legacy'")


async def test_a_syntax_error_in_a_module_names_its_path(pools, harness) -> None:
    await harness.module("modules/broken.py", "def oops(:\n    pass\n")
    await harness.converge()
    the_pool = await pools.pool()
    outcome = await pools.run(the_pool, "import modules.broken\ndef run():\n    return 1\n")
    assert outcome.status == "FAILED"
    assert outcome.error.splitlines()[0] == "SyntaxError: invalid syntax (modules/broken.py, line 1)"
    fixed_code = "def oops():\n    return 'fixed'\n"
    await harness.module("modules/broken.py", fixed_code)
    fixed = await pools.run(the_pool, "import modules.broken\ndef run():\n    return modules.broken.oops()\n")
    assert fixed.result == "fixed"


async def test_tracebacks_show_workspace_source_lines(pools, harness) -> None:
    await harness.module("modules/fails.py", "def boom():\n    raise ValueError('bad input')\n")
    await harness.converge()
    the_pool = await pools.pool()
    outcome = await pools.run(the_pool, "from modules.fails import boom\ndef run():\n    boom()\n")
    lines = outcome.error.splitlines()
    assert lines[0] == "ValueError: bad input"
    assert '  File "modules/fails.py", line 2, in boom' in lines
    assert "    raise ValueError('bad input')" in lines


MID_RUN = """
import importlib, redis
import modules.a
def run(url, ready, go, lazy):
    client = redis.Redis.from_url(url)
    client.rpush(ready, 1)
    client.blpop([go], timeout=30)
    return [modules.a.V, importlib.import_module(lazy).V]
"""


async def test_one_execution_sees_one_generation(pools, harness, redis_client: aioredis.Redis) -> None:
    for name in "abc":
        await harness.module(f"modules/{name}.py", f"V = '{name}1'\n")
    await harness.converge()
    the_pool = await pools.pool(min_workers=1, max_workers=1)

    async def change_mid_run(lazy: str, *changes: tuple[str, str]) -> object:
        ready, go = (f"{harness.keyspace.prefix}test:{uuid.uuid4().hex}" for _ in range(2))
        params = {"url": harness.settings.required("redis_url"), "ready": ready, "go": go, "lazy": lazy}
        running = asyncio.create_task(pools.run(the_pool, MID_RUN, params))
        await redis_client.blpop([ready], timeout=30)  # the execution holds modules.a now
        for path, text in changes:
            await harness.module(path, text)
        await redis_client.rpush(go, 1)
        return await running

    only_b = await change_mid_run("modules.b", ("modules/b.py", "V = 'b2'\n"))
    assert only_b.result == ["a1", "b2"]  # what it held was still current: one consistent view
    both = await change_mid_run("modules.c", ("modules/a.py", "V = 'a2'\n"), ("modules/c.py", "V = 'c2'\n"))
    assert both.status == "FAILED"
    assert both.error.splitlines()[0] == (
        "ImportError: modules/c.py: the workspace changed during this execution (modules/a.py); run it again"
    )
    code = "import modules.a, modules.c\ndef run():\n    return [modules.a.V, modules.c.V]\n"
    assert (await pools.run(the_pool, code)).result == ["a2", "c2"]
