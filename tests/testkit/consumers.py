"""Consumers in processes of their own (``modcache consumer``, as in production) and a private RabbitMQ node, for
the tests that SIGKILL a consumer or restart the broker (never the shared one)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

from modcache import embedded

READY_LINE = "modcache consumer: consuming"
LINE_LIMIT_BYTES = 1024 * 1024
COPY_GRACE_S = 5.0


class ConsumerProcess:
    """One ``modcache consumer`` with ``MODCACHE_*`` settings from ``env``; its stderr goes to ``log_path``."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self._copier: asyncio.Task[None] | None = None

    async def start(self, *, timeout_s: float = 90.0) -> None:
        """Start it and wait until it says it consumes (its stderr is read line by line into ``log_path``)."""
        self.starts += 1
        environ = {k: v for k, v in os.environ.items() if not k.startswith("MODCACHE_")} | self.env
        self.proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "modcache"),
            "consumer",
            env=environ,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=LINE_LIMIT_BYTES,
        )
        assert self.proc.stderr is not None
        consuming = asyncio.get_running_loop().create_future()
        self._copier = asyncio.create_task(self._copy_stderr(self.proc.stderr, consuming))
        async with asyncio.timeout(timeout_s):
            assert await consuming, f"the consumer exited: {self.tail()}"

    async def _copy_stderr(self, stream: asyncio.StreamReader, consuming: asyncio.Future[bool]) -> None:
        """Every line into the log; ``consuming`` is True at the ready line, False if the stream ends first."""
        with self.log_path.open("ab") as log:
            async for line in stream:
                log.write(line)
                log.flush()
                if not consuming.done() and READY_LINE.encode() in line:
                    consuming.set_result(True)
        if not consuming.done():
            consuming.set_result(False)

    async def _ended(self) -> None:
        """After the process ended: the rest of its stderr (its executor, dying with it, may hold it a moment)."""
        if self._copier is not None:
            with contextlib.suppress(TimeoutError):  # then wait_for cancelled it: a descendant holds the pipe
                await asyncio.wait_for(self._copier, COPY_GRACE_S)
            self._copier = None
        self.proc = None

    async def kill(self) -> None:
        """SIGKILL: no drain, no goodbye; its leases just stop being renewed."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self._ended()

    async def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self._ended()

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class BrokerNode:
    """A private RabbitMQ node that can be stopped and started again (same name, port and data)."""

    def __init__(self, base_dir: Path, *, config: str = "") -> None:
        self.base_dir = base_dir
        self.config = config
        self.port = embedded.free_port()
        self.node_name = f"modcache-{uuid.uuid4().hex[:8]}@localhost"
        self.server: embedded.Server | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    async def start(self) -> None:
        self.server = await asyncio.to_thread(
            embedded.start_rabbitmq, self.base_dir, port=self.port, node_name=self.node_name, config=self.config
        )

    async def stop(self) -> None:
        if self.server is not None:
            await asyncio.to_thread(self.server.stop, 60.0)
            self.server = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()
