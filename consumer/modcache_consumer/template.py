"""The executor side: a warm template process that clones one fresh, isolated process per execution.

``modcache executor --socket PATH`` (Kubernetes: its own container, no Secret, no token, a writable ``/tmp``
only) or, when ``MODCACHE_EXECUTOR_SOCKET`` is unset, a child the consumer starts itself on a socketpair (so
``modcache consumer`` stays one command on a laptop). It has imported the runtime and much of the standard
library, but never runs workflow or workspace-module code: an execution is a ``clone`` of it (``sandbox``),
which runs ``runtime.main`` once and exits, so no interpreter ever runs code of two executions.

Single-threaded (a ``selectors`` loop), because it forks. Per control connection (``protocol``):

* spares: fresh clones, already in their PID and mount namespaces, blocked reading their channel, whose other
  end (and output pipe) is handed to the consumer; the consumer writes a job there and the clone applies its
  limits, drops to its uid and runs it at once. The template never sees a job;
* ``run`` -> the deadline: SIGTERM at ``timeout_s``, SIGKILL ``grace_s`` later; ``stop`` -> SIGKILL now;
* ``run``'s ``lease_until`` and ``lease`` (``tickets``, ``until``) -> the lease deadline: the consumer says until
  when (CLOCK_BOOTTIME, absolute: a frame delayed in the socket moves nothing) each execution's lease is surely
  still its own, and extends that after each renewal; past it, SIGKILL. A
  consumer that stalls (SIGSTOP, a frozen container, a partitioned database) without dying stops extending, so its
  runs end before their leases expire and before anyone else may start them again (attack-10 F1);
* a pidfd per execution says when it is gone -> ``exited`` (the PID namespace, and every descendant, died
  with it);
* the connection closing (the consumer died, even by SIGKILL) -> every execution of that connection is killed
  at once; a child-mode template then exits. Executions also carry ``PR_SET_PDEATHSIG``: if the template
  dies, they die.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import dataclasses
import errno
import gc
import importlib
import logging
import math
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from modcache_consumer import protocol, runtime, sandbox, uids

log = logging.getLogger("modcache_consumer.template")

#: Imported once here, so executions start with them loaded (not ssl: OpenSSL's RNG must not be cloned).
WARM_MODULES = (
    "asyncio", "base64", "collections", "csv", "dataclasses", "datetime", "decimal", "email", "email.message",
    "email.utils", "functools", "hashlib", "hmac", "http.client", "inspect", "io", "itertools", "json", "logging",
    "math", "pathlib", "random", "re", "sqlite3", "statistics", "string", "struct", "subprocess", "tempfile",
    "textwrap", "traceback", "typing", "urllib.parse", "uuid", "zoneinfo",
)  # fmt: skip
SECCOMP_REFUSED = (
    "executions cannot be given their system-call filter here ({reason}): they could create nested user "
    "namespaces and reach kernel interfaces no workflow needs; refusing to run. Every distribution kernel has "
    "seccomp filters (CONFIG_SECCOMP_FILTER); under a container runtime, allow seccomp(2)/prctl(PR_SET_SECCOMP)"
)
SHARED_UID_REFUSED = (
    "no PID/user namespaces here and not root: every execution would run as one uid and could read the memory "
    "of every other (other organizations' secrets); refusing to run. Run the executor as root, allow user "
    "namespaces, or set MODCACHE_EXECUTOR_ALLOW_SHARED_UID=true (unsafe for more than one tenant)"
)
CONSUMER_UID_REQUIRED = (
    "a root executor on a socket needs --consumer-uid (MODCACHE_EXECUTOR_CONSUMER_UID): the uid of the consumer "
    "allowed to connect; without it any local user could hold execution processes and run code as execution "
    "uids here (attack-8c C2); refusing to run"
)
#: What a job may ask for at most: the consumer's longest execution (MODCACHE_EXECUTION_TIMEOUT_S, default 1800)
#: and its grace (MODCACHE_TERMINATE_GRACE_S, default 5); the consumer passes its own values to its executor.
DEFAULT_MAX_TIMEOUT_S = 1800.0
DEFAULT_MAX_GRACE_S = 5.0
MAX_SLOTS = uids.BLOCK  # execution uids are uid_base .. uid_base + MAX_SLOTS - 1
MAX_FDS_PER_MESSAGE = 16


@dataclasses.dataclass(eq=False)
class Control:
    """One consumer's connection, and the spares handed to it (by pid)."""

    sock: socket.socket
    frames: protocol.Frames = dataclasses.field(
        default_factory=lambda: protocol.Frames(limit=protocol.MAX_CONTROL_FRAME_BYTES)
    )
    spares: dict[int, Spare] = dataclasses.field(default_factory=dict)
    #: What this consumer taught: only the clones handed to it inherit it (another connection, even a rogue
    #: local peer that got past the checks, teaches its own clones only; attack-8b A5).
    memory: runtime.Memory = dataclasses.field(default_factory=runtime.Memory)
    #: What this consumer said every job of its will be limited to (a ``limits`` frame): its spares are cloned
    #: isolated already (limits, read-only mounts and scratch, uid, seccomp), so a job starts at once; None: each
    #: clone isolates itself when its job arrives.
    limits: dict[str, Any] | None = None

    def send(self, frame: Any, fds: list[int] | None = None) -> bool:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        data = protocol.encode(frame)
        try:
            sent = self.sock.sendmsg([data], ancillary)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except OSError:  # a consumer that is gone learns nothing; its executions die anyway
            return False
        return True


