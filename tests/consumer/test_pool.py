"""The worker pool with real processes: timeouts, crashes, memory limit, recycling without losing a result
(bifrost-contract.md, defect 8), bounds, and an environment without database credentials."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

import psutil
import pytest

from modcache_consumer import pool


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll a condition another process or a background task makes true."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def gone(pid: int, timeout_s: float = 10.0) -> bool:
    """Poll (another process's lifetime) until ``pid`` is gone or a zombie."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        await asyncio.sleep(0.02)
    return False


SLEEPER = """
import subprocess, time
def run(ignore_term=False):
    if ignore_term:
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "60"])
    print(f"child {child.pid}", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("ignore_term", [False, True])
async def test_timeout_stops_the_worker_and_what_it_started(
    pools, caplog: pytest.LogCaptureFixture, ignore_term: bool
) -> None:
    caplog.set_level(logging.INFO, logger="modcache_consumer.pool")
    the_pool = await pools.pool(terminate_grace_s=0.3)
    outcome = await pools.run(the_pool, SLEEPER, {"ignore_term": ignore_term}, timeout_s=1.0)
    assert outcome.status == "TIMEOUT"
    assert outcome.error == f"the execution exceeded its 1 s timeout; worker {outcome.pid} was stopped"
    child = int(next(r.message.rsplit(" ", 1)[1] for r in caplog.records if ": child " in r.message))
    assert await gone(outcome.pid)
    assert await gone(child)  # the worker's whole process group was signalled
    after = await pools.run(the_pool, "def run():\n    return 'next'\n")
    assert (after.status, after.result) == ("SUCCESS", "next")
    assert after.pid != outcome.pid


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("import os\ndef run():\n    os._exit(3)\n", "exited with code 3"),
        ("import os, signal\ndef run():\n    os.kill(os.getpid(), signal.SIGKILL)\n", "was killed by SIGKILL"),
    ],
)
async def test_a_worker_crash_fails_the_execution_with_the_reason(pools, code: str, reason: str) -> None:
    the_pool = await pools.pool()
    outcome = await pools.run(the_pool, code)
    assert outcome.status == "FAILED"
    assert outcome.error.startswith(f"worker process {outcome.pid} {reason}")
    after = await pools.run(the_pool, "def run():\n    return 1\n")
    assert after.status == "SUCCESS"


async def test_the_memory_limit_fails_the_execution_and_recycles_the_worker(pools) -> None:
    the_pool = await pools.pool(memory_limit_bytes=256 * 1024**2)
    outcome = await pools.run(the_pool, "def run():\n    return len(bytearray(1024 ** 3))\n")
    assert outcome.status == "FAILED"
    assert outcome.error.startswith("MemoryError")
    assert await gone(outcome.pid)
    small = await pools.run(the_pool, "def run():\n    return len(bytearray(10 * 1024 ** 2))\n")
    assert (small.status, small.result) == ("SUCCESS", 10 * 1024**2)


async def test_recycling_workers_never_drops_a_result(pools) -> None:
    the_pool = await pools.pool(max_workers=2, max_executions=1)
    code = "import os, time\ndef run(n):\n    time.sleep(0.01)\n    return [n, os.getpid()]\n"
    outcomes = await asyncio.gather(*(pools.run(the_pool, code, {"n": n}) for n in range(10)))
    assert [o.status for o in outcomes] == ["SUCCESS"] * 10
    assert sorted(o.result[0] for o in outcomes) == list(range(10))
    assert len({o.result[1] for o in outcomes}) == 10  # every worker ran exactly once, then was replaced


async def test_the_pool_stays_within_bounds_and_shrinks_back_when_idle(pools) -> None:
    the_pool = await pools.pool(min_workers=1, max_workers=2, idle_s=0.2)
    assert the_pool.size == 1  # warm at start
    code = "import os, time\ndef run():\n    time.sleep(0.2)\n    return os.getpid()\n"
    outcomes = await asyncio.gather(*(pools.run(the_pool, code) for _ in range(6)))
    assert len({o.result for o in outcomes}) == 2
    assert await eventually(lambda: the_pool.size == 1)


async def test_workers_get_no_database_credentials(pools, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {
        "MODCACHE_DATABASE_URL": "postgresql://app:hunter2@db/app",
        "DATABASE_URL": "postgresql://app:hunter2@db/app",
        "PGPASSWORD": "hunter2",
        "MODCACHE_SECRETS_KEY": "hunter2",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    the_pool = await pools.pool()  # the default environment is built from os.environ now
    code = (
        "import os, sys\n"
        "def run():\n"
        "    clients = sorted({m.split('.')[0] for m in sys.modules} & {'sqlalchemy', 'asyncpg', 'aio_pika'})\n"
        "    return [dict(os.environ), open('/proc/self/environ').read().split(chr(0)), clients]\n"
    )
    outcome = await pools.run(the_pool, code)
    environ, raw, clients = outcome.result
    assert clients == []  # no database client is even loaded in a worker
    assert not set(secrets) & set(environ)
    assert not [entry for entry in raw if "hunter2" in entry]
    with open(f"/proc/{the_pool.pids()[0]}/environ") as environ_file:  # noqa: ASYNC230 -- procfs, instant
        assert "hunter2" not in environ_file.read()
    assert environ["PATH"] == os.environ["PATH"]


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("def run():\n    return object()\n", "the result is not JSON-serializable: Object of type object"),
        ("def run():\n    return float('nan')\n", "the result is not JSON-serializable: Out of range float values"),
        ("def run():\n    return 'x' * 2000\n", "the result is 2002 bytes, over the 1000-byte limit"),
        ("def run():\n    return {'k': 'a\\x00b'}\n", "the result holds a NUL character (\\u0000), which PostgreSQL"),
        ("def main():\n    pass\n", "LookupError: workflows/test.py: no function 'run'"),
        ("def run(:\n", "SyntaxError: invalid syntax (workflows/test.py, line 1)"),
    ],
)
async def test_unusable_results_and_broken_workflows_fail_clearly(pools, code: str, error: str) -> None:
    the_pool = await pools.pool(max_result_bytes=1000)
    outcome = await pools.run(the_pool, code)
    assert outcome.status == "FAILED"
    assert outcome.error.startswith(error)


async def test_a_workflow_error_carries_a_traceback_excerpt_with_its_source(pools) -> None:
    the_pool = await pools.pool()
    code = "def run(x):\n    return helper(x)\n\ndef helper(x):\n    return 1 / x\n"
    outcome = await pools.run(the_pool, code, {"x": 0})
    lines = outcome.error.splitlines()
    assert lines[0] == "ZeroDivisionError: division by zero"
    assert '  File "workflows/test.py", line 5, in helper' in lines
    assert "    return 1 / x" in lines
    assert not [line for line in lines if "modcache_consumer" in line]  # no frames of the worker itself


async def test_async_workflows_and_context_free_prints(pools, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="modcache_consumer.pool")
    the_pool = await pools.pool()
    code = (
        "import asyncio\nasync def run(n):\n    print('working on', n)\n    await asyncio.sleep(0)\n    return n + 1\n"
    )
    outcome = await pools.run(the_pool, code, {"n": 41})
    assert (outcome.status, outcome.result) == ("SUCCESS", 42)  # print() did not corrupt the protocol
    assert await eventually(lambda: any(r.message == f"worker {outcome.pid}: working on 41" for r in caplog.records))


async def test_a_worker_that_cannot_start_says_why(pools) -> None:
    with pytest.raises(pool.WorkerStartFailed, match="a worker process did not start: exited with code 1"):
        await pools.pool(python="/bin/false")
