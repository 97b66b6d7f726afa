"""Executions import workspace modules from the Redis cache through the consumer: Bifrost's layout, packages and
namespace packages, repair of missing modules with no operator running, content verified by hash, and the
template's memory of unchanged modules that never serves stale code (bifrost-contract.md, defects 1 and 7)."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from modcache import modules
from modcache_consumer import executor, protocol, runtime


async def test_modules_packages_and_namespace_packages_import(executors, harness) -> None:
    await harness.module("shared/halopsa/__init__.py", "from . import tickets\nNAME = 'halo'\n")
    await harness.module("shared/halopsa/tickets.py", "def count():\n    return 3\n")
    await harness.module("vendors/acme/client.py", "URL = 'https://acme.test'\n")  # no __init__.py anywhere
    await harness.converge()
    the_executor = await executors.start()
    code = (
        "import shared.halopsa, vendors.acme.client\n"
        "from shared.halopsa.tickets import count\n"
        "def run():\n"
        "    return [shared.halopsa.NAME, count(), vendors.acme.client.URL, vendors.acme.client.__file__,\n"
        "            list(vendors.__path__), shared.halopsa.__file__]\n"
    )
    outcome = await executors.run(the_executor, code)
    assert outcome.result == [
        "halo",
        3,
        "https://acme.test",
        "vendors/acme/client.py",
        [],
        "shared/halopsa/__init__.py",
    ], outcome.error


async def test_a_workspace_module_never_shadows_the_standard_library(executors, harness) -> None:
    await harness.module("json.py", "def dumps(value):\n    return 'hijacked'\n")
    await harness.converge()
    the_executor = await executors.start()
    outcome = await executors.run(the_executor, "import json\ndef run():\n    return json.dumps([1])\n")
    assert outcome.result == "[1]"


async def test_partial_expiry_with_no_operator_still_imports(executors, harness, redis_client: aioredis.Redis) -> None:
    """Defect 1: the index survives, the content key expired; the old check (SCARD index) saw nothing wrong."""
    await harness.module("modules/billing.py", "RATE = 3\n")
    await harness.module("modules/other.py", "X = 1\n")
    await harness.converge()
    billing_key = harness.keyspace.content("modules/billing.py")
    await redis_client.delete(billing_key)
    assert await redis_client.scard(harness.keyspace.index) == 2
    the_executor = await executors.start()
    outcome = await executors.run(the_executor, "from modules.billing import RATE\ndef run():\n    return RATE\n")
    assert (outcome.status, outcome.result) == ("SUCCESS", 3), outcome.error
    assert modules.decode_cached(await redis_client.get(billing_key))["content"] == "RATE = 3\n"  # repaired


async def test_a_module_the_cache_never_saw_is_fetched_on_first_import(executors, harness) -> None:
    await harness.converge()
    await harness.module("modules/brand_new.py", "VALUE = 'fresh'\n", sync=False)  # no operator wrote it
    the_executor = await executors.start()
    outcome = await executors.run(the_executor, "from modules.brand_new import VALUE\ndef run():\n    return VALUE\n")
    assert outcome.result == "fresh", outcome.error


async def test_twenty_executions_missing_the_same_module_repair_it_once(executors, harness, redis_client) -> None:
    await harness.module("modules/shared.py", "N = 7\n")
    await harness.converge()
    await redis_client.delete(harness.keyspace.content("modules/shared.py"))
    before = int(await redis_client.get(harness.keyspace.generation))
    the_executor = await executors.start()
    code = "from modules.shared import N\ndef run():\n    return N\n"
    outcomes = await asyncio.gather(*(executors.run(the_executor, code) for _ in range(20)))
    assert [o.result for o in outcomes] == [7] * 20
    assert int(await redis_client.get(harness.keyspace.generation)) == before + 1  # one write, not twenty


SHOW_RATE = "import modules.billing\ndef run():\n    return modules.billing.RATE\n"


async def test_a_changed_module_is_seen_by_the_next_execution(executors, harness) -> None:
    """Defect 7: a reused worker kept the old module object in sys.modules; the template remembers modules too."""
    await harness.module("modules/billing.py", "RATE = 1\n")
    await harness.converge()
    the_executor = await executors.start()
    first = await executors.run(the_executor, SHOW_RATE)
    remembered = await executors.run(the_executor, SHOW_RATE)  # from the template's memory now
    await harness.module("modules/billing.py", "RATE = 2\n")
    second = await executors.run(the_executor, SHOW_RATE)
    assert [first.result, remembered.result, second.result] == [1, 1, 2]


async def test_only_a_changed_module_is_read_again(executors, harness) -> None:
    await harness.module("shared/rates.py", "RATE = 1\n")
    await harness.module("modules/billing.py", "from shared.rates import RATE\ndef total(n):\n    return n * RATE\n")
    await harness.converge()
    the_executor = await executors.start()
    code = "import modules.billing\ndef run():\n    return modules.billing.total(10)\n"
    first = await executors.run(the_executor, code)
    await harness.module("shared/rates.py", "RATE = 5\n")  # billing bound RATE at import: it sees the new one
    second = await executors.run(the_executor, code)
    assert [first.result, second.result] == [10, 50]


async def test_unchanged_modules_cost_a_fresh_execution_no_round_trip(executors, harness) -> None:
    for n in range(10):
        await harness.module(f"lib/m{n}.py", f"V = {n}\n")
    await harness.converge()
    the_executor = await executors.start()
    code = "".join(f"import lib.m{n}\n" for n in range(10)) + "def run():\n    return lib.m9.V\n"
    await executors.run(the_executor, code)
    before = executors.modules.round_trips
    again = await executors.run(the_executor, code)
    assert again.result == 9
    assert executors.modules.round_trips == before  # every lookup was answered by the template's memory


async def test_content_that_does_not_match_its_hash_is_never_imported(executors, harness, redis_client) -> None:
    await harness.module("modules/billing.py", "RATE = 3\n")
    await harness.converge()
    key = harness.keyspace.content("modules/billing.py")
    cached = modules.decode_cached(await redis_client.get(key))
    forged = modules.encode_cached("modules/billing.py", "RATE = 666\n", cached["hash"])  # another Redis writer
    await redis_client.set(key, forged)
    the_executor = await executors.start()
    outcome = await executors.run(the_executor, "from modules.billing import RATE\ndef run():\n    return RATE\n")
    assert (outcome.status, outcome.result) == ("SUCCESS", 3), outcome.error  # treated as missing: repaired
    assert modules.decode_cached(await redis_client.get(key))["content"] == "RATE = 3\n"


async def test_forged_content_that_carries_its_own_right_hash_is_never_imported(
    executors, harness, redis_client
) -> None:
    """The hash check compared a value with the ``hash`` field of the same value: a co-tenant who recomputes it
    (attack-9d F8) passed, and an execution ran their code for as long as the watcher took to repair it. Content is
    run only when modcache's manifest, written in the same script as the value, names its hash."""
    await harness.module("modules/billing.py", "RATE = 3\n")
    await harness.converge()
    key = harness.keyspace.content("modules/billing.py")
    evil = "RATE = 666\n"
    await redis_client.set(key, modules.encode_cached("modules/billing.py", evil, modules.content_hash(evil.encode())))
    the_executor = await executors.start()
    outcome = await executors.run(the_executor, "from modules.billing import RATE\ndef run():\n    return RATE\n")
    assert (outcome.status, outcome.result) == ("SUCCESS", 3), outcome.error  # treated as missing: repaired
    assert modules.decode_cached(await redis_client.get(key))["content"] == "RATE = 3\n"


