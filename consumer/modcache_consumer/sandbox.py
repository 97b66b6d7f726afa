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
* no inherited descriptor except its channel and its output pipe;
* last, just before any of its job runs, **a seccomp filter** (``execution_filter``): no namespaces (nested user
  namespaces above all), mounts, ptrace, other processes' memory, keyrings, eBPF, perf, userfaultfd, io_uring,
  kernel modules or kexec, and the native x86_64 ABI only; ``fork``, threads and ``subprocess`` keep working.

``hide_private_trees`` runs once in the template: when the interpreter or the code it imports lives under a
directory other users cannot enter (``/root`` is mode 700 on these machines; a checkout made by ``mktemp -d``
is too), the template's own mount namespace gets a read-only tmpfs over that directory with only the import
trees bind-mounted back, read-only, so the unprivileged uid can still import the standard library and installed
packages, and nothing else of that directory is visible.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import os
import resource
import select
import signal
import stat
import struct
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
    seccomp: bool = False  # the system-call filter (``execution_filter``) works here

    def describe(self) -> str:
        ns = "PID+mount+network+IPC namespaces" + (" in a user namespace" if self.user_namespace else "")
        who = f"uid {self.uid_base}+slot" if self.uid_base is not None else f"uid {os.getuid()}"
        filtered = ", seccomp filter" if self.seccomp else ", NO seccomp filter"
        return f"{ns if self.namespaces else 'process group only (no namespaces)'}, {who}{filtered}"


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


def probe(uid_base: int | None) -> Isolation:
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
    """The import trees (``import_trees``, plus ``paths``) that lie inside a directory other users cannot enter."""
    return [tree for tree in import_trees(paths) if _private_ancestor(tree) is not None]


