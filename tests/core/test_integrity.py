"""Issue 9's attacks, each as an attacker would make it: poisoned names, forged fences, keys of the wrong type,
forged values, overlapping prefixes. Every outcome is judged by ``testkit.convergence`` (rows and keys compared
directly), not by the engine's own plan."""

from __future__ import annotations

import json

import asyncpg
import pytest
import redis.asyncio as aioredis

from modcache import engine, keys, modules, pgsource, plan, rediscache
from modcache.plan import Reason as R
from testkit import cli, convergence

Env = dict[str, str]


@pytest.fixture
def env(database_url: str, redis_url: str, keyspace: keys.KeySpace) -> Env:
    return cli.service_env(database_url, redis_url, keyspace)


async def settled(sync_engine: engine.Engine, source: pgsource.PgSource, n: int = 5) -> list[str]:
    paths = [f"pkg/m{i}.py" for i in range(n)]
    for i, path in enumerate(paths):
        await source.put_module(path, f"N = {i}\n".encode())
    await sync_engine.full_resync()
    return paths


async def judge(database_url: str, client: aioredis.Redis, ks: keys.KeySpace, **kw: object) -> list[str]:
    return await convergence.differences(database_url, client, ks.prefix, **kw)  # type: ignore[arg-type]


# -- names that are not module paths -----------------------------------------------------------------------------


async def test_an_index_member_naming_the_generation_key_is_unlisted_and_the_key_kept(
    env: Env,
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    keyspace: keys.KeySpace,
    database_url: str,
) -> None:
    """Issue 9's first reproduction: ``SADD {prefix}index modcache:generation`` + ``sync --once`` deleted the
    generation key, and every later update was 'superseded'."""
    await settled(sync_engine, source)
    generation = await redis_client.get(keyspace.generation)
    await redis_client.sadd(keyspace.index, "modcache:generation", "index", "../../etc.py", "a//b.py")

    result = await cli.invoke("sync", "--once", "--json", env=env)

    assert result.code == 0, result.output
    report = json.loads(result.out)
    assert {i["name"] for i in report["invalid"]} == {"modcache:generation", "index", "../../etc.py", "a//b.py"}
    assert report["planned"]["invalid"] == 4
    assert int(await redis_client.get(keyspace.generation)) > int(generation)  # kept (bumped by the unlist)
    await source.put_module("pkg/m0.py", b"N = 'changed'\n")
    later = await sync_engine.apply_paths(["pkg/m0.py"])
    assert later.applied[R.STALE] == 1
    assert later.superseded == 0
    assert await judge(database_url, redis_client, keyspace) == []


async def test_manifest_fields_naming_other_keys_are_removed_without_touching_those_keys(
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    keyspace: keys.KeySpace,
    database_url: str,
) -> None:
    await settled(sync_engine, source)
    await redis_client.hset(keyspace.manifest, mapping={"index": "1:" + "a" * 64 + ":3", "modcache:status": "x"})
    report = await sync_engine.full_resync()
    assert sorted(i.path for i in report.plan.items if i.reason is R.INVALID) == ["index", "modcache:status"]
    assert await redis_client.type(keyspace.index) == "set"
    assert await judge(database_url, redis_client, keyspace) == []


async def test_change_hints_naming_bookkeeping_keys_are_rejected_not_acted_on(
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    keyspace: keys.KeySpace,
    database_url: str,
) -> None:
    """What ``pg_notify('modcache_modules', '{"paths":["index"]}')`` hands the engine (the watcher test below sends
    the NOTIFY itself)."""
    await settled(sync_engine, source)
    report = await sync_engine.apply_paths(["index", "modcache:generation", "modcache:status", "modcache:manifest"])
    assert not report.plan.items
    assert sorted(r.path for r in report.plan.rejected) == [
        "index",
        "modcache:generation",
        "modcache:manifest",
        "modcache:status",
    ]
    assert await judge(database_url, redis_client, keyspace) == []


# -- the fence ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("forged", ["99999999999999999", "999999999999999999999999", "0", "-5", "1e20", "12abc"])
async def test_a_forged_manifest_generation_never_blocks_an_update(
    forged: str,
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    keyspace: keys.KeySpace,
    database_url: str,
) -> None:
    paths = await settled(sync_engine, source)
    held = await redis_client.hget(keyspace.manifest, paths[0])
    await redis_client.hset(keyspace.manifest, paths[0], forged + held[held.index(":") :])
    await source.put_module(paths[0], b"N = 'new'\n")

    update = await sync_engine.apply_paths([paths[0]])

    assert update.superseded == 0
    assert update.repaired == 1
    assert await judge(database_url, redis_client, keyspace) == []


