"""The executor with real processes: a fresh process per execution, timeouts, crashes and who caused them, the
memory limit, output, results, and an executor that dies or cannot start."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

import psutil
import pytest

from modcache_consumer import executor
from testkit.lifetimes import gone
from testkit.polling import eventually


def executions_of(the_executor: executor.Executor) -> list[psutil.Process]:
    """The template's clones that run an execution now (not the spares waiting for one, isolated already)."""
    running = []
    for pid in the_executor.running_pids:
        with contextlib.suppress(psutil.Error):
            running.append(psutil.Process(pid))
    return running


SLEEPER = """
import subprocess, time
def run(ignore_term=False):
    if ignore_term:
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "60"])
    print("started", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("ignore_term", [False, True])
async def test_timeout_stops_the_execution_and_what_it_started(executors, ignore_term: bool) -> None:
    the_executor = await executors.start(terminate_grace_s=0.3)
    running = asyncio.create_task(executors.run(the_executor, SLEEPER, {"ignore_term": ignore_term}, timeout_s=1.0))
    await eventually(lambda: any(p.children() for p in executions_of(the_executor)))
    (execution,) = executions_of(the_executor)
    (child,) = execution.children()
    outcome = await running
    assert outcome.status == "TIMEOUT"
    assert outcome.error == (
        f"the execution exceeded its 1 s timeout; process {outcome.pid} and its descendants were stopped"
    )
    assert outcome.pid == execution.pid
    assert await gone(execution.pid)
    assert await gone(child.pid)  # its PID namespace died with it
    after = await executors.run(the_executor, "def run():\n    return 'next'\n")
    assert (after.status, after.result) == ("SUCCESS", "next")


async def test_an_exit_fails_the_execution_with_the_exit_code(executors) -> None:
    the_executor = await executors.start()
    outcome = await executors.run(the_executor, "import os\ndef run():\n    os._exit(3)\n")
    assert outcome.status == "FAILED"
    assert outcome.error == f"execution process {outcome.pid} exited with code 3 during the execution"
    after = await executors.run(the_executor, "def run():\n    return 1\n")
    assert after.status == "SUCCESS"


async def test_a_sigkill_from_outside_is_reported_as_such_not_as_out_of_memory(executors) -> None:
    the_executor = await executors.start()
    running = asyncio.create_task(executors.run(the_executor, "import time\ndef run():\n    time.sleep(60)\n"))
    await eventually(lambda: bool(executions_of(the_executor)))
    (execution,) = executions_of(the_executor)
    os.kill(execution.pid, signal.SIGKILL)  # what the kernel's OOM killer or an administrator would do
    outcome = await running
    assert outcome.status == "FAILED"
    assert outcome.error == (
        f"execution process {execution.pid} was killed by SIGKILL from outside the execution, not by the executor "
        "(the kernel or an administrator) during the execution"
    )
    assert "out of memory" not in outcome.error


async def test_the_memory_limit_fails_the_execution_and_the_next_one_runs(executors) -> None:
    the_executor = await executors.start(memory_limit_bytes=256 * 1024**2)
    outcome = await executors.run(the_executor, "def run():\n    return len(bytearray(1024 ** 3))\n")
    assert outcome.status == "FAILED"
    assert outcome.error.startswith("MemoryError")
    small = await executors.run(the_executor, "def run():\n    return len(bytearray(10 * 1024 ** 2))\n")
    assert (small.status, small.result) == ("SUCCESS", 10 * 1024**2)


async def test_every_execution_is_a_fresh_process(executors) -> None:
    the_executor = await executors.start()
    code = (
        "import sys, time\n"
        "seen = getattr(sys, 'seen', 0)\n"
        "sys.seen = seen + 1\n"
        "def run(n):\n"
        "    time.sleep(0.01)\n"
        "    return [n, seen]\n"
    )
    outcomes = await asyncio.gather(*(executors.run(the_executor, code, {"n": n}) for n in range(10)))
    assert [o.status for o in outcomes] == ["SUCCESS"] * 10
    assert sorted(o.result[0] for o in outcomes) == list(range(10))
    assert {o.result[1] for o in outcomes} == {0}  # no interpreter ran this code before
    assert len({o.pid for o in outcomes}) == 10


async def test_the_executor_gets_no_database_credentials(executors, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {
        "MODCACHE_DATABASE_URL": "postgresql://app:hunter2@db/app",
        "DATABASE_URL": "postgresql://app:hunter2@db/app",
        "PGPASSWORD": "hunter2",
        "MODCACHE_SECRETS_KEY": "hunter2",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    the_executor = await executors.start()  # the default environment is built from os.environ now
    code = (
        "import os, sys\n"
        "def run():\n"
        "    loaded = {m.split('.')[0] for m in sys.modules}\n"
        "    clients = sorted(loaded & {'sqlalchemy', 'asyncpg', 'aio_pika', 'redis'})\n"
        "    return [dict(os.environ), open('/proc/self/environ').read().split(chr(0)), clients]\n"
    )
    outcome = await executors.run(the_executor, code)
    environ, raw, clients = outcome.result
    assert clients == []  # no service client is even loaded in an execution
    assert not set(secrets) & set(environ)
    assert not [entry for entry in raw if "hunter2" in entry]
    with open(f"/proc/{the_executor.template_pid}/environ") as environ_file:  # noqa: ASYNC230 -- procfs, instant
        assert "hunter2" not in environ_file.read()


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
async def test_unusable_results_and_broken_workflows_fail_clearly(executors, code: str, error: str) -> None:
    the_executor = await executors.start(max_result_bytes=1000)
    outcome = await executors.run(the_executor, code)
    assert outcome.status == "FAILED"
    assert outcome.error.startswith(error)


async def test_a_workflow_error_carries_a_traceback_excerpt_with_its_source(executors) -> None:
    the_executor = await executors.start()
    code = "def run(x):\n    return helper(x)\n\ndef helper(x):\n    return 1 / x\n"
    outcome = await executors.run(the_executor, code, {"x": 0})
    lines = outcome.error.splitlines()
    assert lines[0] == "ZeroDivisionError: division by zero"
    assert '  File "workflows/test.py", line 5, in helper' in lines
    assert "    return 1 / x" in lines
    assert not [line for line in lines if "modcache_consumer" in line]  # no frames of the runtime itself


async def test_async_workflows_and_their_prints(executors, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="modcache_consumer.executor")
    the_executor = await executors.start()
    code = (
        "import asyncio\nasync def run(n):\n    print('working on', n)\n    await asyncio.sleep(0)\n    return n + 1\n"
    )
    outcome = await executors.run(the_executor, code, {"n": 41})
    assert (outcome.status, outcome.result) == ("SUCCESS", 42)  # print() did not corrupt the protocol
    lines = [r.message for r in caplog.records if r.message.endswith(": working on 41")]
    assert len(lines) == 1
    assert lines[0].startswith("execution ")


async def test_an_executor_that_cannot_start_says_why(executors) -> None:
    with pytest.raises(executor.ExecutorUnavailable, match="the executor did not start"):
        await executors.start(python="/bin/false")


async def test_a_lost_executor_fails_nothing_that_was_not_running_and_comes_back(executors) -> None:
    the_executor = await executors.start()
    first = the_executor.template_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    assert await gone(first)
    outcome = await executors.run(the_executor, "def run():\n    return 'fresh'\n")
    assert (outcome.status, outcome.result) == ("SUCCESS", "fresh")
    assert the_executor.template_pid != first


CONSUMER = """
import asyncio
from modcache_consumer import executor

