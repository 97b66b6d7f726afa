"""Linux isolation primitives for execution processes, through libc (Python 3.11 has no ``os.unshare``/``mount``).

What an execution process gets, from the template that clones it (``template``):

* **its own PID namespace** (``clone(CLONE_NEWPID)``): the execution is pid 1 there, so every process it starts,
  ``setsid()`` and double-forked ones included, is killed by the kernel when it ends; it cannot see or signal
  any process outside, and ``/proc`` is remounted so no ancestor's ``/proc/<pid>`` entries exist for it;
* **its own network namespace** (only a loopback, down: no TCP/UDP anywhere, no abstract Unix socket of the
  host) and **its own IPC namespace** (SysV shared memory, semaphores, message queues);
* **its own mount namespace** with a private, size-capped tmpfs on ``/tmp`` (gone with the namespace);
* **an unprivileged uid** when the executor runs as root (one per concurrent execution, so ``RLIMIT_NPROC``,
  which the kernel counts per uid, bounds each execution on its own), no supplementary groups,
  ``PR_SET_NO_NEW_PRIVS``; when the executor is not root, a user namespace provides the other namespaces;
* ``PR_SET_PDEATHSIG(SIGKILL)``: it dies the moment its template dies;
* ``RLIMIT_AS``, ``RLIMIT_NPROC``, ``RLIMIT_FSIZE``, ``RLIMIT_CORE = 0``;
* no inherited descriptor except its channel and its output pipe.

``hide_private_trees`` runs once in the template: when the interpreter lives under a directory other users
cannot enter (``/root`` is mode 700 on these machines), the template's own mount namespace gets a read-only
tmpfs over that directory with only the interpreter's tree bind-mounted back, read-only, so the unprivileged
uid can still import the standard library and installed packages, and nothing else of ``/root`` is visible.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import resource
import select
import signal
import stat
import sys
from collections.abc import Iterable, Sequence

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
#: What an execution is cloned into, beyond PID + mount (+ user): no network but a down loopback (module content
#: comes over its channel), and SysV IPC / POSIX message queues of its own.
CLONE_EXECUTION = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC
_SYS_CLONE = 56  # x86_64
_SYS_CLOSE_RANGE = 436
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)
_held = ctypes.PyDLL(None, use_errno=True)  # keeps the GIL across clone(), as os.fork() does
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_held.syscall.restype = ctypes.c_long
_libc.syscall.restype = ctypes.c_long

#: Directories that hold the interpreter on some machines but that other users cannot enter.
PRIVATE_TREES = ("/root",)


class SandboxError(OSError):
    """An isolation step failed; the execution must not run."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-execution resource limits (None: not limited)."""

    memory_bytes: int | None = None
    processes: int | None = 64
    file_bytes: int | None = 64 * 1024**2


@dataclasses.dataclass(frozen=True)
class Isolation:
    """What this template can give its executions, probed once at start."""

    namespaces: bool  # PID + mount namespaces per execution
    user_namespace: bool  # they need a user namespace (the template is not root)
    uid_base: int | None  # executions run as uid_base + slot (the template is root), else as the template's uid

    def describe(self) -> str:
        ns = "PID+mount+network+IPC namespaces" + (" in a user namespace" if self.user_namespace else "")
        who = f"uid {self.uid_base}+slot" if self.uid_base is not None else f"uid {os.getuid()}"
        return f"{ns if self.namespaces else 'process group only (no namespaces)'}, {who}"


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise SandboxError(code, f"{what}: {os.strerror(code)}")
    return result


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encoded = [None if v is None else v.encode() for v in (source, target, fstype)]
    _check(
        _libc.mount(encoded[0], encoded[1], encoded[2], flags, None if data is None else data.encode()),
        f"mount {target}",
    )


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, value, 0, 0, 0), f"prctl {option}")


def clone(flags: int) -> int:
    """fork() into new namespaces: 0 in the child, its pid in the parent. Python's fork hooks run as for
    ``os.fork`` (the template is single-threaded)."""
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _held.syscall(_SYS_CLONE, ctypes.c_ulong(flags | signal.SIGCHLD), None, None, None, None)
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    return _check(int(pid), "clone")


