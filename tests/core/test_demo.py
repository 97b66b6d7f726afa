"""``modcache demo`` end to end, as a real process: on the shared services (URLs set) and on embedded servers.

The demo must show the partial expiry (content key gone, index entry kept) and its live repair, then a commit
reaching the cache, and leave nothing running behind it.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
from pathlib import Path

import redis.asyncio as aioredis

from modcache import embedded, keys, modules
from modcache.cli import demo
from testkit import cli

EXAMPLE_PATHS = {"modules/billing.py", "shared/halopsa/__init__.py", "shared/halopsa/tickets.py"}


async def run_demo(env: dict[str, str], *args: str, timeout_s: float = 90) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        cli.console_script(),
        "demo",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=cli.clean_environ(env),
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    return await process.wait(), out.decode()


def assert_repair_shown(output: str) -> None:
    before = re.search(r"before: content key ABSENT .*index lists it: True; SCARD index = 3", output)
    after = re.search(r"after : content key present; index lists it: True; SCARD index = 3", output)
    assert before, output
    assert after, output
    assert before.start() < after.start()
    assert re.search(r"repaired \d+\.\d ms after the DEL \(trigger: keyspace\)", output), output
    assert re.search(r"cache updated \d+\.\d ms after the commit \(trigger: notify\)", output), output
    assert "demo done" in output


def service_urls(output: str) -> list[str]:
    line = next(line for line in output.splitlines() if line.startswith("PostgreSQL "))
    return re.findall(r"(?:postgresql|redis)://\S+?(?=,|$)", line)


async def test_demo_on_the_configured_services(
    database_url: str, redis_url: str, keyspace: keys.KeySpace, redis_client: aioredis.Redis
) -> None:
    code, output = await run_demo(cli.service_env(database_url, redis_url, keyspace), "--exit-after-demo")

    assert code == 0, output
    assert "starting embedded" not in output
    assert_repair_shown(output)
    assert await redis_client.smembers(keyspace.index) == EXAMPLE_PATHS
    billing = modules.decode_cached(await redis_client.get(keyspace.content("modules/billing.py")))
    assert billing["hash"] == modules.content_hash(demo.EDITED_CONTENT)


async def test_demo_on_embedded_servers_then_again_until_ctrl_c(tmp_path: Path) -> None:
    env = {"MODCACHE_STATE_DIR": str(tmp_path / "state")}
    code, output = await run_demo(env, "--exit-after-demo")

    assert code == 0, output
    assert f"starting embedded PostgreSQL and Redis under {tmp_path / 'state'}" in output
    assert_repair_shown(output)
    assert output.rstrip().endswith("embedded servers stopped")
    urls = service_urls(output)
    assert len(urls) == 2
    assert not any(embedded.reachable(url) for url in urls)
    assert (tmp_path / "state" / "postgres" / "data" / "PG_VERSION").exists()

    # Interactive: reuses the state dir, keeps watching until Ctrl-C, then stops what it started.
    process = await asyncio.create_subprocess_exec(
        cli.console_script(),
        "demo",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=cli.clean_environ(env),
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(60):
            while not lines or not lines[-1].startswith("watching; press Ctrl-C"):
                line = (await process.stdout.readline()).decode()
                assert line, "".join(lines)
                lines.append(line)
        process.send_signal(signal.SIGINT)
        rest = (await asyncio.wait_for(process.stdout.read(), 30)).decode()
        assert await process.wait() == 0, rest
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert rest.rstrip().endswith("embedded servers stopped")
    assert not any(embedded.reachable(url) for url in service_urls("".join(lines)))
