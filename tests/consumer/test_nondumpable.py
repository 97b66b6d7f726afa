"""The consumer is non-dumpable (issue 8, item 2), tried as an attacker would: a process of the same uid reads
the target's ``/proc/<pid>/environ`` and, through ``/proc/<pid>/maps`` and ``mem``, its stack, where the
environment strings live. Against a process without the hardening the same attack finds the secret (the
control: the test can fail), against one that ran ``hardening.make_non_dumpable`` it gets Permission denied.

Root bypasses the dumpable flag, so under root (CI, this machine) both sides run as an unprivileged uid: the
target drops to it after starting (the interpreter lives under /root, which that uid cannot enter), and the
attacker is plain ``sh``/``cat``/``dd`` under ``setpriv``. A uid change clears the flag by itself
(``fs.suid_dumpable``), so the target sets it again first: that is the state of a consumer started directly
as its uid, as in the chart.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from modcache_consumer import hardening

SECRET = "hunter2-4b1f9e"
NOBODY = 65534

TARGET = f"""
import os, sys
from modcache_consumer import hardening
if os.getuid() == 0:
    os.setgroups([])
    os.setresgid({NOBODY}, {NOBODY}, {NOBODY})
    os.setresuid({NOBODY}, {NOBODY}, {NOBODY})
    hardening.set_dumpable(True)
if sys.argv[1] == "hardened":
    hardening.make_non_dumpable()
print(hardening.is_dumpable(), flush=True)
sys.stdin.read()
"""

# Reads the target's environment, then its whole stack out of /proc/<pid>/mem.
ATTACK = """
pid=$1
cat /proc/$pid/environ | tr '\\0' '\\n'
range=$(grep '\\[stack\\]' /proc/$pid/maps | cut -d' ' -f1) || exit 0
start=$((0x${range%-*})); end=$((0x${range#*-}))
dd if=/proc/$pid/mem iflag=skip_bytes,count_bytes skip=$start count=$((end - start)) status=none \\
  | tr -c '[:print:]' '\\n'
"""


@pytest.fixture(params=["plain", "hardened"])
def target(request: pytest.FixtureRequest) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    env = {"PATH": os.environ.get("PATH", ""), "MODCACHE_DATABASE_URL": f"postgresql://app:{SECRET}@db/app"}
    process = subprocess.Popen(
        [sys.executable, "-c", TARGET, request.param],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    dumpable = process.stdout.readline().strip()  # printed once it is in place: the event to wait for
    assert dumpable == {"plain": "True", "hardened": "False"}[request.param]
    yield request.param, process
    assert process.stdin is not None
    process.stdin.close()
    process.wait(timeout=10)
    process.stdout.close()


def attack(pid: int) -> subprocess.CompletedProcess[str]:
    as_attacker = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if os.getuid() == 0 else []
    return subprocess.run(
        [*as_attacker, "sh", "-c", ATTACK, "attack", str(pid)], capture_output=True, text=True, timeout=60
    )


def test_a_same_uid_process_reads_secrets_only_from_a_dumpable_target(
    target: tuple[str, subprocess.Popen[str]],
) -> None:
    mode, process = target
    stolen = attack(process.pid)
    environ_line = f"MODCACHE_DATABASE_URL=postgresql://app:{SECRET}@db/app"
    if mode == "plain":  # the control: without the hardening, the attack works
        assert environ_line in stolen.stdout.splitlines()[:5]  # from /proc/<pid>/environ
        assert stolen.stdout.count(SECRET) >= 2  # ...and again out of the stack, through /proc/<pid>/mem
    else:
        assert SECRET not in stolen.stdout
        assert f"/proc/{process.pid}/environ: Permission denied" in stolen.stderr
        assert f"/proc/{process.pid}/maps: Permission denied" in stolen.stderr


def test_a_denied_mem_read_is_denied_at_open(target: tuple[str, subprocess.Popen[str]]) -> None:
    """Not just an empty read: opening /proc/<pid>/mem itself fails for the hardened target."""
    mode, process = target
    as_attacker = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if os.getuid() == 0 else []
    opened = subprocess.run(
        [*as_attacker, "sh", "-c", f"exec 3< /proc/{process.pid}/mem && echo opened"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (opened.stdout.strip() == "opened") is (mode == "plain")


async def test_the_consumer_makes_itself_non_dumpable_at_start(harness) -> None:
    assert hardening.set_dumpable(True)  # whatever an earlier test left
    assert hardening.is_dumpable() is True
    async with harness.consumer():
        assert hardening.is_dumpable() is False