@pytest.mark.parametrize("forged", ["abc", "", "-1", "99999999999999999999", "1.5", "0"])
async def test_an_unbelievable_generation_is_reset_and_reported(
    forged: str,
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    keyspace: keys.KeySpace,
    database_url: str,
) -> None:
    await settled(sync_engine, source)
    await redis_client.set(keyspace.generation, forged)
    report = await sync_engine.full_resync()
    assert [r.role for r in report.plan.repairs] == ["generation"]
    await source.put_module("pkg/m1.py", b"N = 'after'\n")
    assert (await sync_engine.apply_paths(["pkg/m1.py"])).repaired == 1
    assert await judge(database_url, redis_client, keyspace) == []


async def test_a_generation_set_below_the_manifest_is_raised(
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    keyspace: keys.KeySpace,
    database_url: str,
) -> None:
    await settled(sync_engine, source)
    await redis_client.set(keyspace.generation, "5")
    report = await sync_engine.full_resync()
    assert any(r.problem == "lower than the manifest" for r in report.plan.repairs)
    assert await judge(database_url, redis_client, keyspace) == []


# -- keys of the wrong type ----------------------------------------------------------------------------------------


async def test_keys_of_the_wrong_type_never_fail_a_sync_and_are_repaired(
    env: Env,
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    keyspace: keys.KeySpace,
    database_url: str,
) -> None:
    paths = await settled(sync_engine, source, n=6)
    await redis_client.delete(keyspace.content(paths[0]), keyspace.content(paths[1]))
    await redis_client.hset(keyspace.content(paths[0]), "content", "evil")  # a HASH at a live content key
    await redis_client.rpush(keyspace.content(paths[1]), "evil")  # a LIST
    await redis_client.sadd(keyspace.content("gone/orphan.py"), "x")  # a SET at a non-live path
    await redis_client.sadd(keyspace.index, "gone/orphan.py")

    first = await cli.invoke("sync", "--once", "--json", env=env)

    assert first.code == 0, first.output
    assert json.loads(first.out)["applied"]["wrongtype"] == 2
    assert await judge(database_url, redis_client, keyspace) == []


@pytest.mark.parametrize("role", ["index", "manifest", "generation", "status"])
async def test_a_bookkeeping_key_of_the_wrong_type_is_rebuilt(
    role: str,
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    keyspace: keys.KeySpace,
    database_url: str,
) -> None:
    await settled(sync_engine, source)
    key = keyspace.bookkeeping()[role]
    await redis_client.delete(key)
    await redis_client.lpush(key, "evil")
    report = await sync_engine.full_resync()
    assert role in {r.role for r in report.plan.repairs}
    assert await redis_client.type(keyspace.status) == "hash"
    assert await judge(database_url, redis_client, keyspace) == []
    await source.put_module("pkg/m2.py", b"N = 'next'\n")
    assert (await sync_engine.apply_paths(["pkg/m2.py"])).repaired == 1


async def test_writes_survive_a_bookkeeping_key_turned_wrong_type_between_syncs(
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    keyspace: keys.KeySpace,
) -> None:
    await settled(sync_engine, source)
    await redis_client.delete(keyspace.index)
    await redis_client.set(keyspace.index, "not a set")
    await source.put_module("pkg/m3.py", b"N = 'x'\n")
    report = await sync_engine.apply_paths(["pkg/m3.py"])
    assert "index" in {r.role for r in report.plan.repairs}
    assert await redis_client.sismember(keyspace.index, "pkg/m3.py")


# -- whole values --------------------------------------------------------------------------------------------------


def forged_same_length(value: str) -> str:
    """Other code under the original ``hash`` field, same length: the routine check cannot see it."""
    data = json.loads(value)
    content = data["content"]
    evil = ("X" if content[0] != "X" else "Y") + content[1:]
    return json.dumps({"content": evil, "path": data["path"], "hash": data["hash"]})


def reordered(value: str) -> str:
    data = json.loads(value)
    return json.dumps({"hash": data["hash"], "path": data["path"], "content": data["content"]})


