"""Running the ``modcache`` CLI from tests: in-process (fast, the real ``main()`` with its exit codes) or as a
real process (for signals, a terminal, the console script).

In-process runs happen in a worker thread (``await invoke(...)``), so async tests keep their fixtures' event
loop while the command runs its own ``asyncio.run``. The developer's own ``MODCACHE_*`` variables never leak in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from modcache import keys
from modcache.cli import main as cli_main

_lock = threading.Lock()  # sys.argv, os.environ and sys.stdout are process-wide


@dataclasses.dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    @property
    def output(self) -> str:
        return self.out + self.err


def service_env(database_url: str, redis_url: str, keyspace: keys.KeySpace) -> dict[str, str]:
    return {
        "MODCACHE_DATABASE_URL": database_url,
        "MODCACHE_REDIS_URL": redis_url,
        "MODCACHE_KEY_PREFIX": keyspace.prefix,
    }


def clean_environ(env: Mapping[str, str]) -> dict[str, str]:
    """``os.environ`` without any ``MODCACHE_*`` variable, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MODCACHE_")}
    return {**base, **env}


@contextlib.contextmanager
def _process_state(args: list[str], env: Mapping[str, str]) -> Iterator[tuple[io.StringIO, io.StringIO]]:
    saved_env, saved_argv = dict(os.environ), sys.argv
    out, err = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(clean_environ(env))
    sys.argv = ["modcache", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield out, err
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv


def run(*args: str, env: Mapping[str, str]) -> Result:
    """``modcache ARGS`` in this process, with exactly ``env`` as its MODCACHE_* environment."""
    with _lock, _process_state(list(args), env) as (out, err):
        try:
            cli_main.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return Result(code=code, out=out.getvalue(), err=err.getvalue())


async def invoke(*args: str, env: Mapping[str, str]) -> Result:
    return await asyncio.to_thread(run, *args, env=env)


def console_script() -> str:
    """The installed ``modcache`` entry point next to this interpreter."""
    return str(Path(sys.executable).with_name("modcache"))