class Session:
    async def answer(self, frame):
        return {"op": "answer"}

async def main():
    the_executor = executor.Executor()
    await the_executor.start()
    print(the_executor.template_pid, flush=True)
    code = "import subprocess, time\\ndef run():\\n    subprocess.Popen(['sleep', '600'])\\n    time.sleep(600)\\n"
    job = {"op": "run", "execution_id": "e", "workflow": {"name": "w", "path": None, "code": code,
           "function_name": "run"}, "parameters": {}, "config": {}, "organization": None, "generation": 1}
    await the_executor.run(job, timeout_s=600, session=Session())

asyncio.run(main())
"""


async def test_when_the_consumer_is_killed_every_execution_dies_at_once() -> None:
    """Issue 10, item 3: a SIGKILLed consumer leaves no execution running (the delivery work relies on it)."""
    consumer = await asyncio.create_subprocess_exec(sys.executable, "-c", CONSUMER, stdout=asyncio.subprocess.PIPE)
    assert consumer.stdout is not None
    template = psutil.Process(int(await consumer.stdout.readline()))
    await eventually(lambda: _an_execution_has_a_child(template))
    clones = template.children(recursive=True)  # the execution, its child, the spares
    consumer.kill()
    await consumer.wait()
    assert await gone(template.pid)
    for clone in clones:
        assert await gone(clone.pid), _describe(clone)


def _an_execution_has_a_child(template: psutil.Process) -> bool:
    """An execution (a clone with a child: spares have none); a clone may end between the listing and the look."""
    for clone in template.children():
        with contextlib.suppress(psutil.Error):
            if clone.children():
                return True
    return False


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {process.status()} ppid {process.ppid()} {process.cmdline()}"
    except psutil.Error as e:
        return f"{process.pid}: {e!r}"


async def test_packages_inside_a_directory_other_users_cannot_enter_are_still_importable(
    executors, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout made by ``mktemp -d`` is mode 700 and on ``sys.path`` (the working directory) along with the
    virtualenv inside it: executions run as another uid and must still import what is installed there."""
    checkout = tmp_path_factory.mktemp("checkout")
    checkout.chmod(0o700)
    package = checkout / "site" / "privatepkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("ANSWER = 42\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(checkout), str(checkout / "site")]))
    the_executor = await executors.start()
    outcome = await executors.run(the_executor, "import privatepkg\ndef run():\n    return privatepkg.ANSWER\n")
    assert (outcome.status, outcome.result, outcome.error) == ("SUCCESS", 42, None)