@pytest.mark.parametrize("forge", [forged_same_length, reordered])
async def test_a_forged_value_that_keeps_the_hash_is_found_by_the_deep_check(
    forge: object,
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    keyspace: keys.KeySpace,
    database_url: str,
) -> None:
    paths = await settled(sync_engine, source)
    key = keyspace.content(paths[2])
    await redis_client.set(key, forge(await redis_client.get(key)))  # type: ignore[operator]
    assert await judge(database_url, redis_client, keyspace) != []

    report = await sync_engine.full_resync(deep=True)

    assert [(i.reason, i.path) for i in report.plan.items] == [(R.CORRUPT, paths[2])]
    assert await judge(database_url, redis_client, keyspace) == []


async def test_a_forged_value_of_another_length_is_found_by_the_routine_check(
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    keyspace: keys.KeySpace,
    database_url: str,
) -> None:
    paths = await settled(sync_engine, source)
    key = keyspace.content(paths[1])
    value = json.loads(await redis_client.get(key))
    value["content"] += "import os; os.system('evil')\n"
    await redis_client.set(key, json.dumps(value))
    report = await sync_engine.full_resync()
    assert [(i.reason, i.path) for i in report.plan.items] == [(R.CORRUPT, paths[1])]
    assert await judge(database_url, redis_client, keyspace) == []


async def test_a_forged_value_with_a_matching_forged_manifest_entry_is_found_by_the_deep_check(
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    keyspace: keys.KeySpace,
    database_url: str,
) -> None:
    """An attacker who knows the manifest format and rewrites both keys consistently."""
    paths = await settled(sync_engine, source)
    key = keyspace.content(paths[0])
    value = json.loads(await redis_client.get(key))
    value["content"] = "import os  # evil\n"
    forged = json.dumps(value)
    await redis_client.set(key, forged)
    held = keys.parse_manifest(await redis_client.hget(keyspace.manifest, paths[0]))
    assert held is not None
    await redis_client.hset(keyspace.manifest, paths[0], keys.encode_manifest(held.generation, held.hash, len(forged)))
    assert not (await sync_engine.full_resync(dry_run=True)).plan  # the routine check trusts the manifest

    report = await sync_engine.full_resync(deep=True)

    assert [(i.reason, i.path) for i in report.plan.items] == [(R.CORRUPT, paths[0])]
    assert await judge(database_url, redis_client, keyspace) == []


async def test_an_incremental_update_compares_whole_values(
    source: pgsource.PgSource,
    sync_engine: engine.Engine,
    redis_client: aioredis.Redis,
    keyspace: keys.KeySpace,
    database_url: str,
) -> None:
    """What a keyspace event leads to: the path is converged by whole value, not by length."""
    paths = await settled(sync_engine, source)
    key = keyspace.content(paths[3])
    await redis_client.set(key, forged_same_length(await redis_client.get(key)))
    report = await sync_engine.apply_paths([paths[3]])
    assert [(i.reason, i.path) for i in report.plan.items] == [(R.CORRUPT, paths[3])]
    assert await judge(database_url, redis_client, keyspace) == []


# -- overlapping prefixes ------------------------------------------------------------------------------------------


def test_prefixes_overlap_when_one_is_a_prefix_of_the_other() -> None:
    assert keys.prefixes_overlap("sec:module:", "sec:module:t2/")
    assert keys.prefixes_overlap("sec:module:t2/", "sec:module:")
    assert keys.prefixes_overlap("a:", "a:")
    assert not keys.prefixes_overlap("sec:module:", "sec:modules:")
    assert not keys.prefixes_overlap("a:", "b:")


async def test_a_deep_sync_never_touches_the_keys_of_a_longer_configured_prefix(
    source: pgsource.PgSource,
    redis_client: aioredis.Redis,
    keyspace: keys.KeySpace,
    database_url: str,
    redis_url: str,
) -> None:
    outer = keys.KeySpace(keyspace.prefix, excluded=(keyspace.prefix + "t2/",))
    inner = keys.KeySpace(keyspace.prefix + "t2/")
    other = rediscache.RedisCache.from_url(redis_url, keyspace=inner)
    mine = rediscache.RedisCache.from_url(redis_url, keyspace=outer)
    try:
        await source.put_module("m.py", b"M = 1\n")
        await source.put_module("t2/collides.py", b"C = 1\n")  # would land on the inner cache's key
        await engine.Engine(source=source, cache=other).full_resync()
        inner_keys = {k: await redis_client.dump(k) async for k in redis_client.scan_iter(match=inner.prefix + "*")}
        assert inner.content("m.py") in inner_keys

        report = await engine.Engine(source=source, cache=mine).full_resync(deep=True)

        assert [r.path for r in report.plan.rejected] == ["t2/collides.py"]
        after = {k: await redis_client.dump(k) async for k in redis_client.scan_iter(match=inner.prefix + "*")}
        assert after == inner_keys
        assert await redis_client.get(outer.content("m.py")) is not None
    finally:
        await other.close()
        await mine.close()


