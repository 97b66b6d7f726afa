"""The executor side: a warm template process that clones one fresh, isolated process per execution.

``modcache executor --socket PATH`` (Kubernetes: its own container, no Secret, no token, a writable ``/tmp``
only) or, when ``MODCACHE_EXECUTOR_SOCKET`` is unset, a child the consumer starts itself on a socketpair (so
``modcache consumer`` stays one command on a laptop). It has imported the runtime and much of the standard
library, but never runs workflow or workspace-module code: an execution is a ``clone`` of it (``sandbox``),
which runs ``runtime.main`` once and exits, so no interpreter ever runs code of two executions.

Single-threaded (a ``selectors`` loop), because it forks. Per control connection (``protocol``):

* ``spawn`` (+ the channel and output descriptors) -> clone; the template keeps neither descriptor;
* the deadline: SIGTERM at ``timeout_s``, SIGKILL ``grace_s`` later; ``stop`` -> SIGKILL now;
* a pidfd per execution says when it is gone -> ``exited`` (the PID namespace, and every descendant, died
  with it);
* the connection closing (the consumer died, even by SIGKILL) -> every execution of that connection is killed
  at once; a child-mode template then exits. Executions also carry ``PR_SET_PDEATHSIG``: if the template
  dies, they die.
"""

from __future__ import annotations

import argparse
import array
import collections
import contextlib
import dataclasses
import importlib
import logging
import os
import select
import selectors
import signal
import socket
import sys
import time
from typing import Any

from modcache_consumer import protocol, runtime, sandbox

log = logging.getLogger("modcache_consumer.template")

#: Imported once here, so executions start with them loaded (not ssl: OpenSSL's RNG must not be cloned).
WARM_MODULES = (
    "asyncio", "base64", "collections", "csv", "dataclasses", "datetime", "decimal", "email", "email.message",
    "email.utils", "functools", "hashlib", "hmac", "http.client", "inspect", "io", "itertools", "json", "logging",
    "math", "pathlib", "random", "re", "sqlite3", "statistics", "string", "struct", "subprocess", "tempfile",
    "textwrap", "traceback", "typing", "urllib.parse", "uuid", "zoneinfo",
)  # fmt: skip
DEFAULT_UID_BASE = 200_000
MAX_FDS_PER_MESSAGE = 16


@dataclasses.dataclass(eq=False)
class Control:
    """One consumer's connection."""

    sock: socket.socket
    frames: protocol.Frames = dataclasses.field(
        default_factory=lambda: protocol.Frames(limit=protocol.MAX_CONTROL_FRAME_BYTES)
    )
    fds: collections.deque[int] = dataclasses.field(default_factory=collections.deque)

    def send(self, frame: Any) -> None:
        with contextlib.suppress(OSError):  # a consumer that is gone learns nothing; its executions die anyway
            self.sock.sendall(protocol.encode(frame))


@dataclasses.dataclass(eq=False)
class Execution:
    ticket: int
    pid: int
    pidfd: int
    control: Control
    slot: int
    terminate_at: float
    grace_s: float
    kill_at: float | None = None
    timed_out: bool = False
    stopped: bool = False