@dataclasses.dataclass(eq=False)
class Spare:
    """A fresh clone that never ran anything, blocked reading its channel: the consumer holds the other end."""

    pid: int
    pidfd: int
    slot: int


@dataclasses.dataclass(eq=False)
class Execution:
    ticket: int
    spare: Spare
    control: Control
    terminate_at: float
    grace_s: float
    kill_at: float | None = None
    lease_until: float = math.inf  # the consumer's lease on it is surely valid until then (CLOCK_BOOTTIME)
    timed_out: bool = False
    stopped: bool = False
    lease_expired: bool = False


class Template:
    def __init__(
        self,
        *,
        isolation: sandbox.Isolation,
        exit_with_last: bool,
        hidden: tuple[str, ...] = (),
        spares: int = 2,
        allowed_uids: frozenset[int] | None = None,
        host_network: bool = False,
        max_timeout_s: float = DEFAULT_MAX_TIMEOUT_S,
        max_grace_s: float = DEFAULT_MAX_GRACE_S,
    ) -> None:
        self._isolation = isolation
        self._max_timeout_s = max_timeout_s
        self._max_grace_s = max_grace_s
        self._host_network = host_network
        self._allowed_uids = allowed_uids
        self._outer_ids = (os.getuid(), os.getgid())  # before any clone: inside a new user namespace, 65534
        self._hidden = sandbox.hideable(hidden)
        self._exit_with_last = exit_with_last
        self._spares_per_consumer = spares
        self._selector = selectors.DefaultSelector()
        self._executions: dict[int, Execution] = {}  # by pid
        self._processes: dict[int, Spare] = {}  # every clone alive, by pid
        self._controls: set[Control] = set()
        self._running = True
        self._pid = os.getpid()
        self._self_pidfd = os.pidfd_open(self._pid)  # a clone checks it to see that its template lives
        self._filter = sandbox.SyscallFilter(sandbox.execution_filter())
        self._other_scratch = sandbox.other_world_writable_dirs() if isolation.namespaces else ()
        self._import_trees = sandbox.import_trees() if isolation.namespaces else []  # once: every clone mounts them

    # -- the loop -------------------------------------------------------------------------------------------

    def listen(self, sock: socket.socket) -> None:
        self._selector.register(sock, selectors.EVENT_READ, lambda: self._accept(sock))

    def attach(self, sock: socket.socket) -> None:
        control = Control(sock=sock)
        self._controls.add(control)
        self._selector.register(sock, selectors.EVENT_READ, lambda: self._read(control))
        control.send({
            "op": "hello",
            "pid": self._pid,
            "isolation": self._isolation.describe(),
            "namespaces": self._isolation.namespaces,
            "seccomp": self._isolation.seccomp,
            "prelimits": True,  # a "limits" frame makes this connection's spares isolate before their job
            # executions all run as this uid (outside any user namespace), or None: a uid per slot
            "execution_uid": self._outer_ids[0] if self._isolation.uid_base is None else None,
        })  # fmt: skip
        self._offer(control)

    def stop(self) -> None:
        self._running = False

    def serve(self) -> None:
        while self._running or self._executions:
            for key, _ in self._selector.select(self._next_timer()):
                key.data()
            self._fire_timers()
            if not self._running:
                for execution in list(self._executions.values()):
                    self._signal(execution.spare, signal.SIGKILL)
        for clone in list(self._processes.values()):  # spares nobody holds any more
            self._signal(clone, signal.SIGKILL)

    def _accept(self, listener: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            sock, _ = listener.accept()
            refused = self._refuse_peer(sock)
            if refused:
                log.warning("executor: refused a control connection: %s", refused)
                sock.close()
                return
            sock.setblocking(True)
            self.attach(sock)

    def _refuse_peer(self, sock: socket.socket) -> str | None:
        """Why the peer of an accepted connection may not control this template (None: it may). Only a
        consumer may: never one of this template's executions or anything they started (descendants of this
        template, or an execution uid), and, if ``allowed_uids`` is set, only those uids."""
        pid, uid, _ = peer_credentials(sock)
        # pid 0: the peer is outside this template's PID namespace (the chart's consumer container). No execution
        # is: their namespaces are nested in this one, so each is visible here with a pid (attack-8b A9).
        if pid < 0 or (pid > 0 and descends_from(pid, self._pid)):
            return f"pid {pid} is one of this executor's executions (or unknown)"
        base = self._isolation.uid_base
        if base is not None and base <= uid < base + MAX_SLOTS:
            return f"uid {uid} is an execution uid"
        if self._allowed_uids is not None and uid not in self._allowed_uids:
            return f"uid {uid} is not an allowed consumer uid"
        return None

    def _read(self, control: Control) -> None:
        try:
            data = control.sock.recv(1 << 16)
        except OSError:
            data = b""
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
            if control not in self._controls:
                return
            self._dispatch(control, frame)

    def _dispatch(self, control: Control, frame: dict[str, Any]) -> None:
        """One control frame; a malformed one closes its connection, never the template."""
        try:
            self._obey(control, frame)
        except Exception as e:  # whatever a frame did, it never ends the template (attack-8b A1)
            log.error("executor: a malformed control frame (%s); closing that connection", type(e).__name__)
            self._lose(control)

    def _obey(self, control: Control, frame: dict[str, Any]) -> None:
        op = frame["op"] if isinstance(frame, dict) else None
        if op == "run":
            self._start(control, frame)
        elif op == "stop":
            for execution in self._of(control, {int(frame["ticket"])}):
                execution.stopped = True
                self._signal(execution.spare, signal.SIGKILL)
        elif op == "lease":
            until = _instant(frame["until"])
            for execution in self._of(control, {int(t) for t in frame["tickets"]}):
                execution.lease_until = until
        elif op == "limits":  # every job of this connection will carry these: its spares isolate beforehand
            control.limits = _job_limits(frame["limits"])
            self._renew_spares(control)
        elif op == "learn":  # from a consumer only: _refuse_peer turned executions away
            control.memory.learn(frame)  # type: ignore[arg-type]
            freeze()  # what it compiled too
        elif op == "spares":  # the consumer dropped these: new ones, cloned from the new memory
            for pid in frame.get("dropped", []):
                spare = control.spares.pop(int(pid), None)
                if spare is not None:
                    self._signal(spare, signal.SIGKILL)
            self._offer(control)
        else:
            raise ValueError(f"unknown op {op!r}")

    def _of(self, control: Control, tickets: set[int]) -> list[Execution]:
        """The executions ``control`` started under ``tickets``."""
        return [e for e in self._executions.values() if e.control is control and e.ticket in tickets]

    def _lose(self, control: Control) -> None:
        """The consumer is gone: every execution it started, and every spare it held, dies now."""
        self._controls.discard(control)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(control.sock)
        control.sock.close()
        for execution in self._executions.values():
            if execution.control is control:
                self._signal(execution.spare, signal.SIGKILL)
        for spare in control.spares.values():
            self._signal(spare, signal.SIGKILL)
        control.spares.clear()
        if self._exit_with_last and not self._controls:
            self._running = False

    # -- spares and executions ------------------------------------------------------------------------------

    def _renew_spares(self, control: Control) -> None:
        """Replace the spares ``control`` holds (cloned before its limits were known); the consumer drops its
        ends of them when it sends ``limits``."""
        for spare in control.spares.values():
            self._signal(spare, signal.SIGKILL)
        control.spares.clear()
        control.send({"op": "limited"})  # every spare offered before this is gone; those after are isolated
        self._offer(control)

    def _offer(self, control: Control) -> None:
        """Keep ``spares`` fresh clones waiting in this consumer's hands: it writes a job on one's channel and
        the clone runs it at once (no clone on the hot path)."""
        while self._running and control in self._controls and len(control.spares) < self._spares_per_consumer:
            spare, channel, output = self._clone(control.memory, control.limits)
            if spare is None:
                return
            sent = control.send({"op": "spare", "pid": spare.pid}, fds=[channel, output])
            os.close(channel)
            os.close(output)
            if not sent:
                self._signal(spare, signal.SIGKILL)
                return
            control.spares[spare.pid] = spare

    def _start(self, control: Control, frame: dict[str, Any]) -> None:
        """The consumer wrote a job on a spare's channel: its deadline starts now."""
        ticket, timeout_s, grace_s = int(frame["ticket"]), float(frame["timeout_s"]), float(frame["grace_s"])
        if not (math.isfinite(timeout_s) and math.isfinite(grace_s)):
            raise ValueError("non-finite deadline")
        # No connection holds a clone longer than the consumer's longest execution and its grace (attack-8c C2).
        timeout_s, grace_s = min(timeout_s, self._max_timeout_s), min(grace_s, self._max_grace_s)
        lease_until = _instant(frame["lease_until"]) if frame.get("lease_until") is not None else math.inf
        spare = control.spares.pop(int(frame["pid"]), None)
        if spare is None:
            control.send({"op": "exited", "ticket": ticket, "pid": 0, "returncode": 127,
                          "timed_out": False, "stopped": False})  # fmt: skip
            return
        self._executions[spare.pid] = Execution(
            ticket=ticket,
            spare=spare,
            control=control,
            terminate_at=time.monotonic() + timeout_s,
            grace_s=grace_s,
            lease_until=lease_until,
        )
        self._offer(control)

    def _clone(self, memory: runtime.Memory, limits: dict[str, Any] | None = None) -> tuple[Spare | None, int, int]:
        """A fresh clone (inheriting ``memory``: its consumer's lessons) blocked on its channel; returns it with the
        consumer's ends (channel, output)."""
        ours, theirs = socket.socketpair()
        try:
            slot = self._free_slot()
        except sandbox.SandboxError as e:
            log.error("executor: cannot clone an execution process: %s", e)
            ours.close()
            theirs.close()
            return None, -1, -1
        out_r, out_w = os.pipe()
        flags = sandbox.CLONE_EXECUTION if self._isolation.namespaces else 0
        if self._host_network:
            flags &= ~sandbox.CLONE_NEWNET
        if self._isolation.user_namespace:
            flags |= sandbox.CLONE_NEWUSER
        try:
            pid = sandbox.clone(flags)
        except sandbox.SandboxError as e:
            log.error("executor: cannot clone an execution process: %s", e)
            pid = -1
        if pid == 0:
            self._become_execution(theirs.detach(), out_w, slot, memory, limits)  # never returns
        theirs.close()
        os.close(out_w)
        if pid < 0:
            ours.close()
            os.close(out_r)
            return None, -1, -1
        spare = Spare(pid=pid, pidfd=os.pidfd_open(pid), slot=slot)
        self._processes[pid] = spare
        self._selector.register(spare.pidfd, selectors.EVENT_READ, lambda: self._reap(spare))
        return spare, ours.detach(), out_r

    def _free_slot(self) -> int:
        """The lowest slot no live clone has; never one outside this executor's uid range."""
        taken = {p.slot for p in self._processes.values()}
        slot = next(n for n in range(len(taken) + 1) if n not in taken)
        if slot >= MAX_SLOTS:
            raise sandbox.SandboxError(errno.EAGAIN, f"all {MAX_SLOTS} execution slots are in use")
        return slot

    def _reap(self, spare: Spare) -> None:
        self._selector.unregister(spare.pidfd)
        os.close(spare.pidfd)
        del self._processes[spare.pid]
        _, status = os.waitpid(spare.pid, 0)
        if not self._isolation.namespaces:
            self._sweep()
        execution = self._executions.pop(spare.pid, None)
        if execution is None:  # a spare that never got a job (dropped by its consumer, or killed)
            for control in self._controls:
                control.spares.pop(spare.pid, None)
            return
        execution.control.send({
            "op": "exited",
            "ticket": execution.ticket,
            "pid": spare.pid,
            "returncode": os.waitstatus_to_exitcode(status),
            "timed_out": execution.timed_out,
            "stopped": execution.stopped,
            "lease_expired": execution.lease_expired,
        })  # fmt: skip

    def _sweep(self) -> None:
        """Without a PID namespace: orphans of finished executions were reparented to this subreaper; kill
        every child that is not a live clone, until none is left."""
        for _ in range(100):
            strays = [pid for pid in _children(self._pid) if pid not in self._processes]
            if not strays:
                return
            for pid in strays:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in strays:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)

    def _signal(self, spare: Spare, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(spare.pidfd, sig)
            if not self._isolation.namespaces:
                os.killpg(spare.pid, sig)

    # -- inside the clone ----------------------------------------------------------------------------------

    def _become_execution(
        self, channel: int, output: int, slot: int, memory: runtime.Memory, limits: dict[str, Any] | None
    ) -> None:
        """In the clone: isolate what needs no job, wait for the job on the channel, isolate the rest (its
        limits, its uid), run it, exit. With ``limits`` (its consumer's, known beforehand) the rest is done
        before the job arrives too, and a job asking for other limits is refused. Never returns to the
        template's loop."""
        code = 70
        try:
            self._prepare_clone(channel, output)
            if limits is not None:
                self._isolate({"limits": limits}, slot)
                runtime.rehearse()  # while it waits: the job's path touched once (its copy-on-write faults)
                isolate = _require_limits(limits)
            else:
                isolate = lambda job: self._isolate(job, slot)  # noqa: E731
            code = runtime.main(channel_fd=3, memory=memory, isolate=isolate)
        except BaseException as e:
            with contextlib.suppress(Exception):
                os.write(2, f"modcache execution: {type(e).__name__}: {e}\n".encode())
        finally:
            os._exit(code)

    def _prepare_clone(self, channel: int, output: int) -> None:
        iso = self._isolation
        if not iso.namespaces:
            os.setsid()  # at least a process group the deadline can signal
        sandbox.die_with_template(self._self_pidfd)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGPIPE else signal.SIG_IGN)
        signal.signal(signal.SIGTERM, runtime.terminated)  # pid 1 of its namespace gets SIGTERM only with a handler
        sandbox.keep_only_fds(channel, output, parent=self._self_pidfd)  # fd 4: the template's pidfd
        if iso.user_namespace:
            sandbox.enter_user_namespace(*self._outer_ids)
        if iso.namespaces:
            sandbox.private_mounts(self._hidden)
        else:
            sandbox.make_non_dumpable()  # same-uid executions cannot read each other's memory

    def _isolate(self, job: dict[str, Any], slot: int) -> None:
        """After the job arrived, before anything of it runs: its limits and uid."""
        limits = job.get("limits") or {}
        if self._isolation.namespaces:
            sandbox.read_only_everywhere()  # then the scratch mounts, the only writable places
            tmp_bytes = int(limits.get("tmp_bytes") or 64 * 1024**2)
            sandbox.scratch_mounts(tmp_bytes, self._other_scratch, self._import_trees)
        sandbox.apply_limits(
            sandbox.Limits(
                memory_bytes=limits.get("memory_bytes"),
                processes=limits.get("processes"),
                file_bytes=limits.get("file_bytes"),
            )
        )
        sandbox.drop_privileges(
            None if self._isolation.uid_base is None else self._isolation.uid_base + slot,
            dumpable=self._isolation.namespaces,  # without a PID namespace of its own, others of its uid see it
        )
        sandbox.die_with_template(4)  # the uid change cleared PR_SET_PDEATHSIG
        os.close(4)
        os.environ.clear()
        os.environ.update(_EXECUTION_ENV)
        os.chdir("/tmp")
        self._filter.install()  # last: nothing of the job has run yet (NO_NEW_PRIVS is set)

    # -- timers ---------------------------------------------------------------------------------------------

    def _next_timer(self) -> float | None:
        mono, boot = time.monotonic(), _boottime()
        waits = [
            min(e.lease_until - boot, (e.terminate_at if e.kill_at is None else e.kill_at) - mono)
            for e in self._executions.values()
        ]
        return max(0.0, min(waits)) if waits else None

    def _fire_timers(self) -> None:
        now, boot = time.monotonic(), _boottime()
        for execution in list(self._executions.values()):
            if boot >= execution.lease_until:  # its consumer stopped extending its lease: it may not outlive it
                execution.lease_expired, execution.lease_until = True, math.inf
                execution.kill_at = now + 3600.0  # signalled; the pidfd reports the end
                self._signal(execution.spare, signal.SIGKILL)
            elif execution.kill_at is None and now >= execution.terminate_at:
                execution.timed_out = True
                execution.kill_at = now + execution.grace_s
                self._signal(execution.spare, signal.SIGTERM)
            elif execution.kill_at is not None and now >= execution.kill_at:
                execution.kill_at = now + 3600.0  # signalled; the pidfd reports the end
                self._signal(execution.spare, signal.SIGKILL)


