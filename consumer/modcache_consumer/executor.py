"""The consumer's side of the executor: one fresh, isolated process per execution, run over a private channel.

The interface the rest of the consumer uses is small on purpose::

    executor = Executor(socket_path=None, ...)       # None: start the executor side (``template``) as a child
    await executor.start()
    outcome = await executor.run(job, timeout_s=..., session=serving.Session(...))   # never raises for
    await executor.close()                                                            # what the workflow did

``run`` takes a spare the executor handed over (a fresh clone blocked on its own channel, a socketpair, with
its output pipe), writes the job on that channel, tells the executor its deadline starts (``run``), and talks
to the execution until it sent its result and closed the channel, or its process is gone (``exited``):

* one ``Result`` frame and a clean exit: that result (SUCCESS or FAILED as the workflow ended);
* the executor stopped it at its deadline (SIGTERM, SIGKILL ``grace_s`` later): TIMEOUT;
* a garbage, oversized, unknown or second result frame: FAILED with the reason, the process is killed at once;
  it can only spoil this execution, since the channel is this execution's alone;
* no result: FAILED saying how the process ended (``describe_exit``: an exit code, or which signal and who
  sent it; a SIGKILL the executor did not send is not guessed to be "out of memory").

Output (``print``) is logged as ``execution <id>: <line>`` up to ``max_output_bytes``, the rest discarded.
If the executor itself goes away, in-flight runs raise ``ExecutorLost`` (a TransientError: the message is
requeued) and the next ``run`` starts or reconnects to it.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from modcache import errors
from modcache_consumer import messages, protocol

log = logging.getLogger(__name__)

#: Variables the child-mode executor may inherit; everything else (MODCACHE_*, PG*, DATABASE_URL, ...) stays.
ENV_ALLOWLIST = (
    "PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)
RESULT_FRAME_OVERHEAD = 64 * 1024
MAX_FDS = 16
EXIT_REPORT_MARGIN_S = 10.0


class ExecutorUnavailable(errors.TransientError):
    """The executor side did not come up or cannot be reached."""


class ExecutorLost(errors.TransientError):
    """The executor went away during the execution (its outcome is unknown; the message is requeued)."""


class NotStarted(ExecutorUnavailable):
    """``run`` could not start the execution (no executor, no spare): nothing of it ran, nothing was sent."""


class Session(Protocol):
    """Answers an execution's requests (``serving.Session``)."""

    async def answer(self, frame: dict[str, Any]) -> dict[str, Any]: ...


class _NoRequests:
    """The start-up probe's session: it asks for nothing."""

    async def answer(self, frame: dict[str, Any]) -> dict[str, Any]:
        return {"op": "answer", "error": "the start-up probe answers no request"}


PROBE_CODE = "def run():\n    return 'probe ok'\n"
PROBE_RESULT = "probe ok"


class Teacher(Protocol):
    """Hands the template verified modules after an execution (``serving.ModuleServer``)."""

    def learned(self) -> protocol.Learned | None: ...


@dataclasses.dataclass(frozen=True)
class Outcome:
    status: messages.Status
    result: Any = None
    error: str | None = None
    pid: int | None = None
    timings_ms: Mapping[str, float] = dataclasses.field(default_factory=dict)
    lease_expired: bool = False  # stopped because its lease was not extended in time (``Executor.extend``)


@dataclasses.dataclass(frozen=True)
class Limits:
    memory_bytes: int | None = 1024**3
    processes: int | None = 64
    file_bytes: int | None = 64 * 1024**2
    tmp_bytes: int = 64 * 1024**2
    max_result_bytes: int = 1024**2
    max_output_bytes: int = 1024**2


def executor_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    env = {name: environ[name] for name in ENV_ALLOWLIST if name in environ}
    env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    return env


class Observer(Protocol):
    """What this module reports (``metrics.Metrics`` implements it)."""

    def on_worker_started(self, pid: int) -> None: ...

    def on_worker_lost(self, pid: int, reason: str) -> None: ...


