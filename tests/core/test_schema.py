"""The source schema and the NOTIFY trigger, against real PostgreSQL.

``db upgrade`` creates the Bifrost-shaped tables; the trigger sends the paths (never content) of every committed
module change, chunked under the payload limit for bulk statements; ``db install-trigger`` adds only the trigger
to an existing Bifrost database, idempotently.

To see exactly what one statement sent, each check commits a *marker* row afterwards and reads notifications
until the marker's path arrives: PostgreSQL delivers notifications in commit order, so everything before the
marker came from the statement (or from nothing).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from modcache import keys, modules
from testkit import cli

PAYLOAD_LIMIT_BYTES = 8000  # PostgreSQL's hard limit for a NOTIFY payload
BIFROST_DDL = """
CREATE TABLE workspace_files (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    path varchar(1000) NOT NULL UNIQUE,
    content text,
    content_hash varchar(64) NOT NULL,
    size_bytes integer,
    entity_type varchar(20),
    is_deleted boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ix_workspace_files_module ON workspace_files (path) WHERE entity_type = 'module' AND NOT is_deleted;
"""
INSERT = "INSERT INTO workspace_files (path, content, content_hash, entity_type) VALUES ($1, $2, $3, $4)"
SECRET_CONTENT = "API_KEY = 'content-must-never-be-in-a-payload'\n"


class Notifications:
    """A LISTEN connection plus a writer connection; ``after(sql)`` returns what that statement sent."""

    def __init__(self, listener: Any, writer: Any) -> None:
        self.listener = listener
        self.writer = writer
        self.payloads: asyncio.Queue[str] = asyncio.Queue()
        self._markers = 0

    def on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.payloads.put_nowait(payload)

    async def after(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        """Run ``sql`` (autocommit), then return the payloads it caused, parsed."""
        await self.writer.execute(sql, *args)
        return await self.until_marker()

    async def until_marker(self) -> list[dict[str, Any]]:
        self._markers += 1
        marker = f"zz-marker/{self._markers}.py"
        await self.writer.execute(INSERT, marker, "", modules.content_hash(b""), "module")
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while True:
                raw = await self.payloads.get()
                assert len(raw.encode()) <= PAYLOAD_LIMIT_BYTES
                assert SECRET_CONTENT.strip() not in raw
                data = json.loads(raw)
                if data == {"paths": [marker]}:
                    return seen
                seen.append(data)


def paths_of(payloads: list[dict[str, Any]]) -> set[str]:
    for payload in payloads:
        assert set(payload) == {"paths"}, payload  # paths only: never content, never anything else
        assert all(isinstance(p, str) for p in payload["paths"])
    return {path for payload in payloads for path in payload["paths"]}


@pytest.fixture
async def notes(database_url: str) -> AsyncIterator[Notifications]:
    listener = await asyncpg.connect(database_url)
    writer = await asyncpg.connect(database_url)
    result = Notifications(listener, writer)
    await listener.add_listener(keys.NOTIFY_CHANNEL, result.on_notify)
    yield result
    await writer.close()
    await listener.close()


@pytest.fixture
async def empty_database(services: Any) -> AsyncIterator[str]:
    """A database with nothing in it (no migrations), dropped afterwards."""
    admin = services["postgres"]
    name = f"modcache_empty_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        yield f"{admin.rpartition('/')[0]}/{name}"
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def module(notes: Notifications, path: str, content: str = "X = 1\n", entity_type: str = "module") -> None:
    await notes.after(INSERT, path, content, modules.content_hash(content.encode()), entity_type)


async def table_names(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {r["tablename"] for r in rows}


# -- migrations -------------------------------------------------------------------------------------------------


async def test_db_upgrade_creates_the_bifrost_shaped_tables_and_can_run_again(empty_database: str) -> None:
    for _ in range(2):
        result = await cli.invoke("db", "upgrade", env={"MODCACHE_DATABASE_URL": empty_database})
        assert result.code == 0, result.output
    assert await table_names(empty_database) == {
        "workspace_files",
        "workflows",
        "organizations",
        "configs",
        "executions",
        "modcache_alembic_version",
        "modcache_lineage_key",
    }
    conn = await asyncpg.connect(empty_database)
    try:
        triggers = await conn.fetch("SELECT tgname FROM pg_trigger WHERE tgrelid = 'workspace_files'::regclass")
    finally:
        await conn.close()
    assert {t["tgname"] for t in triggers} >= {"modcache_notify_insert", "modcache_notify_update"}
    await assert_one_private_key(empty_database)


async def assert_one_private_key(url: str) -> None:
    """The status record's seal key: one row of 64 hex digits (from two strong UUIDs), no privilege for PUBLIC."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT key FROM modcache_lineage_key")
        public = await conn.fetchval("SELECT has_table_privilege('public', 'modcache_lineage_key', 'SELECT')")
    finally:
        await conn.close()
    assert len(rows) == 1, rows
    assert len(rows[0]["key"]) == 64
    assert int(rows[0]["key"], 16) > 0
    assert public is False


# -- what the trigger sends -------------------------------------------------------------------------------------


async def test_insert_of_a_module_sends_its_path_and_other_entities_send_nothing(notes: Notifications) -> None:
    sent = await notes.after(INSERT, "shared/a.py", SECRET_CONTENT, "0" * 64, "module")
    assert paths_of(sent) == {"shared/a.py"}
    assert await notes.after(INSERT, "flows/f.py", SECRET_CONTENT, "0" * 64, "workflow") == []


async def test_content_update_sends_the_path_but_a_timestamp_touch_does_not(notes: Notifications) -> None:
    await module(notes, "m/a.py")
    changed = await notes.after(
        "UPDATE workspace_files SET content = $1, content_hash = $2 WHERE path = 'm/a.py'",
        SECRET_CONTENT,
        modules.content_hash(SECRET_CONTENT.encode()),
    )
    assert paths_of(changed) == {"m/a.py"}
    assert await notes.after("UPDATE workspace_files SET updated_at = now() WHERE path = 'm/a.py'") == []


async def test_soft_and_hard_delete_send_the_path(notes: Notifications) -> None:
    await module(notes, "m/soft.py")
    await module(notes, "m/hard.py")
    assert paths_of(await notes.after("UPDATE workspace_files SET is_deleted = true WHERE path = 'm/soft.py'")) == {
        "m/soft.py"
    }
    assert paths_of(await notes.after("DELETE FROM workspace_files WHERE path = 'm/hard.py'")) == {"m/hard.py"}


async def test_entity_type_change_sends_the_path_both_ways(notes: Notifications) -> None:
    await module(notes, "m/flow.py")
    to_workflow = "UPDATE workspace_files SET entity_type = 'workflow' WHERE path = 'm/flow.py'"
    back = "UPDATE workspace_files SET entity_type = 'module' WHERE path = 'm/flow.py'"
    assert paths_of(await notes.after(to_workflow)) == {"m/flow.py"}
    assert paths_of(await notes.after(back)) == {"m/flow.py"}
    assert (
        await notes.after("UPDATE workspace_files SET entity_type = 'form' WHERE entity_type = 'workflow'") == []
    )  # never a module: nothing to tell


async def test_rename_sends_the_old_and_the_new_path(notes: Notifications) -> None:
    await module(notes, "old/name.py")
    renamed = await notes.after("UPDATE workspace_files SET path = 'new/name.py' WHERE path = 'old/name.py'")
    assert paths_of(renamed) == {"old/name.py", "new/name.py"}


async def test_nothing_is_sent_before_commit_or_after_rollback(notes: Notifications, database_url: str) -> None:
    await module(notes, "m/tx.py")
    other = await asyncpg.connect(database_url)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("UPDATE workspace_files SET content = 'Y = 2' WHERE path = 'm/tx.py'")
        assert await notes.until_marker() == []  # uncommitted: not sent yet
        await tx.rollback()
        assert await notes.until_marker() == []  # rolled back: never sent
        async with other.transaction():
            await other.execute("UPDATE workspace_files SET content = 'Y = 3' WHERE path = 'm/tx.py'")
        assert paths_of(await notes.until_marker()) == {"m/tx.py"}
    finally:
        await other.close()


async def test_truncate_asks_for_a_full_resync(notes: Notifications) -> None:
    await module(notes, "m/a.py")
    await notes.writer.execute("TRUNCATE workspace_files")
    assert await notes.until_marker() == [{"resync": True}]


async def test_a_10000_row_update_is_sent_in_chunks_under_the_payload_limit(notes: Notifications) -> None:
    count = 10_000
    await notes.after(
        "INSERT INTO workspace_files (path, content, content_hash, entity_type) "
        "SELECT format('bulk/pkg_%s/module_%s.py', n % 50, n), 'X = 1', repeat('0', 64), 'module' "
        "FROM generate_series(1, $1) AS n",
        count,
    )
    sent = await notes.after("UPDATE workspace_files SET content = content || '#' WHERE path LIKE 'bulk/%'")
    assert paths_of(sent) == {f"bulk/pkg_{n % 50}/module_{n}.py" for n in range(1, count + 1)}
    assert 10 < len(sent) < 100  # chunked: a few dozen notifications, not one per row and not one too large


# -- an existing Bifrost database -------------------------------------------------------------------------------


async def test_install_trigger_on_a_bifrost_database_is_idempotent_and_enough_to_sync(
    empty_database: str, redis_url: str, keyspace: keys.KeySpace, redis_client: aioredis.Redis
) -> None:
    conn = await asyncpg.connect(empty_database)
    try:
        await conn.execute(BIFROST_DDL)
    finally:
        await conn.close()
    env = cli.service_env(empty_database, redis_url, keyspace)
    for _ in range(2):
        result = await cli.invoke("db", "install-trigger", env=env)
        assert result.code == 0, result.output
    assert await table_names(empty_database) == {"workspace_files", "modcache_lineage_key"}  # and the seal's key
    await assert_one_private_key(empty_database)

    listener = await asyncpg.connect(empty_database)
    writer = await asyncpg.connect(empty_database)
    try:
        notes = Notifications(listener, writer)
        await listener.add_listener(keys.NOTIFY_CHANNEL, notes.on_notify)
        sent = await notes.after(INSERT, "shared/bifrost.py", "B = 1\n", modules.content_hash(b"B = 1\n"), "module")
    finally:
        await writer.close()
        await listener.close()
    assert sent == [{"paths": ["shared/bifrost.py"]}]  # exactly once, though installed twice

    synced = await cli.invoke("sync", "--once", "--json", env=env)
    assert json.loads(synced.out)["applied"]["missing"] == 2  # the module and the test's marker row
    assert await redis_client.sismember(keyspace.index, "shared/bifrost.py")