def hide_private_trees(keep: Sequence[str]) -> None:
    """In a mount namespace of the template's own: a read-only tmpfs over each directory other users cannot
    enter that holds one of ``keep``, with ``keep`` bind-mounted back read-only. Root only; mounts never
    propagate to the host."""
    unshare(CLONE_NEWNS)
    mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    for tree in sorted({a for a in map(_private_ancestor, keep) if a is not None}):
        inner = [k for k in keep if k.startswith(tree + "/")]
        handles = [os.open(k, os.O_PATH | os.O_DIRECTORY) for k in inner]
        mount("tmpfs", tree, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=755,size=1m")
        for path, handle in zip(inner, handles, strict=True):
            os.makedirs(path, exist_ok=True)
            mount(f"/proc/self/fd/{handle}", path, None, _MS_BIND | _MS_REC)
            mount(None, path, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
            os.close(handle)
        mount("tmpfs", tree, "tmpfs", _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "mode=755,size=1m")


def _private_ancestor(path: str) -> str | None:
    """The outermost directory on the way to ``path`` (``path`` excluded) that other users cannot enter."""
    parts = os.path.realpath(path).strip("/").split("/")
    for depth in range(1, len(parts)):
        ancestor = "/" + "/".join(parts[:depth])
        if not _enterable_by_others(ancestor):
            return ancestor
    return None


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


def hideable(paths: Iterable[str]) -> list[str]:
    """Those of ``paths`` (the executor's socket directory) that ``private_mounts`` may hide: directories that
    hold neither the interpreter nor the code executions import. The template asks once, not every clone."""
    return [path for path in paths if os.path.isdir(path) and not _holds_interpreter(path)]


def private_mounts(hidden: Sequence[str] = ()) -> None:
    """``/proc`` of the execution's own PID namespace, and an empty read-only tmpfs over each of ``hidden``
    (``hideable`` ones)."""
    flags = _MS_NOSUID | _MS_NODEV
    mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    try:
        mount("proc", "/proc", "proc", flags | _MS_NOEXEC)
    except SandboxError as e:
        if e.errno != errno.EPERM:  # a container's masked /proc refuses a new proc mount: keep the old one
            raise
    for path in hidden:
        mount("tmpfs", path, "tmpfs", flags | _MS_RDONLY | _MS_NOEXEC, "mode=755,size=4k")


_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def read_only_everywhere() -> bool:
    """Every mount of this (the execution's own) mount namespace read-only, recursively (``mount_setattr``,
    Linux >= 5.12; False where the kernel lacks it). Mounts made afterwards, the scratch tmpfs, stay writable:
    an execution can write nowhere else, not in a world-writable directory this executor did not find, nor,
    in a user namespace, in the executor's own files."""
    attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
    size = ctypes.sizeof(attr)
    if _libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, b"/", _AT_RECURSIVE, ctypes.byref(attr), size) == 0:
        return True
    if ctypes.get_errno() == errno.ENOSYS:
        return False
    _check(-1, "mount_setattr / read-only")
    return False


#: Where other world-writable directories usually are (``/run/lock`` on the host's disk or /run, ...): each one
#: found there at start gets a small private tmpfs too, so nothing an execution leaves outlives it (attack-8b A12).
SCRATCH_PARENTS = ("/", "/run", "/var", "/var/lib", "/var/cache", "/var/spool", "/var/mail", "/var/crash", "/dev")
OTHER_SCRATCH_BYTES = 1024**2


def other_world_writable_dirs() -> tuple[str, ...]:
    """World-writable directories directly under ``SCRATCH_PARENTS`` other than ``SCRATCH_DIRS`` (no symlinks)."""
    found: set[str] = set()
    for parent in SCRATCH_PARENTS:
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mode & 0o002:
                    found.add(entry.path)
    return tuple(sorted(found - {os.path.realpath(d) for d in SCRATCH_DIRS} - set(SCRATCH_DIRS)))


def scratch_mounts(tmp_bytes: int, others: Sequence[str] = (), trees: Sequence[str] | None = None) -> None:
    """A private, empty tmpfs of ``tmp_bytes`` on each of ``SCRATCH_DIRS``, and of ``OTHER_SCRATCH_BYTES`` on each
    of ``others`` (``other_world_writable_dirs``). The interpreter's own directories (``trees``: ``import_trees``,
    which the template reads once, not every clone) that lie under one of them (a virtualenv in a checkout under
    ``/tmp``, as CI makes) are bind-mounted back, read-only, so the execution still imports the standard library
    and installed packages."""
    trees = import_trees() if trees is None else trees
    for scratch in (*SCRATCH_DIRS, *others):
        if not os.path.isdir(scratch):
            continue
        size = tmp_bytes if scratch in SCRATCH_DIRS else min(tmp_bytes, OTHER_SCRATCH_BYTES)
        real = os.path.realpath(scratch)
        inner = [tree for tree in trees if tree.startswith(real + "/")]
        handles = [os.open(tree, os.O_PATH | os.O_DIRECTORY) for tree in inner]
        mount("tmpfs", scratch, "tmpfs", _MS_NOSUID | _MS_NODEV, f"mode=1777,size={size}")
        for tree, handle in zip(inner, handles, strict=True):
            os.makedirs(tree, mode=0o755, exist_ok=True)
            mount(f"/proc/self/fd/{handle}", tree, None, _MS_BIND | _MS_REC)
            mount(None, tree, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
            os.close(handle)


def import_trees(paths: Iterable[str] = ()) -> list[str]:
    """Where the interpreter and its imports live (real paths, none inside another). A directory other users
    cannot enter (a checkout in ``mktemp -d``, mode 700, on ``sys.path`` as the working directory) is never
    bound back whole: it would keep its mode and hide the import trees inside it from the execution's uid, so
    those trees are bound back one by one instead."""
    places = (sys.base_prefix, sys.prefix, os.path.dirname(__file__), *sys.path, *paths)
    wanted = {os.path.realpath(p) for p in places if p}
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


# -- the system-call filter (seccomp): installed last, just before any of the job runs -----------------------

_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS: load 32 bits of struct seccomp_data
_JEQ, _JGE, _JSET = 0x15, 0x35, 0x45  # BPF_JMP | BPF_JEQ/BPF_JGE/BPF_JSET | BPF_K
_RET = 0x06
_NR, _ARCH, _ARG0 = 0, 4, 16  # offsets in struct seccomp_data (an argument's low 32 bits: little-endian)
#: Every namespace flag clone() takes (CLONE_NEWTIME exists for clone3/unshare only; in clone() 0x80 is CSIGNAL).
CLONE_NEW_ANY = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000

#: System calls no execution needs (x86_64 numbers), refused with EPERM: namespaces and mounts (a nested user
#: namespace hands its creator capabilities over a large kernel attack surface), other processes' memory, the
#: kernel keyring, eBPF, perf, userfaultfd, io_uring (whose operations this filter cannot see), kernels and
#: modules, file handles, clocks, the kernel log. Docker's default profile refuses the same ones.
DENIED_SYSCALLS: dict[str, int] = {
    "ptrace": 101, "syslog": 103, "uselib": 134, "vhangup": 153, "pivot_root": 155, "_sysctl": 156, "acct": 163,
    "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169,
    "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173, "create_module": 174,
    "init_module": 175, "delete_module": 176, "get_kernel_syms": 177, "query_module": 178, "quotactl": 179,
    "nfsservctl": 180, "lookup_dcookie": 212, "clock_settime": 227, "kexec_load": 246, "add_key": 248,
    "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298, "fanotify_init": 300,
    "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310,
    "process_vm_writev": 311, "kcmp": 312, "finit_module": 313, "kexec_file_load": 320, "bpf": 321,
    "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442, "quotactl_fd": 443, "open_tree_attr": 467,
}  # fmt: skip
SYS_CLONE3 = 435
_SYS_PERSONALITY = 135
#: personality(2) arguments allowed: the default (PER_LINUX) and the query; ADDR_NO_RANDOMIZE & co. are refused.
ALLOWED_PERSONALITIES = (0x0, 0xFFFFFFFF)

#: (code, k, jump-if-true label, jump-if-false label) or a label.
_Step = tuple[int, int, str | None, str | None] | str


def execution_filter() -> bytes:
    """The classic-BPF program (``struct sock_filter[]``) every execution runs under, from just before its job
    runs, inherited by everything it starts:

    * another architecture (i386 ``int 0x80``) or the x32 ABI: the process is killed (SIGSYS), since its system
      call numbers name other calls than the rules below;
    * ``DENIED_SYSCALLS``: EPERM; ``clone`` with any ``CLONE_NEW*`` flag: EPERM; ``clone3``: ENOSYS, because its
      flags sit in memory a filter cannot read (glibc then falls back to ``clone``, as under Docker's default
      profile); ``personality`` other than the default or a query: EPERM;
    * everything else, ``fork``, ``vfork``, threads and ``execve`` included, is allowed.
    """
    steps: list[_Step] = [
        (_LD_W_ABS, _ARCH, None, None),
        (_JEQ, _AUDIT_ARCH_X86_64, None, "kill"),
        (_LD_W_ABS, _NR, None, None),
        (_JGE, _X32_SYSCALL_BIT, "x32", None),
        *_search(sorted([*DENIED_SYSCALLS.values(), SYS_CLONE3, _SYS_CLONE, _SYS_PERSONALITY])),
        "x32",
        (_JEQ, 0xFFFFFFFF, "allow", "kill"),  # syscall(-1) (a tracer's skip): ENOSYS, as without a filter
        "clone",
        (_LD_W_ABS, _ARG0, None, None),
        (_JSET, CLONE_NEW_ANY, "deny", "allow"),
        "personality",
        (_LD_W_ABS, _ARG0, None, None),
        *[(_JEQ, value, "allow", None) for value in ALLOWED_PERSONALITIES],
        "deny",
        (_RET, _RET_ERRNO | errno.EPERM, None, None),
        "enosys",
        (_RET, _RET_ERRNO | errno.ENOSYS, None, None),
        "kill",
        (_RET, _RET_KILL_PROCESS, None, None),
        "allow",
        (_RET, _RET_ALLOW, None, None),
    ]
    return assemble(steps)


def _search(numbers: list[int]) -> list[_Step]:
    """A binary search over sorted system-call numbers (the accumulator), each jumping to its rule's block; a
    number not among them is allowed. A few comparisons per call instead of one per rule: the kernel runs the
    filter once per system-call number when it is installed (its cache of always-allowed calls), so the length
    of the path matters for every execution's start."""
    if len(numbers) <= 4:
        targets = {SYS_CLONE3: "enosys", _SYS_CLONE: "clone", _SYS_PERSONALITY: "personality"}
        return [*[(_JEQ, nr, targets.get(nr, "deny"), None) for nr in numbers], (_RET, _RET_ALLOW, None, None)]
    middle = len(numbers) // 2
    upper = f"from {numbers[middle]}"
    return [(_JGE, numbers[middle], upper, None), *_search(numbers[:middle]), upper, *_search(numbers[middle:])]


def assemble(steps: Sequence[_Step]) -> bytes:
    """Classic BPF from instructions and labels; a jump names a later label (None: the next instruction)."""
    labels: dict[str, int] = {}
    index = 0
    for step in steps:
        if isinstance(step, str):
            labels[step] = index
        else:
            index += 1
    program, index = [], 0
    for step in steps:
        if isinstance(step, str):
            continue
        code, k, jt, jf = step
        offsets = [0 if label is None else labels[label] - index - 1 for label in (jt, jf)]
        if not all(0 <= offset <= 255 for offset in offsets):
            raise ValueError(f"a jump of instruction {index} does not fit a classic-BPF offset")
        program.append(struct.pack("=HBBI", code, offsets[0], offsets[1], k))
        index += 1
    return b"".join(program)


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class SyscallFilter:
    """A seccomp filter made ready once (in the template), so installing it in a clone is one ``prctl``."""

    def __init__(self, program: bytes) -> None:
        self._buffer = ctypes.create_string_buffer(program, len(program))
        self._header = _Program(len(program) // 8, ctypes.addressof(self._buffer))
        self._address = ctypes.addressof(self._header)

    def install(self) -> None:
        """``prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)``; needs ``PR_SET_NO_NEW_PRIVS`` (or CAP_SYS_ADMIN).
        Filters only ever add up: this process and its descendants can never remove it."""
        _check(_libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, self._address, 0, 0), "seccomp")


def install_filter(program: bytes) -> None:
    SyscallFilter(program).install()


def probe_seccomp(program: bytes) -> str | None:
    """Why this kernel cannot filter an execution's system calls (None: it can): a forked child installs
    ``program``, then must see ``unshare(CLONE_NEWUSER)`` refused while ``fork`` still works."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            prctl(_PR_SET_NO_NEW_PRIVS, 1)
            install_filter(program)
            code = 2
            if _libc.unshare(CLONE_NEWUSER) == 0 or ctypes.get_errno() != errno.EPERM:
                os._exit(code)
            code = 3
            child = os.fork()
            if child == 0:
                os._exit(0)
            code = 0 if os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0 else code
        except BaseException:  # the code says which step failed
            pass
        os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    reasons = {
        0: None,
        1: "the kernel refused a seccomp filter (prctl PR_SET_SECCOMP; CONFIG_SECCOMP_FILTER?)",
        2: "the seccomp filter did not refuse unshare(CLONE_NEWUSER)",
        3: "fork failed under the seccomp filter",
    }
    return reasons.get(code, f"the seccomp probe ended with {code}")