class Unobserved:
    def on_worker_started(self, pid: int) -> None: ...

    def on_worker_lost(self, pid: int, reason: str) -> None: ...


@dataclasses.dataclass
class _Talk:
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    broken: str | None = None
    eof: bool = False
    pid: int | None = None

    @property
    def finished(self) -> bool:
        """Exactly one result, then the channel closed by every process that held it."""
        return self.eof and self.broken is None and len(self.results) == 1


@dataclasses.dataclass
class _Spare:
    """A fresh execution process waiting for its job: its pid, our end of its channel, its output's read end."""

    pid: int
    channel: int
    output: int

    def close(self) -> None:
        for fd in (self.channel, self.output):
            with contextlib.suppress(OSError):
                os.close(fd)


class _Control:
    """The control connection: frames (with descriptors) out, ``exited`` reports in."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.hello: dict[str, Any] = {}
        self._waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._fds: collections.deque[int] = collections.deque()
        self._spares: collections.deque[_Spare] = collections.deque()
        self._spare_arrived = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._frames = protocol.Frames(limit=protocol.MAX_CONTROL_FRAME_BYTES)
        self._first: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._limited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())
        self.lost = asyncio.Event()

    async def greeted(self, timeout_s: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            self.hello = await asyncio.shield(self._first)
        return self.hello

    async def limit(self, limits: dict[str, Any], timeout_s: float) -> None:
        """Tell the executor the limits every job of this connection carries: it replaces the spares it handed
        over with clones isolated beforehand (``limited`` says which spares are gone: all received before it)."""
        await self.send({"op": "limits", "limits": limits})
        async with asyncio.timeout(timeout_s):
            await asyncio.shield(self._limited)

    def expect(self, ticket: int) -> asyncio.Future[dict[str, Any]]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if self.lost.is_set():
            future.set_exception(ExecutorLost("the executor went away"))
        self._waiters[ticket] = future
        return future

    def forget(self, ticket: int) -> None:
        self._waiters.pop(ticket, None)

    async def spare(self, timeout_s: float) -> _Spare:
        """A fresh execution process blocked on its channel, handed over by the executor."""
        try:
            async with asyncio.timeout(timeout_s):
                while not self._spares:
                    if self.lost.is_set():
                        raise ExecutorLost("the executor went away")
                    self._spare_arrived.clear()
                    await self._spare_arrived.wait()
        except TimeoutError:
            raise ExecutorUnavailable(f"no execution process became available within {timeout_s:g} s") from None
        return self._spares.popleft()

    def drop_spares(self) -> list[int]:
        """Close the channels of the spares held (they exit unused); returns their pids."""
        dropped = []
        while self._spares:
            spare = self._spares.popleft()
            spare.close()
            dropped.append(spare.pid)
        return dropped

    async def send(self, frame: Any, fds: list[int] | None = None) -> None:
        if self.lost.is_set():
            raise ExecutorLost("the executor went away")
        data = memoryview(protocol.encode(frame))
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        loop = asyncio.get_running_loop()
        async with self._send_lock:
            while data:
                try:
                    sent = self.sock.sendmsg([data], ancillary)
                except BlockingIOError:
                    await _writable(loop, self.sock)
                    continue
                except OSError as e:
                    raise ExecutorLost(f"the executor went away ({errors.describe(e)})") from e
                ancillary = []  # the descriptors went with the first byte
                data = data[sent:]

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await _recvmsg(loop, self.sock, self._fds):
                for frame in self._frames.feed(data):
                    self._deliver(frame)
        except (OSError, protocol.ProtocolError) as e:
            log.error("executor control connection failed: %s", errors.describe(e))
        finally:
            self._close()

    def _deliver(self, frame: dict[str, Any]) -> None:
        if frame["op"] == "hello" and not self._first.done():
            self._first.set_result(frame)
        elif frame["op"] == "spare" and len(self._fds) >= 2:
            spare = _Spare(pid=int(frame["pid"]), channel=self._fds.popleft(), output=self._fds.popleft())
            if self.lost.is_set():
                spare.close()
                return
            self._spares.append(spare)
            self._spare_arrived.set()
        elif frame["op"] == "limited":
            self.drop_spares()  # cloned before the limits: the executor killed them
            if not self._limited.done():
                self._limited.set_result(None)
        elif frame["op"] == "exited":
            waiter = self._waiters.pop(int(frame["ticket"]), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(frame)

    def _close(self) -> None:
        self.lost.set()
        self._spare_arrived.set()
        self.drop_spares()
        while self._fds:
            os.close(self._fds.popleft())
        lost = ExecutorLost("the executor went away during the execution")
        if not self._first.done():
            self._first.set_exception(ExecutorUnavailable("the executor closed the connection before saying hello"))
        if not self._limited.done():
            self._limited.set_exception(ExecutorUnavailable("the executor closed the connection"))
            self._limited.exception()  # retrieved: nobody may be waiting
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(lost)
        self._waiters.clear()

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        self.sock.close()
        self._close()
        if self._first.done() and not self._first.cancelled():
            self._first.exception()  # retrieved


@dataclasses.dataclass(frozen=True)
class Policy:
    """What executions may share: ``allow_shared_uid`` (unsafe for more than one tenant: one uid for every
    execution, or the consumer's own), ``network`` ("none": an empty network namespace each; "host") and
    ``max_timeout_s``: what a child executor lets any job ask for (attack-8c C2; a socket executor has its own
    ``--max-timeout-s``)."""

    allow_shared_uid: bool = False
    network: str = "none"
    max_timeout_s: float = 1800.0


class Executor:
    def __init__(
        self,
        *,
        socket_path: str | None = None,
        limits: Limits | None = None,
        terminate_grace_s: float = 5.0,
        start_timeout_s: float = 30.0,
        uid_base: int | None = None,
        namespaces: bool = True,
        policy: Policy | None = None,
        python: str = sys.executable,
        environment: Mapping[str, str] | None = None,
        teacher: Teacher | None = None,
        observer: Observer | None = None,
    ) -> None:
        self._socket_path = socket_path
        self._limits = limits or Limits()
        self._grace_s = terminate_grace_s
        self._start_timeout_s = start_timeout_s
        self._uid_base = uid_base
        self._namespaces = namespaces
        self._policy = policy or Policy()
        self._max_timeout_s = max(self._policy.max_timeout_s, start_timeout_s)  # the start-up probe's too
        self.probe_pid: int | None = None  # the start-up probe's execution (it may still be ending)
        self._python = python
        self._environment = dict(environment if environment is not None else executor_environment())
        self._teacher = teacher
        self._observer = observer or Unobserved()
        self._control: _Control | None = None
        self._child: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._tickets = itertools.count(1)
        self._leased: dict[str, tuple[_Control, int]] = {}  # execution id -> its control and ticket
        self._closed = False
        self._forwarders: set[asyncio.Task[None]] = set()
        self._running: set[int] = set()  # pids of the executions running now

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._connected()
        await self._probe()

    async def _probe(self) -> None:
        """A trivial execution end to end (clone, namespaces, uid maps, mounts, limits, uid, runtime, result):
        an executor that can clone but not run (attack-8 F4) must not start."""
        job: protocol.Job = {
            "op": "run",
            "execution_id": f"probe-{uuid.uuid4()}",
            "workflow": {"name": "probe", "path": "probe.py", "code": PROBE_CODE, "function_name": "run"},
            "parameters": {},
            "config": {},
            "organization": None,
            "generation": 0,
        }
        outcome = await self.run(job, timeout_s=self._start_timeout_s, session=_NoRequests())
        self.probe_pid = outcome.pid
        if (outcome.status, outcome.result) != ("SUCCESS", PROBE_RESULT):
            reason = outcome.error or f"{outcome.status}, result {outcome.result!r}"
            raise ExecutorUnavailable(f"the executor cannot run an execution: {reason[:500]}")

    async def close(self) -> None:
        self._closed = True
        async with self._lock:
            await self._disconnect()
        for forwarder in list(self._forwarders):
            await _finish(forwarder)

    @property
    def template_pid(self) -> int | None:
        """The executor's (template's) pid, as it reported it."""
        return None if self._control is None else self._control.hello.get("pid")

    @property
    def running_pids(self) -> frozenset[int]:
        """The execution processes this consumer is running a job in now (each the pid 1 of its namespace)."""
        return frozenset(self._running)

    @property
    def spare_pids(self) -> frozenset[int]:
        """The fresh processes this consumer holds, waiting for a job (isolated already, under their uids)."""
        return frozenset() if self._control is None else frozenset(s.pid for s in self._control._spares)

    @property
    def isolation(self) -> str:
        return "" if self._control is None else str(self._control.hello.get("isolation", ""))

    @property
    def available(self) -> bool:
        """Whether the control connection to the executor is up (the executor said hello and is still there)."""
        return self._control is not None and not self._control.lost.is_set()

    async def connect(self) -> None:
        """Connect to the executor again (restart it, in child mode) if it was lost; ExecutorUnavailable if not."""
        await self._connected()

    async def lost(self) -> None:
        """Until the control connection is lost (at once if it is not up)."""
        control = self._control
        if control is not None:
            await control.lost.wait()

    async def _connected(self) -> _Control:
        async with self._lock:
            if self._closed:
                raise ExecutorUnavailable("the executor is stopping")
            if self._control is None or self._control.lost.is_set():
                await self._disconnect()
                self._control = await (self._spawn_child() if self._socket_path is None else self._connect())
                log.info("executor %s: %s", self._control.hello.get("pid"), self._control.hello.get("isolation"))
                self._observer.on_worker_started(int(self._control.hello.get("pid", 0)))
            return self._control

    async def _spawn_child(self) -> _Control:
        ours, theirs = socket.socketpair()
        try:
            self._child = await asyncio.create_subprocess_exec(
                self._python,
                "-m",
                "modcache_consumer.template",
                "--control-fd",
                str(theirs.fileno()),
                "--parent",
                str(os.getpid()),
                *(["--uid-base", str(self._uid_base)] if self._uid_base is not None else []),
                *([] if self._namespaces else ["--no-namespaces"]),
                *(["--allow-shared-uid"] if self._policy.allow_shared_uid else []),
                "--execution-network",
                self._policy.network,
                "--max-timeout-s",
                repr(self._max_timeout_s),
                "--max-grace-s",
                repr(self._grace_s),
                pass_fds=[theirs.fileno()],
                env=self._environment,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C reaches the consumer only; it drains first
            )
        finally:
            theirs.close()
        return await self._greet(_Control(ours))

    async def _connect(self) -> _Control:
        assert self._socket_path is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, self._socket_path)
            except OSError as e:
                sock.close()
                if loop.time() > deadline:
                    raise ExecutorUnavailable(f"cannot reach the executor at {self._socket_path}: {e}") from e
                await asyncio.sleep(0.2)  # the executor container may still be starting; nothing to await
                continue
            return await self._greet(_Control(sock))

    async def _greet(self, control: _Control) -> _Control:
        try:
            await control.greeted(self._start_timeout_s)
        except (TimeoutError, ExecutorUnavailable) as e:
            await control.close()
            await self._reap_child()
            raise ExecutorUnavailable(f"the executor did not start: {errors.describe(e) or 'no hello'}") from e
        refused = None if self._policy.allow_shared_uid else refuse_isolation(control.hello, consumer_uid=os.getuid())
        if control.hello.get("refused"):
            refused = f"the executor refused to start: {str(control.hello['refused'])[:1000]}"
        elif not control.hello.get("seccomp"):
            refused = "the executor gives its executions no seccomp filter (an executor of an older version?)"
        if refused:
            await control.close()
            await self._reap_child()
            raise ExecutorUnavailable(refused)
        if control.hello.get("prelimits"):
            try:
                await control.limit(self._job_limits(), self._start_timeout_s)
            except (TimeoutError, ExecutorUnavailable, ExecutorLost) as e:
                await control.close()
                await self._reap_child()
                raise ExecutorUnavailable(f"the executor did not take its limits: {errors.describe(e)}") from e
        return control

    async def _disconnect(self) -> None:
        if self._control is not None:
            await self._control.close()
            self._control = None
        await self._reap_child()

    async def _reap_child(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        try:
            await asyncio.wait_for(child.wait(), self._grace_s + 5.0)  # it exits when the control closes
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()

    # -- running an execution -------------------------------------------------------------------------------

    async def run(
        self,
        job: protocol.Job,
        *,
        timeout_s: float,
        session: Session,
        lease_until: float | None = None,
    ) -> Outcome:
        """Run ``job`` in a fresh process; never raises for what the workflow or its process did. NotStarted if
        no execution process could be had (the job was not sent: the execution can be queued again as is).
        ``lease_until`` (CLOCK_BOOTTIME, absolute) is when the caller's lease on it may end: the process is
        killed then unless ``extend`` moves it (``Outcome.lease_expired``)."""
        try:
            control = await self._connected()
            spare = await control.spare(self._start_timeout_s)
        except (ExecutorUnavailable, ExecutorLost) as e:
            raise NotStarted(str(e)) from e
        ticket = next(self._tickets)
        exited = control.expect(ticket)
        self._running.add(spare.pid)
        ours = socket.socket(fileno=spare.channel)
        output = asyncio.create_task(self._forward_output(spare.output, job["execution_id"]))
        self._leased[job["execution_id"]] = (control, ticket)
        try:
            start = {"timeout_s": timeout_s, "lease_until": lease_until}
            return await self._follow(control, ticket, spare.pid, exited, ours, job, start, session)
        finally:
            self._leased.pop(job["execution_id"], None)
            self._running.discard(spare.pid)
            control.forget(ticket)
            ours.close()
            self._forwarders.add(output)  # it ends when the process and its descendants are gone
            output.add_done_callback(self._forwarders.discard)
            await self._teach(control)

    async def extend(self, execution_ids: Iterable[str], until: float) -> None:
        """The leases on ``execution_ids`` are surely valid until ``until`` (CLOCK_BOOTTIME): their runs may go
        on until then (the others' deadlines stay as they are)."""
        by_control: dict[_Control, list[int]] = {}
        for execution_id in execution_ids:
            if execution_id in self._leased:
                control, ticket = self._leased[execution_id]
                by_control.setdefault(control, []).append(ticket)
        for control, tickets in by_control.items():
            with contextlib.suppress(ExecutorLost):  # its executions died with the connection
                await control.send({"op": "lease", "tickets": tickets, "until": until})

    def _job_limits(self) -> dict[str, int | None]:
        """The limits every job carries (and the executor's spares are isolated with beforehand)."""
        limits = self._limits
        return {
            "memory_bytes": limits.memory_bytes,
            "processes": limits.processes,
            "file_bytes": limits.file_bytes,
            "tmp_bytes": limits.tmp_bytes,
        }

    def _job_frame(self, job: protocol.Job) -> dict[str, Any]:
        return {**job, "max_result_bytes": self._limits.max_result_bytes, "limits": self._job_limits()}

    async def _follow(
        self,
        control: _Control,
        ticket: int,
        pid: int,
        exited: asyncio.Future[dict[str, Any]],
        ours: socket.socket,
        job: protocol.Job,
        deadlines: Mapping[str, float | None],
        session: Session,
    ) -> Outcome:
        talk = _Talk(pid=pid)
        conversation = asyncio.create_task(self._converse(ours, job, session, talk))
        timeout_s = float(deadlines["timeout_s"] or 0.0)
        start = {"op": "run", "ticket": ticket, "pid": pid, "grace_s": self._grace_s, **deadlines}
        report: Mapping[str, Any] | None = None
        try:
            async with asyncio.timeout(timeout_s + self._grace_s + EXIT_REPORT_MARGIN_S):
                await control.send(start)  # after the job was queued on the channel: the deadline starts
                waiting: set[asyncio.Future[Any]] = {conversation, exited}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if not (conversation.done() and talk.finished):
                    if talk.broken is not None and not exited.done():
                        await control.send({"op": "stop", "ticket": ticket})
                    report = await exited
                    await asyncio.wait({conversation}, timeout=2.0)  # EOF follows the process's end at once
                elif not exited.done():  # one result, then EOF: nothing can follow; its process may not linger
                    with contextlib.suppress(ExecutorLost):  # (a workflow that wrote its own result; A7)
                        await control.send({"op": "stop", "ticket": ticket})
        except TimeoutError:
            with contextlib.suppress(ExecutorLost):
                await control.send({"op": "stop", "ticket": ticket})
            raise ExecutorLost("the executor did not report the end of the execution in time") from None
        except asyncio.CancelledError:
            with contextlib.suppress(ExecutorLost):
                await control.send({"op": "stop", "ticket": ticket})
            raise
        finally:
            conversation.cancel()
            await asyncio.gather(conversation, return_exceptions=True)
        outcome = decide(talk, report, timeout_s=timeout_s)
        if outcome.status == messages.Status.FAILED and not talk.results:
            self._observer.on_worker_lost(outcome.pid or 0, outcome.error or "")
        return outcome

    async def _converse(self, sock: socket.socket, job: protocol.Job, session: Session, talk: _Talk) -> None:
        """Write the job, then read what the execution sends (requests answered, one result) until its EOF; on
        the socket itself (``sock_recv``/``sock_sendall``: no stream transport per execution)."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        frames = protocol.Frames(limit=self._limits.max_result_bytes + RESULT_FRAME_OVERHEAD)
        try:
            await loop.sock_sendall(sock, protocol.encode(self._job_frame(job)))
            while data := await loop.sock_recv(sock, 1 << 16):
                for frame in frames.feed(data):
                    problem = _check_frame(frame, talk)
                    if problem is not None:
                        talk.broken = problem
                        return
                    if frame["op"] == "result":
                        talk.results.append(frame)
                        continue
                    await loop.sock_sendall(sock, protocol.encode(await session.answer(frame)))
            if frames.pending:
                raise protocol.ProtocolError("EOF inside a frame")
            talk.eof = True
        except protocol.ProtocolError as e:
            talk.broken = str(e)
        except ConnectionError:
            if talk.results:
                return

    async def _forward_output(self, fd: int, execution_id: str) -> None:
        """Log what the execution prints (``max_output_bytes`` at most; the rest is drained and dropped) until
        every process that holds the pipe is gone; read with plain ``os.read`` (no pipe transport per execution)."""
        loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        budget = self._limits.max_output_bytes
        try:
            pending = b""
            while True:
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    await _fd_readable(loop, fd)
                    continue
                if not chunk:
                    break
                if budget <= 0:
                    continue  # over the cap: drained and dropped
                chunk = chunk[:budget]
                budget -= len(chunk)
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    _log_output(execution_id, line)
                if budget <= 0:
                    _log_output(execution_id, pending)
                    pending = b""
                    log.warning(
                        "execution %s: output beyond %d bytes discarded", execution_id, self._limits.max_output_bytes
                    )
            _log_output(execution_id, pending)
        finally:
            os.close(fd)

    async def _teach(self, control: _Control) -> None:
        """Verified modules this execution read, for the template to compile before the next clone."""
        lesson = self._teacher.learned() if self._teacher is not None else None
        if lesson is not None:
            dropped = control.drop_spares()  # cloned before the lesson: the executor sends fresh ones after it
            with contextlib.suppress(ExecutorLost):
                await control.send(lesson)
                await control.send({"op": "spares", "dropped": dropped})


def refuse_isolation(hello: Mapping[str, Any], *, consumer_uid: int) -> str | None:
    """Why an executor's isolation is unsafe for more than one tenant (None: it is not), from its hello
    (attack-8 F5, F6). ``MODCACHE_EXECUTOR_ALLOW_SHARED_UID`` skips this."""
    shared = hello.get("execution_uid")
    if shared is None:
        return None
    advice = "run the executor as root or as a uid of its own, or set MODCACHE_EXECUTOR_ALLOW_SHARED_UID=true " \
        "(unsafe for more than one tenant)"  # fmt: skip
    if not hello.get("namespaces"):
        return (
            f"executions would all run as uid {shared} with no namespaces: each could read the others' memory; {advice}"
        )
    if shared == consumer_uid:
        return (
            f"executions would run as this consumer's own uid {shared}: they could read its secret files and "
            f"rewrite its code; {advice}"
        )
    return None


def decide(talk: _Talk, report: Mapping[str, Any] | None, *, timeout_s: float) -> Outcome:
    """The outcome from what the execution said and how its process ended (``report`` None: not awaited,
    since it sent one result and closed its channel)."""
    if report is None:
        report = {"pid": talk.pid, "returncode": 0}
    pid = int(report.get("pid") or 0) or None
    returncode = int(report["returncode"])
    if report.get("lease_expired") and not (len(talk.results) == 1 and returncode == 0):
        return Outcome(
            messages.Status.FAILED,
            error=f"execution process {pid} was stopped: its lease was not renewed in time (the consumer stalled)",
            pid=pid,
            lease_expired=True,
        )
    if report.get("timed_out"):
        return Outcome(
            messages.Status.TIMEOUT,
            error=f"the execution exceeded its {timeout_s:g} s timeout; process {pid} and its descendants were stopped",
            pid=pid,
        )
    if talk.broken is not None:
        return Outcome(
            messages.Status.FAILED, error=f"execution process {pid} broke the protocol: {talk.broken}", pid=pid
        )
    if len(talk.results) == 1 and returncode == 0:
        frame = talk.results[0]
        return Outcome(
            status=messages.Status(frame["status"]),
            result=frame.get("result"),
            error=frame.get("error"),
            pid=pid,
            timings_ms=frame.get("timings_ms") or {},
        )
    reason = describe_exit(returncode, stopped=bool(report.get("stopped")))
    when = "after sending its result" if talk.results else "during the execution"
    return Outcome(messages.Status.FAILED, error=f"execution process {pid} {reason} {when}", pid=pid)


def describe_exit(returncode: int, *, stopped: bool = False) -> str:
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    if stopped:
        return f"was killed by the executor ({name})"
    if name == "SIGKILL":
        return "was killed by SIGKILL from outside the execution, not by the executor (the kernel or an administrator)"
    return f"was killed by {name}"


def _check_frame(frame: dict[str, Any], talk: _Talk) -> str | None:
    if talk.results:
        return f"sent a {frame['op']!r} frame after its result (a forged frame?)"
    if frame["op"] == "result":
        if frame.get("status") not in ("SUCCESS", "FAILED"):
            return "a result frame with an invalid status"
        if not isinstance(frame.get("error"), str | None) or not isinstance(frame.get("timings_ms", {}), dict):
            return "a malformed result frame"
        return None
    if frame["op"] not in ("lookup", "manifest", "directory", "repair", "secret"):
        return f"an unknown {frame['op'][:40]!r} frame"
    return None


def _log_output(execution_id: str, raw: bytes) -> None:
    line = errors.truncate(raw.decode(errors="replace").rstrip())
    if line.strip():
        log.info("execution %s: %s", execution_id, line)


async def _recvmsg(loop: asyncio.AbstractEventLoop, sock: socket.socket, fds: collections.deque[int]) -> bytes:
    """recvmsg on a non-blocking socket: the data, with any descriptors appended to ``fds``."""
    while True:
        try:
            data, ancillary, _, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(MAX_FDS * 4))
        except BlockingIOError:
            await _readable(loop, sock)
            continue
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                fds.extend(received)
        return data


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    await _fd_readable(loop, sock.fileno())


async def _fd_readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_writer(sock.fileno())


async def _finish(task: asyncio.Task[None]) -> None:
    """Let the output forwarder drain what the execution wrote last; cancel it if the pipe stays open."""
    _, pending = await asyncio.wait({task}, timeout=2.0)
    for stuck in pending:
        stuck.cancel()
        await asyncio.wait({stuck})
