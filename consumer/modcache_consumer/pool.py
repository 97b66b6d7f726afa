"""The process pool: spawned worker processes that run one execution at a time.

Workers are fresh interpreters (``python -m modcache_consumer.worker``: spawn semantics, nothing inherited from
the consumer's memory) started with an **explicit, allow-listed environment**, so database credentials never
reach workflow code; multiprocessing's spawn context would copy the consumer's whole ``os.environ``. Each
worker runs in its own session (process group), so a timeout can stop whatever the workflow started.

* min/max: ``min_workers`` are kept warm; more are started on demand up to ``max_workers``; extra idle ones
  exit after ``idle_s``.
* Timeout: SIGTERM to the worker's process group, then SIGKILL after ``terminate_grace_s``; the execution is
  TIMEOUT and the worker is replaced.
* Crash (the worker exits mid-execution, e.g. ``os._exit`` or the kernel's OOM kill): the execution is FAILED
  with the exit code or signal as the reason.
* Memory: each worker applies ``RLIMIT_AS`` to itself; a workflow that exceeds it gets MemoryError (FAILED),
  and that worker is recycled.
* Recycling (after ``max_executions``) happens only between executions, after the result was read, so no
  result is ever dropped (bifrost-contract.md, defect 8).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Protocol

from modcache import errors
from modcache_consumer import messages, protocol

log = logging.getLogger(__name__)

Repair = Callable[[list[str]], Awaitable[None]]

#: Variables a worker may inherit; everything else (MODCACHE_*, PG*, DATABASE_URL, ...) stays behind.
ENV_ALLOWLIST = (
    "PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "HOME",
    "TMPDIR",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)
STDERR_TAIL_LINES = 20


class WorkerStartFailed(errors.ModcacheError):
    """A worker process did not come up (bad interpreter, broken install, limits too tight)."""


class PoolClosed(errors.TransientError):
    """The pool is stopping; the execution was not started."""


def worker_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    env = {name: environ[name] for name in ENV_ALLOWLIST if name in environ}
    env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    return env


@dataclasses.dataclass(frozen=True)
class WorkerOutcome:
    status: messages.Status
    result: Any = None
    error: str | None = None
    pid: int | None = None
    timings_ms: Mapping[str, float] = dataclasses.field(default_factory=dict)


class Observer(Protocol):
    """What this module reports (``metrics.Metrics`` implements it)."""

    def on_worker_started(self, pid: int) -> None: ...

    def on_worker_lost(self, pid: int, reason: str) -> None: ...


class Unobserved:
    def on_worker_started(self, pid: int) -> None: ...

    def on_worker_lost(self, pid: int, reason: str) -> None: ...


@dataclasses.dataclass(eq=False)
class _Worker:
    process: asyncio.subprocess.Process
    stderr_tail: collections.deque[str] = dataclasses.field(default_factory=lambda: collections.deque(maxlen=20))
    executions: int = 0
    idle_since: float = 0.0
    forwarder: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None


class WorkerPool:
    def __init__(
        self,
        *,
        init: protocol.Init,
        min_workers: int = 1,
        max_workers: int = 4,
        max_executions: int = 1000,
        idle_s: float = 300.0,
        start_timeout_s: float = 30.0,
        terminate_grace_s: float = 5.0,
        python: str = sys.executable,
        environment: Mapping[str, str] | None = None,
        observer: Observer | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._init = init
        self._min = min(min_workers, max_workers)
        self._max = max_workers
        self._max_executions = max_executions
        self._idle_s = idle_s
        self._start_timeout_s = start_timeout_s
        self._grace_s = terminate_grace_s
        self._python = python
        self._environment = dict(environment if environment is not None else worker_environment())
        self._observer = observer or Unobserved()
        self._monotonic = monotonic
        self._max_frame = init["max_result_bytes"] + 64 * 1024
        self._idle: list[_Worker] = []
        self._workers: set[_Worker] = set()
        self._count = 0  # live + starting
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._stopping = asyncio.Event()
        self._workdir: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the minimum number of workers (all must come up) and the idle reaper."""
        self._workdir = tempfile.mkdtemp(prefix="modcache-worker-")
        self._count += self._min
        results = await asyncio.gather(*(self._spawn() for _ in range(self._min)), return_exceptions=True)
        for result in results:
            if isinstance(result, _Worker):
                self._make_idle(result)
            else:
                self._count -= 1
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            await self.close()
            raise failure
        self._background(self._reap_idle())

    async def close(self) -> None:
        """Stop every worker (idle ones politely, busy ones by signal) and wait for them to be gone."""
        self._closed = True
        self._stopping.set()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        for worker in list(self._workers):
            self._background(self._retire(worker, graceful=worker in self._idle))
        self._idle.clear()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    @property
    def size(self) -> int:
        return len(self._workers)

    def pids(self) -> list[int]:
        return sorted(w.pid for w in self._workers if w.alive)

    # -- running an execution -------------------------------------------------------------------------------

    async def run(self, job: protocol.Job, *, timeout_s: float, repair: Repair) -> WorkerOutcome:
        """Run ``job`` on a worker; never raises for what the workflow or its worker did."""
        worker = await self._acquire()
        reusable = False
        try:
            async with asyncio.timeout(timeout_s):
                frame = await self._exchange(worker, job, repair)
        except TimeoutError:
            return WorkerOutcome(
                messages.Status.TIMEOUT,
                error=f"the execution exceeded its {timeout_s:g} s timeout; worker {worker.pid} was stopped",
                pid=worker.pid,
            )
        except (asyncio.IncompleteReadError, ConnectionError, protocol.ProtocolError) as e:
            reason = await self._exit_reason(worker, e)
            self._observer.on_worker_lost(worker.pid, reason)
            return WorkerOutcome(
                messages.Status.FAILED,
                error=f"worker process {worker.pid} {reason} during the execution",
                pid=worker.pid,
            )
        else:
            reusable = not frame.get("recycle", False)
            return WorkerOutcome(
                status=messages.Status(frame["status"]),
                result=frame.get("result"),
                error=frame.get("error"),
                pid=worker.pid,
                timings_ms=frame.get("timings_ms") or {},
            )
        finally:
            self._release(worker, reusable=reusable)

    async def _exchange(self, worker: _Worker, job: protocol.Job, repair: Repair) -> dict[str, Any]:
        await self._send(worker, job)
        while True:
            frame = await self._receive(worker)
            if frame["op"] == "result":
                return frame
            if frame["op"] != "repair":
                raise protocol.ProtocolError(f"unexpected {frame['op']!r} frame")
            error = None
            try:
                await repair([str(p) for p in frame.get("paths", [])])
            except errors.ModcacheError as e:
                error = errors.describe(e)
            await self._send(worker, {"op": "repaired", "error": error})

    async def _send(self, worker: _Worker, frame: Any) -> None:
        stdin = worker.process.stdin
        assert stdin is not None
        stdin.write(protocol.encode(frame))
        await stdin.drain()

    async def _receive(self, worker: _Worker) -> dict[str, Any]:
        stdout = worker.process.stdout
        assert stdout is not None
        header = await stdout.readexactly(protocol.HEADER.size)
        return protocol.decode(await stdout.readexactly(protocol.frame_length(header, limit=self._max_frame)))

    # -- acquiring and releasing workers --------------------------------------------------------------------

    async def _acquire(self) -> _Worker:
        while True:
            if self._closed:
                raise PoolClosed("the worker pool is stopping")
            if self._idle:
                return self._idle.pop()  # most recently used first: the others can idle out
            if self._count < self._max:
                self._count += 1
                try:
                    return await self._spawn()
                except BaseException:
                    self._count -= 1
                    self._wake()
                    raise
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def _release(self, worker: _Worker, *, reusable: bool) -> None:
        worker.executions += 1
        if reusable and worker.alive and worker.executions < self._max_executions and not self._closed:
            self._make_idle(worker)
        else:
            self._background(self._retire(worker, graceful=reusable and worker.alive))

    def _make_idle(self, worker: _Worker) -> None:
        worker.idle_since = self._monotonic()
        self._idle.append(worker)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # -- starting and stopping processes --------------------------------------------------------------------

    async def _spawn(self) -> _Worker:
        process = await asyncio.create_subprocess_exec(
            self._python,
            "-m",
            "modcache_consumer.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._environment,
            cwd=self._workdir,
            start_new_session=True,
        )
        worker = _Worker(process=process)
        self._workers.add(worker)
        worker.forwarder = asyncio.create_task(self._forward_stderr(worker))
        try:
            async with asyncio.timeout(self._start_timeout_s):
                await self._send(worker, self._init)
                ready = await self._receive(worker)
            if ready.get("op") != "ready":
                raise protocol.ProtocolError(f"expected ready, got {ready.get('op')!r}")
        except BaseException as e:
            reason = await self._exit_reason(worker, e)
            await self._stop_process(worker, graceful=False)
            self._workers.discard(worker)
            await _finish(worker.forwarder)
            tail = " | ".join(list(worker.stderr_tail)[-3:])
            raise WorkerStartFailed(f"a worker process did not start: {reason}" + (f": {tail}" if tail else "")) from e
        self._observer.on_worker_started(worker.pid)
        return worker

    async def _retire(self, worker: _Worker, *, graceful: bool) -> None:
        try:
            await self._stop_process(worker, graceful=graceful)
        finally:
            self._workers.discard(worker)
            self._count -= 1
            await _finish(worker.forwarder)
            self._wake()
            self._top_up()

    async def _stop_process(self, worker: _Worker, *, graceful: bool) -> None:
        process = worker.process
        if graceful and worker.alive:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._send(worker, {"op": "exit"})
            if await _exited(process, self._grace_s):
                return
        for sig, wait_s in ((signal.SIGTERM, self._grace_s), (signal.SIGKILL, None)):
            if not worker.alive:
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            if await _exited(process, wait_s):
                return

    async def _exit_reason(self, worker: _Worker, error: BaseException) -> str:
        if not await _exited(worker.process, 2.0):
            await self._stop_process(worker, graceful=False)
            return f"broke the protocol ({errors.describe(error)})"
        return describe_exit(worker.process.returncode)

    def _top_up(self) -> None:
        if not self._closed and self._count < self._min:
            self._count += 1
            self._background(self._spawn_idle())

    async def _spawn_idle(self) -> None:
        try:
            worker = await self._spawn()
        except WorkerStartFailed as e:
            self._count -= 1
            log.error("%s", e)
            return
        if self._closed:
            await self._retire(worker, graceful=True)
        else:
            self._make_idle(worker)

    async def _reap_idle(self) -> None:
        period_s = max(0.05, min(self._idle_s / 2, 5.0))
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), period_s)
            deadline = self._monotonic() - self._idle_s
            for worker in [w for w in self._idle if w.idle_since < deadline]:
                if self._count - 1 < self._min:
                    break
                self._idle.remove(worker)
                self._background(self._retire(worker, graceful=True))

    async def _forward_stderr(self, worker: _Worker) -> None:
        """Workflow output (print goes to stderr in a worker) as log lines; the tail explains a failed start."""
        stream = worker.process.stderr
        assert stream is not None
        pending = b""
        while chunk := await stream.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) > 65536:
                lines, pending = [*lines, pending], b""
            for line in lines:
                self._log_output(worker, line)
        self._log_output(worker, pending)

    def _log_output(self, worker: _Worker, raw: bytes) -> None:
        line = errors.truncate(raw.decode(errors="replace").rstrip())
        if line.strip():
            worker.stderr_tail.append(line)
            log.info("worker %d: %s", worker.pid, line)

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {returncode}"


async def _exited(process: asyncio.subprocess.Process, wait_s: float | None) -> bool:
    try:
        await asyncio.wait_for(process.wait(), wait_s)
    except TimeoutError:
        return False
    return True


async def _finish(task: asyncio.Task[None] | None) -> None:
    """Let a stderr forwarder drain what the process wrote last; cancel it if the pipe stays open."""
    if task is not None:
        _, pending = await asyncio.wait({task}, timeout=2.0)
        for stuck in pending:
            stuck.cancel()
            await asyncio.wait({stuck})
