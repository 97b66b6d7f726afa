"""Local servers: embedded PostgreSQL and Redis from wheels, a private RabbitMQ node, and the test-service resolver.

Each test starts real servers on free ports under its own temp dir, talks to them, and checks they are gone after
``stop`` (only the processes these tests started are stopped).
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import aio_pika
import asyncpg
import psutil
import pytest
import redis.asyncio as aioredis

from modcache import embedded


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


async def test_embedded_postgres_listens_on_tcp_and_delivers_notify(tmp_path: Path) -> None:
    server = await asyncio.to_thread(embedded.start_postgres, tmp_path / "pg" / "data")
    try:
        if os.geteuid() == 0:  # PostgreSQL refuses root: it must run as the unprivileged account
            assert psutil.Process(server.process.pid).uids().effective != 0
        listener = await asyncpg.connect(server.url)
        got: asyncio.Queue[str] = asyncio.Queue()
        await listener.add_listener("ch", lambda *args: got.put_nowait(args[3]))
        sender = await asyncpg.connect(server.url)
        await sender.execute("NOTIFY ch, 'hello'")
        assert await asyncio.wait_for(got.get(), 5) == "hello"
        assert str(await sender.fetchval("SHOW server_version")).startswith("18")
        await sender.close()
        await listener.close()
    finally:
        await asyncio.to_thread(server.stop)
    assert not server.running()
    assert not embedded.reachable(server.url)


async def test_embedded_postgres_keeps_its_data_across_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "state" / "postgres" / "data"
    first = await asyncio.to_thread(embedded.start_postgres, data_dir)
    try:
        conn = await asyncpg.connect(first.url)
        await conn.execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (42)")
        await conn.close()
    finally:
        await asyncio.to_thread(first.stop)
    second = await asyncio.to_thread(embedded.start_postgres, data_dir)
    try:
        conn = await asyncpg.connect(second.url)
        assert await conn.fetchval("SELECT n FROM kept") == 42
        await conn.close()
    finally:
        await asyncio.to_thread(second.stop)


async def test_embedded_redis_serves_and_allows_keyspace_events(tmp_path: Path) -> None:
    server = await asyncio.to_thread(embedded.start_redis, tmp_path / "redis")
    try:
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        await client.config_set("notify-keyspace-events", "Kgx")
        assert "g" in (await client.config_get("notify-keyspace-events"))["notify-keyspace-events"]
        await client.set("k", "v")
        assert await client.get("k") == "v"
        await client.aclose()
    finally:
        await asyncio.to_thread(server.stop)
    assert not server.running()
    assert not embedded.reachable(server.url)


def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(embedded.ServerError, match=r"embedded Redis exited during startup: .*(in use|bind)"):
            embedded.start_redis(tmp_path / "redis", port=port)


def test_missing_rabbitmq_names_the_package_to_install(tmp_path: Path) -> None:
    with pytest.raises(embedded.ServerError) as caught:
        embedded.start_rabbitmq(tmp_path / "amqp", script=tmp_path / "no-such-rabbitmq-server")
    assert "apt-get install rabbitmq-server" in str(caught.value)
    assert "MODCACHE_TEST_AMQP_URL" in str(caught.value)


@pytest.mark.skipif(embedded.rabbitmq_script() is None, reason="rabbitmq-server (OS package) not installed")
async def test_private_rabbitmq_node_routes_messages(tmp_path: Path) -> None:
    server = await asyncio.to_thread(embedded.start_rabbitmq, tmp_path / "amqp")
    try:
        connection = await aio_pika.connect(server.url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue("probe", auto_delete=True)
            await channel.default_exchange.publish(aio_pika.Message(b"ping"), routing_key="probe")
            message = await queue.get(timeout=5)
            assert message is not None
            assert message.body == b"ping"
            await message.ack()
    finally:
        await asyncio.to_thread(server.stop)
    assert not server.running()
    assert not embedded.reachable(server.url)


def test_services_start_only_what_is_down_and_asked_for(tmp_path: Path, services: embedded.Services) -> None:
    down = f"postgresql://postgres@127.0.0.1:{embedded.free_port()}/postgres"
    environ = {"MODCACHE_TEST_POSTGRES_URL": down, "MODCACHE_TEST_REDIS_URL": services["redis"]}
    with embedded.test_services(tmp_path, environ=environ) as urls:
        started = urls["postgres"]
        assert started != down
        assert embedded.reachable(started)
        assert urls["redis"] == services["redis"]  # configured and answering: used as is
        assert not (tmp_path / "redis").exists()
        assert not (tmp_path / "amqp").exists()  # never asked for: never started
    assert not embedded.reachable(started)


def test_embedded_servers_for_the_demo_live_under_the_state_dir(tmp_path: Path) -> None:
    with embedded.embedded_servers(tmp_path) as urls:
        assert set(urls) == {"postgres", "redis"}
        assert all(embedded.reachable(url) for url in urls.values())
        assert (tmp_path / "postgres" / "data" / "PG_VERSION").exists()
    assert not any(embedded.reachable(url) for url in urls.values())
    assert port_of(urls["postgres"]) != port_of(urls["redis"])


@pytest.mark.skipif(os.geteuid() != 0, reason="only root must hand PostgreSQL to another account")
def test_a_missing_run_as_account_is_named(tmp_path: Path) -> None:
    with pytest.raises(embedded.ServerError, match="account 'no-such-account-xyz' to run it as does not exist"):
        embedded.start_postgres(tmp_path / "pg" / "data", user="no-such-account-xyz")