class Template:
    def __init__(self, *, isolation: sandbox.Isolation, memory: runtime.Memory, exit_with_last: bool) -> None:
        self._isolation = isolation
        self._memory = memory
        self._exit_with_last = exit_with_last
        self._selector = selectors.DefaultSelector()
        self._executions: dict[int, Execution] = {}  # by pidfd
        self._controls: set[Control] = set()
        self._running = True
        self._pid = os.getpid()
        self._self_pidfd = os.pidfd_open(self._pid)  # an execution checks it to see that its template lives

    # -- the loop -------------------------------------------------------------------------------------------

    def listen(self, sock: socket.socket) -> None:
        self._selector.register(sock, selectors.EVENT_READ, self._accept)

    def attach(self, sock: socket.socket) -> None:
        control = Control(sock=sock)
        self._controls.add(control)
        self._selector.register(sock, selectors.EVENT_READ, lambda: self._read(control))
        control.send({"op": "hello", "pid": self._pid, "isolation": self._isolation.describe()})

    def stop(self) -> None:
        self._running = False

    def serve(self) -> None:
        while self._running or self._executions:
            timeout = self._next_timer()
            for key, _ in self._selector.select(timeout):
                key.data()
            self._fire_timers()
            if not self._running:
                for execution in list(self._executions.values()):
                    self._signal(execution, signal.SIGKILL)

    def _accept(self) -> None:
        listener = next(k.fileobj for k in self._selector.get_map().values() if k.data == self._accept)
        assert isinstance(listener, socket.socket)
        with contextlib.suppress(BlockingIOError):
            sock, _ = listener.accept()
            self.attach(sock)

    def _read(self, control: Control) -> None:
        try:
            data, ancillary, _, _ = control.sock.recvmsg(1 << 16, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4))
        except OSError:
            data, ancillary = b"", []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                control.fds.extend(fds)
        if not data:
            self._lose(control)
            return
        try:
            frames = control.frames.feed(data)
        except protocol.ProtocolError as e:
            log.error("executor: a control connection broke the protocol (%s); closing it", e)
            self._lose(control)
            return
        for frame in frames:
            self._dispatch(control, frame)

    def _dispatch(self, control: Control, frame: dict[str, Any]) -> None:
        op = frame["op"]
        if op == "spawn":
            self._spawn(control, frame)  # type: ignore[arg-type]
        elif op == "stop":
            for execution in self._executions.values():
                if execution.control is control and execution.ticket == frame.get("ticket"):
                    execution.stopped = True
                    self._signal(execution, signal.SIGKILL)
        elif op == "learn":
            try:
                self._memory.learn(frame)  # type: ignore[arg-type]
            except (KeyError, TypeError, ValueError, SyntaxError) as e:
                log.warning("executor: ignored a learn frame: %s", type(e).__name__)

    def _lose(self, control: Control) -> None:
        """The consumer is gone: every execution it started dies now."""
        self._controls.discard(control)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(control.sock)
        control.sock.close()
        while control.fds:
            os.close(control.fds.popleft())
        for execution in self._executions.values():
            if execution.control is control:
                self._signal(execution, signal.SIGKILL)
        if self._exit_with_last and not self._controls:
            self._running = False

    # -- executions -----------------------------------------------------------------------------------------

    def _spawn(self, control: Control, frame: protocol.Spawn) -> None:
        if len(control.fds) < 2:
            control.send({"op": "exited", "ticket": frame["ticket"], "pid": 0, "returncode": 127,
                          "timed_out": False, "stopped": False})  # fmt: skip
            return
        channel, output = control.fds.popleft(), control.fds.popleft()
        slot = self._free_slot()
        limits = sandbox.Limits(
            memory_bytes=frame.get("memory_bytes"),
            processes=frame.get("processes"),
            file_bytes=frame.get("file_bytes"),
            tmp_bytes=int(frame.get("tmp_bytes") or 64 * 1024**2),
        )
        flags = sandbox.CLONE_NEWPID | sandbox.CLONE_NEWNS if self._isolation.namespaces else 0
        if self._isolation.user_namespace:
            flags |= sandbox.CLONE_NEWUSER
        try:
            pid = sandbox.clone(flags)
        except sandbox.SandboxError as e:
            log.error("executor: cannot start an execution: %s", e)
            pid = -1
        if pid == 0:
            self._become_execution(channel, output, slot, limits)  # never returns
        os.close(channel)
        os.close(output)
        if pid < 0:
            control.send({"op": "exited", "ticket": frame["ticket"], "pid": 0, "returncode": 126,
                          "timed_out": False, "stopped": False})  # fmt: skip
            return
        pidfd = os.pidfd_open(pid)
        execution = Execution(
            ticket=frame["ticket"],
            pid=pid,
            pidfd=pidfd,
            control=control,
            slot=slot,
            terminate_at=time.monotonic() + float(frame["timeout_s"]),
            grace_s=float(frame["grace_s"]),
        )
        self._executions[pidfd] = execution
        self._selector.register(pidfd, selectors.EVENT_READ, lambda: self._reap(execution))
        control.send({"op": "started", "ticket": execution.ticket, "pid": pid})

    def _become_execution(self, channel: int, output: int, slot: int, limits: sandbox.Limits) -> None:
        """In the clone: isolate, then run the one execution. Exits; never returns to the template's loop."""
        code = 70
        try:
            self._isolate(channel, output, slot, limits)
            code = runtime.main(channel_fd=3, memory=self._memory)
        except BaseException as e:
            with contextlib.suppress(Exception):
                os.write(2, f"modcache execution: {type(e).__name__}: {e}\n".encode())
        finally:
            os._exit(code)

    def _isolate(self, channel: int, output: int, slot: int, limits: sandbox.Limits) -> None:
        iso = self._isolation
        if not iso.namespaces:
            os.setsid()  # at least a process group the deadline can signal
        sandbox.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the template ...
        if select_readable(self._self_pidfd):  # ... which may have died before that took effect
            os._exit(1)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGPIPE else signal.SIG_IGN)
        signal.signal(signal.SIGTERM, runtime.terminated)  # pid 1 of its namespace gets SIGTERM only with a handler
        sandbox.keep_only_fds(channel, output)
        if iso.user_namespace:
            sandbox.enter_user_namespace(os.getuid(), os.getgid())
        if iso.namespaces:
            sandbox.private_mounts(limits.tmp_bytes)
        sandbox.apply_limits(limits)
        sandbox.drop_privileges(None if iso.uid_base is None else iso.uid_base + slot)
        os.environ.clear()
        os.environ.update(_EXECUTION_ENV)
        os.chdir("/tmp")

    def _free_slot(self) -> int:
        taken = {e.slot for e in self._executions.values()}
        return next(n for n in range(len(taken) + 1) if n not in taken)

    def _reap(self, execution: Execution) -> None:
        self._selector.unregister(execution.pidfd)
        del self._executions[execution.pidfd]
        os.close(execution.pidfd)
        _, status = os.waitpid(execution.pid, 0)
        execution.control.send({
            "op": "exited",
            "ticket": execution.ticket,
            "pid": execution.pid,
            "returncode": os.waitstatus_to_exitcode(status),
            "timed_out": execution.timed_out,
            "stopped": execution.stopped,
        })  # fmt: skip

    def _signal(self, execution: Execution, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(execution.pidfd, sig)
            if not self._isolation.namespaces:
                os.killpg(execution.pid, sig)

    # -- timers ---------------------------------------------------------------------------------------------

    def _next_timer(self) -> float | None:
        times = [e.kill_at if e.kill_at is not None else e.terminate_at for e in self._executions.values()]
        return max(0.0, min(times) - time.monotonic()) if times else None

    def _fire_timers(self) -> None:
        now = time.monotonic()
        for execution in list(self._executions.values()):
            if execution.kill_at is None and now >= execution.terminate_at:
                execution.timed_out = True
                execution.kill_at = now + execution.grace_s
                self._signal(execution, signal.SIGTERM)
            elif execution.kill_at is not None and now >= execution.kill_at:
                execution.kill_at = now + 3600.0  # signalled; the pidfd reports the end
                self._signal(execution, signal.SIGKILL)


_EXECUTION_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}


