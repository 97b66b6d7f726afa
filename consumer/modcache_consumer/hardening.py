"""The consumer's own process hardening: it makes itself non-dumpable at start.

A process is dumpable by default, so any process of the same uid may read its ``/proc/<pid>/environ``,
``cmdline`` and ``mem`` (and ptrace it): a workflow running as the consumer's uid would read the database URL
with its password, the AMQP URL and the secrets key straight out of its parent. ``prctl(PR_SET_DUMPABLE, 0)``
closes that: the kernel then grants those reads only to processes with ``CAP_SYS_PTRACE`` over the consumer
(root), which is why executions never run as root (see docs/security.md). ``execve`` resets the flag, so
children (workers, the executor) are not affected and must protect themselves. Linux only; elsewhere (a
laptop) ``make_non_dumpable`` reports that it could not, and the caller logs it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4


def make_non_dumpable() -> bool:
    """Clear this process's dumpable flag; whether that worked (False: not Linux, or prctl refused)."""
    return set_dumpable(False)


def set_dumpable(dumpable: bool) -> bool:
    prctl = _prctl()
    if prctl is None:
        return False
    if prctl(PR_SET_DUMPABLE, int(dumpable), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_DUMPABLE, %d) failed: errno %d", dumpable, ctypes.get_errno())
        return False
    return True


def is_dumpable() -> bool | None:
    """This process's dumpable flag; None where prctl does not exist."""
    prctl = _prctl()
    if prctl is None:
        return None
    return bool(prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))


def _prctl() -> ctypes._FuncPointer | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    prctl = getattr(libc, "prctl", None)
    if prctl is None:
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl  # type: ignore[no-any-return]