def _job_limits(raw: Any) -> dict[str, Any]:
    """The limits a ``limits`` frame announces, as a job carries them (a malformed frame raises: see _dispatch)."""
    if not isinstance(raw, dict):
        raise ValueError("limits must be an object")
    limits = {name: raw.get(name) for name in ("memory_bytes", "processes", "file_bytes", "tmp_bytes")}
    for value in limits.values():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError("a limit must be a positive integer or null")
    return limits


def _require_limits(applied: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """The check of a job against the limits its clone applied before it arrived: the same, or refused (a
    clone can tighten nothing it gave up already, and must not run under looser limits than asked)."""

    def check(job: dict[str, Any]) -> None:
        if _job_limits(job.get("limits") or {}) != applied:
            raise sandbox.SandboxError(errno.EINVAL, "the job's limits differ from those its spare was isolated with")

    return check


_EXECUTION_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _instant(value: Any) -> float:
    """A finite CLOCK_BOOTTIME instant from a control frame (anything else is a malformed frame)."""
    instant = float(value)
    if not math.isfinite(instant):
        raise ValueError("not a finite instant")
    return instant


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of a Unix socket's peer, as the kernel recorded them at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether ``pid`` is ``ancestor`` or one of its descendants (an unknown pid counts as one: fail closed)."""
    for _ in range(4096):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        try:
            with open(f"/proc/{pid}/status") as f:
                pid = next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
        except (OSError, StopIteration, ValueError):
            return True
    return True


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def warm_up() -> None:
    for name in WARM_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def freeze() -> None:
    """Move every object the template holds now out of the collector's reach (``gc.freeze``): a clone's
    collections then never walk, and so never write to (copy-on-write), the pages of the template's own objects
    (modules, compiled code), only what the execution allocated itself."""
    gc.collect()
    gc.freeze()


def prepare(uid_base: int | None, *, namespaces: bool = True) -> tuple[sandbox.Isolation, str | None]:
    """Once, before serving: non-dumpable, probe the namespaces and the seccomp filter, hide private trees (root
    only). Returns the isolation and why executions cannot be filtered (None: they can)."""
    sandbox.make_non_dumpable()
    root_uid = uid_base if os.geteuid() == 0 else None
    isolation = sandbox.probe(uid_base) if namespaces else sandbox.Isolation(False, False, root_uid)
    unfiltered = sandbox.probe_seccomp(sandbox.execution_filter())
    isolation = dataclasses.replace(isolation, seccomp=unfiltered is None)
    if not isolation.namespaces:
        sandbox.become_subreaper()  # what an execution leaves behind is reparented here, and swept
    if isolation.uid_base is not None:
        sandbox.hide_private_trees(sandbox.needed_trees([os.path.dirname(os.path.dirname(runtime.__file__))]))
    return isolation, unfiltered


def run(
    *,
    listener: socket.socket | None = None,
    control: socket.socket | None = None,
    uid_base: int | None = None,
    namespaces: bool = True,
    hidden: tuple[str, ...] = (),
    allowed_uids: frozenset[int] | None = None,
    allow_shared_uid: bool = False,
    host_network: bool = False,
    max_timeout_s: float = DEFAULT_MAX_TIMEOUT_S,
    max_grace_s: float = DEFAULT_MAX_GRACE_S,
) -> None:
    """Serve until SIGTERM (``listener``) or until ``control`` closes (child mode). Under root, first claim a
    range of execution uids no other executor on this host holds (``uids``; held until this process ends)."""
    if listener is not None and os.geteuid() == 0 and allowed_uids is None:
        refuse(control, CONSUMER_UID_REQUIRED)
    claim = None
    if os.geteuid() == 0:
        try:
            claim = uids.claim(uid_base)
        except (uids.UidRangeError, OSError) as e:
            refuse(control, f"cannot claim execution uids: {e}")
        uid_base = claim.base
    isolation, unfiltered = prepare(uid_base, namespaces=namespaces)
    if unfiltered is not None:
        refuse(control, SECCOMP_REFUSED.format(reason=unfiltered))
    if not isolation.namespaces and isolation.uid_base is None and not allow_shared_uid:
        refuse(control, SHARED_UID_REFUSED)
    warm_up()
    freeze()
    template = Template(
        isolation=isolation,
        exit_with_last=control is not None,
        hidden=hidden,
        allowed_uids=allowed_uids,
        host_network=host_network,
        max_timeout_s=max_timeout_s,
        max_grace_s=max_grace_s,
    )
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


def refuse(control: socket.socket | None, reason: str) -> NoReturn:
    """Exit 78 (EX_CONFIG) saying why, in the log and, in child mode, to the consumer (a hello it reports)."""
    log.error("executor: %s", reason)
    if control is not None:
        with contextlib.suppress(OSError):
            control.sendall(protocol.encode({"op": "hello", "pid": os.getpid(), "refused": reason}))
    sys.exit(78)


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError):
        sock.recv(4096)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m modcache_consumer.template")
    parser.add_argument("--socket", help="listen on this Unix socket path")
    parser.add_argument("--control-fd", type=int, help="serve the one consumer on this inherited descriptor")
    parser.add_argument("--parent", type=int, help="die with this parent process (child mode)")
    parser.add_argument("--uid-base", type=int, help="under root: execution uids from here (default: a free range)")
    parser.add_argument("--no-namespaces", action="store_true", help="a process group per execution only")
    parser.add_argument("--consumer-uid", type=int, action="append", help="only this uid may connect (repeatable)")
    parser.add_argument("--allow-shared-uid", action="store_true", help="UNSAFE: one uid for all executions")
    parser.add_argument("--execution-network", choices=("none", "host"), default="none")
    parser.add_argument(
        "--max-timeout-s",
        type=float,
        default=DEFAULT_MAX_TIMEOUT_S,
        help="no execution runs longer than this (the consumer's MODCACHE_EXECUTION_TIMEOUT_S)",
    )
    parser.add_argument(
        "--max-grace-s",
        type=float,
        default=DEFAULT_MAX_GRACE_S,
        help="nor is given more grace after SIGTERM (the consumer's MODCACHE_TERMINATE_GRACE_S)",
    )
    args = parser.parse_args(argv)
    if not (0 < args.max_timeout_s < math.inf and 0 <= args.max_grace_s < math.inf):
        parser.error("--max-timeout-s must be positive and --max-grace-s non-negative, both finite")
    options: dict[str, Any] = {
        "allow_shared_uid": args.allow_shared_uid,
        "host_network": args.execution_network == "host",
        "uid_base": args.uid_base,
        "namespaces": not args.no_namespaces,
        "allowed_uids": frozenset(args.consumer_uid) if args.consumer_uid else None,
        "max_timeout_s": args.max_timeout_s,
        "max_grace_s": args.max_grace_s,
    }
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    if args.parent:
        sandbox.die_with_parent(args.parent)
    if args.control_fd is not None:
        run(control=socket.socket(fileno=args.control_fd), **options)
    elif args.socket:
        hidden = (os.path.dirname(os.path.abspath(args.socket)),)  # executions never see the socket
        run(listener=bind(args.socket), hidden=hidden, **options)
    else:
        parser.error("--socket or --control-fd is required")


def bind(path: str) -> socket.socket:
    """A Unix socket at ``path`` for the consumer, which runs as another uid (another container of the pod:
    the directory is a pod-private ``emptyDir``, hidden from executions by their mount namespace). Whoever
    reaches it may run code here: restrict it with ``--consumer-uid`` (the chart does; under root ``run``
    requires it); what a connection teaches reaches only the clones handed to that connection."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o666)  # whoever reaches it gets sandboxed executions only, never another's channel
    sock.listen(16)
    return sock


if __name__ == "__main__":
    main()
