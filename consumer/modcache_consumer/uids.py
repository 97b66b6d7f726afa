"""Execution uid ranges under root: every executor on a host holds a range of its own (attack-8 F7).

A root executor runs each execution as ``base + slot`` (``slot`` < ``BLOCK``). Two executors with the same
``base`` (two root consumers on one machine, both with the default) would run executions of different consumers
as the same uid: one's fork bomb exhausts the other's ``RLIMIT_NPROC`` (counted per uid), a file one leaves in a
shared place is the other's, and without PID namespaces they could signal each other.

So an executor claims its range before it clones anything: uids are cut into aligned blocks of ``BLOCK``, and a
range is held by an exclusive ``flock`` on one file per block under ``LOCK_DIR`` (a root-only directory, on
``/run``: a tmpfs, so nothing of a dead executor survives a reboot, and a lock dies with its process). Without an
explicit base the first free block from ``DEFAULT_FIRST`` on is taken; an explicit base is honoured and locked
the same way (every block it overlaps), and one that another executor holds is a start-up error naming the
setting. Locks are per host (per ``/run``): containers with a ``/run`` of their own that share the host's uids
must be given distinct bases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import stat

BLOCK = 4096  # slots per executor; execution uids are base .. base + BLOCK - 1
DEFAULT_FIRST = 200_000  # the default range is the first free block at or above this uid
MAX_BLOCKS = 1024  # how far the default search goes (uids up to about 4.4 million)
LOCK_DIR = "/run/modcache/uids"
SETTING = "MODCACHE_EXECUTION_UID_BASE"


class UidRangeError(RuntimeError):
    """No uid range could be claimed; the message says why and names the setting."""


@dataclasses.dataclass
class Claim:
    """A uid range held by this process (the locks go with its descriptors: with the process at the latest)."""

    base: int
    fds: list[int]

    def release(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def claim(base: int | None = None, *, directory: str = LOCK_DIR) -> Claim:
    """Hold ``base``'s range (every block it overlaps), or the first free block from ``DEFAULT_FIRST`` on."""
    _prepare(directory)
    if base is not None:
        return _claim_explicit(base, directory)
    first = -(-DEFAULT_FIRST // BLOCK)
    for block in range(first, first + MAX_BLOCKS):
        fd = _lock(directory, block)
        if fd is not None:
            return Claim(block * BLOCK, [fd])
    raise UidRangeError(
        f"every execution uid range from {first * BLOCK} to {(first + MAX_BLOCKS) * BLOCK - 1} is held by another "
        f"executor on this host ({directory}); set {SETTING} to a free range"
    )


def _claim_explicit(base: int, directory: str) -> Claim:
    held: list[int] = []
    for block in range(base // BLOCK, (base + BLOCK - 1) // BLOCK + 1):
        fd = _lock(directory, block)
        if fd is None:
            for mine in held:
                os.close(mine)
            raise UidRangeError(
                f"{SETTING}={base}: execution uids {base}..{base + BLOCK - 1} overlap uids {block * BLOCK}.."
                f"{(block + 1) * BLOCK - 1}, which another executor on this host holds ({directory}/{block * BLOCK}); "
                f"give each consumer a base of its own, {BLOCK} apart, or leave {SETTING} unset to claim a free range"
            )
        held.append(fd)
    return Claim(base, held)


def _lock(directory: str, block: int) -> int | None:
    """A descriptor holding ``block``'s lock, or None if another process holds it."""
    fd = os.open(f"{directory}/{block * BLOCK}", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def _prepare(directory: str) -> None:
    """The lock directory, root's own and writable by nobody else (else anyone could hold every range)."""
    os.makedirs(os.path.dirname(directory), mode=0o755, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise UidRangeError(f"{directory} must be a directory owned by root and writable by root only")