def die_with_template(pidfd: int) -> None:
    """SIGKILL when the template dies (again after every credential change, which clears it); if it died
    already, die now."""
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    if poller.poll(0):
        os._exit(1)


def make_non_dumpable() -> None:
    """Same-uid processes can no longer read this process's ``/proc/<pid>/environ|mem`` or ptrace it."""
    prctl(_PR_SET_DUMPABLE, 0)


def become_subreaper() -> None:
    prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(expected_parent: int) -> None:
    """SIGKILL when the parent dies; if it died already (before the prctl took effect), die now."""
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != expected_parent:
        os._exit(1)


# -- probing and the template's own mount namespace -------------------------------------------------------


def probe(uid_base: int) -> Isolation:
    """What is available here: try a namespaced clone whose child exits at once."""
    root = os.geteuid() == 0
    outer = (os.getuid(), os.getgid())  # in the clone's new user namespace these read 65534
    for user in (False, True) if root else (True,):
        flags = CLONE_EXECUTION | (CLONE_NEWUSER if user else 0)
        try:
            pid = clone(flags)
        except SandboxError:
            continue
        if pid == 0:
            os._exit(_try_namespaces(user, outer))
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) == 0:
            return Isolation(namespaces=True, user_namespace=user, uid_base=uid_base if root else None)
    return Isolation(namespaces=False, user_namespace=False, uid_base=uid_base if root else None)


def _try_namespaces(user: bool, outer: tuple[int, int]) -> int:
    """In the probe's clone: what an execution will do with its namespaces; 0 if all of it works."""
    try:
        if user:
            enter_user_namespace(*outer)
        private_mounts(())
        mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777,size=4k")
    except OSError:
        return 1
    return 0


def needed_trees(paths: Iterable[str] = ()) -> list[str]:
    """The interpreter's directories that lie under a private tree (collapsed: no path inside another)."""
    wanted = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, *sys.path, *paths) if p}
    inside = sorted(p for p in wanted if any(p.startswith(t + "/") for t in PRIVATE_TREES) and os.path.isdir(p))
    collapsed: list[str] = []
    for path in inside:
        if not any(path.startswith(kept + "/") for kept in collapsed):
            collapsed.append(path)
    return collapsed