async def test_a_deleted_module_stops_being_importable(executors, harness) -> None:
    await harness.module("modules/legacy.py", "X = 1\n")
    await harness.converge()
    the_executor = await executors.start()
    code = "def run():\n    import modules.legacy\n    return modules.legacy.X\n"
    assert (await executors.run(the_executor, code)).result == 1
    await harness.source.remove_module("modules/legacy.py")
    await harness.sync_engine.apply_paths(["modules/legacy.py"])
    gone = await executors.run(the_executor, code)
    assert gone.status == "FAILED"
    assert gone.error.startswith("ModuleNotFoundError: No module named 'modules'")  # its directory went too


async def test_a_syntax_error_in_a_module_names_its_path(executors, harness) -> None:
    await harness.module("modules/broken.py", "def oops(:\n    pass\n")
    await harness.converge()
    the_executor = await executors.start()
    outcome = await executors.run(the_executor, "import modules.broken\ndef run():\n    return 1\n")
    assert outcome.status == "FAILED"
    assert outcome.error.splitlines()[0] == "SyntaxError: invalid syntax (modules/broken.py, line 1)"
    fixed_code = "def oops():\n    return 'fixed'\n"
    await harness.module("modules/broken.py", fixed_code)
    fixed = await executors.run(the_executor, "import modules.broken\ndef run():\n    return modules.broken.oops()\n")
    assert fixed.result == "fixed"


async def test_tracebacks_show_workspace_source_lines(executors, harness) -> None:
    await harness.module("modules/fails.py", "def boom():\n    raise ValueError('bad input')\n")
    await harness.converge()
    the_executor = await executors.start()
    outcome = await executors.run(the_executor, "from modules.fails import boom\ndef run():\n    boom()\n")
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


