"""The consumer's commands as a user runs them: real processes, real services."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from pathlib import Path

import pytest

MODCACHE = str(Path(sys.executable).parent / "modcache")


@pytest.fixture
def env(harness) -> dict[str, str]:
    s = harness.settings
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("MODCACHE_")},
        "MODCACHE_DATABASE_URL": s.required("database_url"),
        "MODCACHE_REDIS_URL": s.required("redis_url"),
        "MODCACHE_AMQP_URL": s.required("amqp_url"),
        "MODCACHE_QUEUE_NAME": s.queue_name,
        "MODCACHE_KEY_PREFIX": s.key_prefix,
        "MODCACHE_CACHE_NAMESPACE": s.cache_namespace,
        "MODCACHE_HEALTH_HOST": "127.0.0.1",
        "MODCACHE_HEALTH_PORT": "0",
        "MODCACHE_CONSUMER_CONCURRENCY": "2",
    }


async def modcache(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        MODCACHE, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_put_list_and_run_workflows_through_a_consumer_process(env: dict[str, str], tmp_path: Path) -> None:
    source = tmp_path / "hello.py"
    source.write_text("def greet(name, times=1):\n    return ' '.join(['hello ' + name] * times)\n")
    code, out, _ = await modcache(env, "workflows", "put", "hello", str(source), "--function", "greet")
    assert code == 0
    workflow_id = uuid.UUID(out.strip())
    code, out, _ = await modcache(env, "workflows", "ls")
    assert out == f"{workflow_id}  hello  greet()  timeout 1800s\n"

    consumer = await asyncio.create_subprocess_exec(MODCACHE, "consumer", env=env, stderr=asyncio.subprocess.PIPE)
    try:
        assert consumer.stderr is not None
        banner = ""
        while not banner.startswith("modcache consumer:"):  # after any warnings it logs while starting
            banner = (await asyncio.wait_for(consumer.stderr.readline(), 60)).decode()
        assert banner.startswith(f"modcache consumer: consuming {env['MODCACHE_QUEUE_NAME']}, health on 127.0.0.1:")
        code, out, _ = await modcache(env, "run", "hello", "--param", "name=world", "--param", "times=2", "--wait")
        assert code == 0
        reply = json.loads(out)
        assert (reply["status"], reply["result"]) == ("SUCCESS", "hello world hello world")
        code, out, err = await modcache(env, "run", str(workflow_id), "--param", "nobody=1", "--wait")
        assert code == 1
        assert json.loads(out)["error"].startswith("TypeError: greet() got an unexpected keyword argument 'nobody'")
        assert err.strip().endswith("ended FAILED")
    finally:
        consumer.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(consumer.wait(), 60) == 0


async def test_run_without_wait_prints_the_execution_id(env: dict[str, str], harness) -> None:
    await harness.workflow("def run():\n    return 1\n", name="later")
    code, out, _ = await modcache(env, "run", "later")
    assert code == 0
    execution_id = uuid.UUID(out.strip())
    assert await harness.execution(execution_id) is None  # queued: nobody consumed it yet


@pytest.mark.parametrize(
    ("args", "extra_env", "message"),
    [
        (("consumer",), {"MODCACHE_CONSUMER_CONCURRENCY": "0"}, "bad setting MODCACHE_CONSUMER_CONCURRENCY"),
        (("run", "x", "--param", "novalue"), {}, "'novalue' is not KEY=VALUE"),
        (("run", "no-such-workflow"), {}, "'no-such-workflow': no active workflow with this name"),
    ],
)
async def test_bad_input_exits_2_naming_it(
    env: dict[str, str], args: tuple[str, ...], extra_env: dict[str, str], message: str
) -> None:
    code, _, err = await modcache({**env, **extra_env}, *args)
    assert code == 2
    assert message in err