def hide_private_trees(keep: Sequence[str]) -> None:
    """In a mount namespace of the template's own: a read-only tmpfs over each private tree holding ``keep``,
    with ``keep`` bind-mounted back read-only. Root only; mounts never propagate to the host."""
    unshare(CLONE_NEWNS)
    mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    for tree in PRIVATE_TREES:
        inner = [k for k in keep if k.startswith(tree + "/")]
        if not inner:
            continue
        handles = [os.open(k, os.O_PATH | os.O_DIRECTORY) for k in inner]
        mount("tmpfs", tree, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=755,size=1m")
        for path, handle in zip(inner, handles, strict=True):
            os.makedirs(path, exist_ok=True)
            mount(f"/proc/self/fd/{handle}", path, None, _MS_BIND | _MS_REC)
            mount(None, path, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
            os.close(handle)
        mount("tmpfs", tree, "tmpfs", _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "mode=755,size=1m")


# -- inside a freshly cloned execution process (before any workflow code) ---------------------------------


def keep_only_fds(channel: int, output: int, parent: int | None = None) -> None:
    """fd 0 = /dev/null, 1 and 2 = the output pipe, 3 = the channel, 4 = ``parent`` (a pidfd of the template,
    if given); every other descriptor closed."""
    os.dup2(channel, 3)
    os.dup2(output, 1)
    os.dup2(output, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    first_closed = 4
    if parent is not None:
        os.dup2(parent, 4)
        first_closed = 5
    if _libc.syscall(_SYS_CLOSE_RANGE, first_closed, ctypes.c_uint(0xFFFFFFFF), 0) < 0:
        os.closerange(first_closed, os.sysconf("SC_OPEN_MAX"))


def enter_user_namespace(outer_uid: int, outer_gid: int) -> None:
    """Map the template's uid/gid (read before the clone) to root in the new user namespace (what ``unshare -r``
    does). Dumpable first: a non-dumpable process's ``/proc/self`` files are owned by the outer root, which is
    unmapped here (EACCES on ``setgroups``); the execution is alone in its PID namespace, so no other process of
    that uid can reach it."""
    prctl(_PR_SET_DUMPABLE, 1)
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {outer_uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {outer_gid} 1")


#: World-writable directories every execution gets a private, empty tmpfs of its own on.
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


def private_mounts(hidden: Sequence[str] = ()) -> None:
    """``/proc`` of the execution's own PID namespace, and an empty read-only tmpfs over each of ``hidden``
    (the executor's socket directory)."""
    flags = _MS_NOSUID | _MS_NODEV
    mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    try:
        mount("proc", "/proc", "proc", flags | _MS_NOEXEC)
    except SandboxError as e:
        if e.errno != errno.EPERM:  # a container's masked /proc refuses a new proc mount: keep the old one
            raise
    for path in hidden:
        if os.path.isdir(path) and not _holds_interpreter(path):
            mount("tmpfs", path, "tmpfs", flags | _MS_RDONLY | _MS_NOEXEC, "mode=755,size=4k")


def scratch_mounts(tmp_bytes: int) -> None:
    """A private, empty tmpfs of ``tmp_bytes`` on each of ``SCRATCH_DIRS``. The interpreter's own directories
    that lie under one of them (a virtualenv in a checkout under ``/tmp``, as CI makes) are bind-mounted back,
    read-only, so the execution still imports the standard library and installed packages."""
    trees = _import_trees()
    for scratch in SCRATCH_DIRS:
        if not os.path.isdir(scratch):
            continue
        real = os.path.realpath(scratch)
        inner = [tree for tree in trees if tree.startswith(real + "/")]
        handles = [os.open(tree, os.O_PATH | os.O_DIRECTORY) for tree in inner]
        mount("tmpfs", scratch, "tmpfs", _MS_NOSUID | _MS_NODEV, f"mode=1777,size={tmp_bytes}")
        for tree, handle in zip(inner, handles, strict=True):
            os.makedirs(tree, mode=0o755, exist_ok=True)
            mount(f"/proc/self/fd/{handle}", tree, None, _MS_BIND | _MS_REC)
            mount(None, tree, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
            os.close(handle)


def _import_trees() -> list[str]:
    """Where the interpreter and its imports live (real paths, none inside another). A directory other users
    cannot enter (a checkout in ``mktemp -d``, mode 700, on ``sys.path`` as the working directory) is never
    bound back whole: it would keep its mode and hide the import trees inside it from the execution's uid, so
    those trees are bound back one by one instead."""
    wanted = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, os.path.dirname(__file__), *sys.path) if p}
    collapsed: list[str] = []
    for path in sorted(p for p in wanted if _enterable_by_others(p)):
        if not any(path.startswith(kept + "/") for kept in collapsed):
            collapsed.append(path)
    return collapsed


def _enterable_by_others(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISDIR(mode) and bool(mode & stat.S_IXOTH)


def _holds_interpreter(path: str) -> bool:
    """Hiding ``path`` would hide the interpreter or the code the execution imports (``/``, ``/usr``, ...)."""
    real = os.path.realpath(path).rstrip("/") + "/"
    needed = (sys.base_prefix, sys.prefix, os.path.dirname(__file__), *sys.path)
    return any((os.path.realpath(p).rstrip("/") + "/").startswith(real) for p in needed if p)


def apply_limits(limits: Limits) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for which, value in (
        (resource.RLIMIT_AS, limits.memory_bytes),
        (resource.RLIMIT_NPROC, limits.processes),
        (resource.RLIMIT_FSIZE, limits.file_bytes),
    ):
        if value is not None:
            resource.setrlimit(which, (value, value))


def drop_privileges(uid: int | None, *, dumpable: bool) -> None:
    """Become ``uid`` (from root), or, in a user namespace, give up the capabilities it granted. ``dumpable``
    only for a process alone in its PID namespace: a dumpable process's memory is readable by its uid's others."""
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    prctl(_PR_SET_NO_NEW_PRIVS, 1)
    if uid is None:
        _drop_capabilities()
    prctl(_PR_SET_DUMPABLE, 1 if dumpable else 0)  # the uid change made it non-dumpable: /proc/self is root's


def _drop_capabilities() -> None:
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header = Header(0x20080522, 0)
    data = (Data * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")