def select_readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def warm_up() -> runtime.Memory:
    for name in WARM_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    return runtime.Memory()


def prepare(uid_base: int) -> sandbox.Isolation:
    """Once, before serving: non-dumpable, probe the namespaces, hide private trees (root only)."""
    sandbox.make_non_dumpable()
    isolation = sandbox.probe(uid_base)
    if isolation.uid_base is not None and isolation.namespaces:
        sandbox.hide_private_trees(sandbox.needed_trees([os.path.dirname(os.path.dirname(runtime.__file__))]))
    return isolation


def run(*, listener: socket.socket | None = None, control: socket.socket | None = None,
        uid_base: int = DEFAULT_UID_BASE) -> None:  # fmt: skip
    """Serve until SIGTERM (``listener``) or until ``control`` closes (child mode)."""
    isolation = prepare(uid_base)
    template = Template(isolation=isolation, memory=warm_up(), exit_with_last=control is not None)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: template.stop())
    template._selector.register(wake_r, selectors.EVENT_READ, lambda: _drain(wake_r))
    if listener is not None:
        listener.setblocking(False)
        template.listen(listener)
    if control is not None:
        template.attach(control)
    log.info("executor %d ready: %s", os.getpid(), isolation.describe())
    template.serve()


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError):
        sock.recv(4096)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m modcache_consumer.template")
    parser.add_argument("--socket", help="listen on this Unix socket path")
    parser.add_argument("--control-fd", type=int, help="serve the one consumer on this inherited descriptor")
    parser.add_argument("--parent", type=int, help="die with this parent process (child mode)")
    parser.add_argument("--uid-base", type=int, default=DEFAULT_UID_BASE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    if args.parent:
        sandbox.die_with_parent(args.parent)
    if args.control_fd is not None:
        run(control=socket.socket(fileno=args.control_fd), uid_base=args.uid_base)
    elif args.socket:
        run(listener=bind(args.socket), uid_base=args.uid_base)
    else:
        parser.error("--socket or --control-fd is required")


def bind(path: str) -> socket.socket:
    """A Unix socket at ``path`` that only this uid and its group (the consumer container's) may connect to."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o660)
    sock.listen(16)
    return sock


if __name__ == "__main__":
    main()
