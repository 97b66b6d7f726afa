"""``modcache operator`` as a real child process against the emulator, and what a test awaits from it.

Each process gets a kubeconfig with a token of its own (so emulator ``Fault``s can single it out), a pod name,
free probe ports, and its output read line by line as it comes: ``logged`` awaits a line, no polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from operatorkit.cluster import NAMESPACE
from testkit.servers import free_port

MODCACHE = Path(sys.executable).parent / "modcache"
#: Short Lease timings for tests: (lease duration, renew deadline, retry period) in seconds.
FAST_LEASE = (4.0, 2.5, 0.5)


class OperatorProcess:
    def __init__(
        self,
        api_url: str,
        workdir: Path,
        *,
        name: str,
        leader_election: bool = True,
        lease: tuple[float, float, float] = FAST_LEASE,
    ) -> None:
        self.name = name
        self.token = f"token-{name}"
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.health_port = free_port()
        self.metrics_port = free_port()
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._args = [
            str(MODCACHE), "-v", "operator", "--namespace", NAMESPACE,
            "--kubeconfig", str(self._kubeconfig(api_url)), "--bind", "127.0.0.1",
            "--metrics-port", str(self.metrics_port), "--health-port", str(self.health_port),
        ]  # fmt: skip
        if leader_election:
            duration, deadline, retry = lease
            self._args += [
                "--leader-election", "--lease-duration-seconds", str(duration),
                "--renew-deadline-seconds", str(deadline), "--retry-period-seconds", str(retry),
            ]  # fmt: skip
        self._new_line = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _kubeconfig(self, url: str) -> Path:
        path = self.workdir / f"{self.name}.kubeconfig"
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f'clusters: [{{name: kmock, cluster: {{server: "{url}"}}}}]\n'
            f"users: [{{name: {self.name}, user: {{token: {self.token}}}}}]\n"
            f"contexts: [{{name: {self.name}, context: {{cluster: kmock, user: {self.name}}}}}]\n"
            f"current-context: {self.name}\n"
        )
        return path

    async def start(self) -> None:
        env = {**os.environ, "POD_NAME": self.name, "POD_NAMESPACE": NAMESPACE}
        self.proc = await asyncio.create_subprocess_exec(
            *self._args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
        )
        self._reader = asyncio.create_task(self._read(self.proc))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        with self.log_path.open("a") as log:
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                self.lines.append(line)
                log.write(line + "\n")
                self._new_line.set()
                self._new_line = asyncio.Event()
        self._new_line.set()  # EOF: the process is gone

    async def logged(self, text: str, *, after: int = 0, timeout_s: float = 30.0) -> int:
        """The index of the first line from ``after`` on containing ``text``, once it has been written."""
        async with asyncio.timeout(timeout_s):
            while True:
                for index in range(after, len(self.lines)):
                    if text in self.lines[index]:
                        return index
                assert self._reader is not None
                if self._reader.done():
                    raise AssertionError(f"{self.name} exited before logging {text!r}:\n{self.tail()}")
                waiting = self._new_line
                await waiting.wait()

    async def probe(self, path: str) -> int:
        try:
            url = f"http://127.0.0.1:{self.health_port}{path}"
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                return response.status
        except aiohttp.ClientError:
            return 0

    async def terminate(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), timeout_s)
        await self._drain()
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self._drain()

    async def _drain(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 10)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.lines[-lines:])


@contextlib.asynccontextmanager
async def operator_process(
    api_url: str,
    workdir: Path,
    *,
    name: str,
    leader_election: bool = True,
    lease: tuple[float, float, float] = FAST_LEASE,
) -> AsyncIterator[OperatorProcess]:
    """A started operator process, killed on exit if the test did not stop it."""
    process = OperatorProcess(api_url, workdir, name=name, leader_election=leader_election, lease=lease)
    await process.start()
    try:
        yield process
    finally:
        await process.kill()