async def test_one_execution_sees_one_generation(executors, harness, redis_client: aioredis.Redis) -> None:
    for name in "abc":
        await harness.module(f"modules/{name}.py", f"V = '{name}1'\n")
    await harness.converge()
    the_executor = await executors.start(policy=executor.Policy(network="host"))  # it syncs with the test on Redis

    async def change_mid_run(lazy: str, *changes: tuple[str, str]) -> object:
        ready, go = (f"{harness.keyspace.prefix}test:{uuid.uuid4().hex}" for _ in range(2))
        params = {"url": harness.settings.required("redis_url"), "ready": ready, "go": go, "lazy": lazy}
        running = asyncio.create_task(executors.run(the_executor, MID_RUN, params))
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
    assert (await executors.run(the_executor, code)).result == ["a2", "c2"]


# -- what the template compiles and keeps (attack-8c C1) --------------------------------------------------------


def _lesson(generation: int, *modules_: tuple[str, str]) -> protocol.Learned:
    lookups: list[list[Any]] = []
    for path, text in modules_:
        raw = {"path": path, "content": text, "hash": hashlib.sha256(text.encode()).hexdigest(),
               "manifest_generation": generation, "manifest_hash": None, "indexed": True}  # fmt: skip
        lookups.append([[path], [raw]])
    return {"op": "learn", "generation": generation, "lookups": lookups}


def _module(n: int, size: int) -> str:
    text = f"N = {n}\n"
    return text + "#" * (size - len(text) - 1) + "\n"


def test_the_templates_memory_compiles_and_keeps_code_by_bytes() -> None:
    """A module above MAX_TAUGHT_MODULE_BYTES is neither remembered nor compiled (its importer asks the channel);
    one lesson compiles at most MAX_LESSON_SOURCE_BYTES; the compiled code kept across generations stays under
    MAX_CODE_CACHE_SOURCE_BYTES, the least recently used out first."""
    memory = runtime.Memory()
    small = ("small.py", "N = 1\n")
    memory.learn(_lesson(1, ("big.py", _module(0, protocol.MAX_TAUGHT_MODULE_BYTES + 1)), small))
    assert [path for path, _ in memory.code] == ["small.py"]
    assert list(memory.lookups) == [("small.py",)]
    size = protocol.MAX_TAUGHT_MODULE_BYTES
    per_lesson = protocol.MAX_LESSON_SOURCE_BYTES // size
    memory.learn(_lesson(2, *((f"m{i}.py", _module(i, size)) for i in range(per_lesson + 3))))
    assert len(memory.lookups) == len(memory.code) - 1 == per_lesson
    generations = range(3, 3 + 2 * protocol.MAX_CODE_CACHE_SOURCE_BYTES // protocol.MAX_LESSON_SOURCE_BYTES)
    for generation in generations:
        memory.learn(_lesson(generation, small, *((f"g{generation}m{i}.py", _module(i, size)) for i in range(3))))
        assert memory.code_bytes <= protocol.MAX_CODE_CACHE_SOURCE_BYTES
    kept = {path for path, _ in memory.code}
    assert "small.py" in kept  # taught again every generation: recently used, kept
    assert not any(path.startswith("m") for path in kept)  # generation 2's, least recently used: evicted
    assert f"g{generations[-1]}m2.py" in kept


async def test_a_repair_the_source_cannot_answer_fails_the_import_instead_of_hanging_the_execution(
    executors, harness, monkeypatch
) -> None:
    """The source stops answering under a hot-path repair (attack-10b N8: after a terminated backend, the repair
    never returned and its execution hung, RUNNING, its lease renewed, until the 30 min timeout). Here someone
    holds an exclusive lock on the source table: the repair gives up, the import fails, the execution ends."""
    from modcache_consumer import readiness

    monkeypatch.setattr(readiness, "REPAIR_TIMEOUT_S", 2.0)
    await harness.converge()
    await harness.module("modules/late.py", "VALUE = 1\n", sync=False)  # in the source only: a repair is needed
    the_executor = await executors.start()
    locker = await asyncpg.connect(harness.database_url)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE workspace_files IN ACCESS EXCLUSIVE MODE")
            async with asyncio.timeout(20):  # the execution's own timeout is 30 s
                outcome = await executors.run(
                    the_executor, "from modules.late import VALUE\ndef run():\n    return VALUE\n", timeout_s=30
                )
    finally:
        await locker.close()
    assert outcome.status.value == "FAILED", outcome
    assert "modules.late" in (outcome.error or "") or "unavailable" in (outcome.error or ""), outcome.error