# -- status and sync agree -----------------------------------------------------------------------------------------


async def test_status_and_sync_agree_on_a_row_with_a_bad_hash(env: Env, database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO workspace_files (path, content, content_hash, entity_type) "
            "VALUES ('lying.py', 'X', $1, 'module')",
            "0" * 64,
        )
    finally:
        await conn.close()
    status = json.loads((await cli.invoke("status", "--json", env=env)).out)
    synced = json.loads((await cli.invoke("sync", "--once", "--json", env=env)).out)
    assert status["report"]["planned"] == synced["planned"]
    assert [r["path"] for r in status["report"]["rejected"]] == [r["path"] for r in synced["rejected"]] == ["lying.py"]


def test_the_plan_says_why_for_every_corruption() -> None:
    view = plan.CacheView(
        index=frozenset({"a.py", "b.py"}),
        manifest={"a.py": "h"},
        content={"a.py": plan.UNVERIFIED, "b.py": plan.UNVERIFIED},
        damage={"a.py": R.CORRUPT, "b.py": R.WRONGTYPE},
        invalid={"modcache:generation": "does not end in '.py'"},
    )
    the_plan = plan.compute(plan.SourceView(live={"a.py": "h", "b.py": "g"}), view)
    assert [str(i) for i in the_plan.items] == [
        "put     corrupt a.py",
        "put     wrongtype b.py",
        "unlist  invalid 'modcache:generation' (does not end in '.py')",
    ]
    assert modules.path_problem("modcache:generation") == "does not end in '.py'"


def test_a_manifest_page_is_believed_only_when_every_value_is_one_modcache_writes() -> None:
    """``keys.manifest_columns`` judges a whole page at once by the rule ``parse_manifest`` applies to each value:
    one value that is not exactly what ``encode_manifest`` writes makes it judge the page value by value."""
    digest = "ab" * 32
    good = [keys.encode_manifest(1_700_000_000_000_000 + i, digest, 4096 + i) for i in range(5)]
    assert keys.manifest_columns(good, limit=1 << 62) == (
        [digest] * 5,
        [4096 + i for i in range(5)],
        1_700_000_000_000_004,
    )
    assert keys.manifest_columns(good, limit=1_700_000_000_000_003) is None  # a generation above the limit
    bad = [
        "",
        ":",
        "::",
        f"0:{digest}:1",  # leading zeros, zero
        f"01:{digest}:1",
        f"1:{digest}:0",
        f"1:{digest}:01",
        f"1:{digest.upper()}:1",  # uppercase hex
        f"1:{digest[:-1]}:12",  # 63 hex digits
        f"1:{digest}0:1",  # 65
        f"1:{digest}:1:",  # a third colon
        f"1:{digest}:1:{digest}",
        f"1{digest}:1",  # one colon
        f"1:{digest}:12345678901",  # 11 digits
        f"1234567890123456789:{digest}:1",  # 19 digits
        f"1:{digest}:1\n",
        f" 1:{digest}:1",
        f"+1:{digest}:1",
        f"1_0:{digest}:1",
        f"\u0663:{digest}:1",  # a non-ASCII digit
        f"1:{digest[:-1]}\u00e9:1",
        f"1:{digest}:\udcff",
    ]
    for value in bad:
        assert keys.parse_manifest(value) is None, value
        for at in (0, 2, 4):
            page = [*good[:at], value, *good[at + 1 :]]
            assert keys.manifest_columns(page, limit=1 << 62) is None, (value, at)
    # two malformed values whose colons would line up if only the page's colons were counted
    shifted = [f"1:{digest}:5:1:{digest}", "1", *good[2:]]
    assert keys.manifest_columns(shifted, limit=1 << 62) is None
