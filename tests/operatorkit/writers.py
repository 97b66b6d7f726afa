"""Who writes to a (private) Redis, and when: every write command it executes, attributed to a process.

``MONITOR`` streams each command the server runs with the client's address; commands a Lua script runs are
attributed to the client whose ``EVALSHA`` started it (modcache writes through scripts). A client port is
mapped to the operator process owning that socket (psutil), so a test can assert that two operator processes
never wrote in overlapping spans of time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence

import psutil
import redis.asyncio as aioredis

WRITE_COMMANDS = frozenset(
    {"SET", "SETEX", "PSETEX", "MSET", "DEL", "UNLINK", "HSET", "HDEL", "SADD", "SREM", "INCR", "INCRBY", "EXPIRE",
     "PEXPIRE", "RENAME", "APPEND", "SETRANGE"}
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Write:
    at: float  # the server's clock (time.time() on this machine)
    pid: int | None  # the operator process that sent it, None for anyone else
    command: str
    key: str


@dataclasses.dataclass
class WriteLog:
    redis_port: int
    pids: Sequence[int]
    writes: list[Write] = dataclasses.field(default_factory=list)
    _ports: dict[str, int | None] = dataclasses.field(default_factory=dict)
    _written: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def by(self, pid: int) -> list[Write]:
        return [w for w in self.writes if w.pid == pid]

    def add(self, write: Write) -> None:
        self.writes.append(write)
        self._written.set()
        self._written = asyncio.Event()

    async def until(self, predicate: Callable[[], object], *, timeout_s: float = 30.0) -> None:
        """Until ``predicate`` holds, re-checked after each recorded write."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await self._written.wait()

    def owner(self, client_port: str) -> int | None:
        if client_port not in self._ports:
            self._ports[client_port] = self._find(int(client_port))
        return self._ports[client_port]

    def _find(self, client_port: int) -> int | None:
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                for conn in psutil.Process(pid).net_connections(kind="tcp"):
                    if (
                        conn.laddr
                        and conn.laddr.port == client_port
                        and conn.raddr
                        and conn.raddr.port == self.redis_port
                    ):
                        return pid
        return None


@contextlib.asynccontextmanager
async def recording(redis_url: str, redis_port: int, pids: Sequence[int]) -> AsyncIterator[WriteLog]:
    """Record every write the server runs until the block ends."""
    log = WriteLog(redis_port=redis_port, pids=pids)
    client = aioredis.Redis.from_url(redis_url)
    ready = asyncio.Event()
    task = asyncio.create_task(_follow(client, log, ready))
    try:
        await ready.wait()
        yield log
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()


async def _follow(client: aioredis.Redis, log: WriteLog, ready: asyncio.Event) -> None:
    async with client.monitor() as monitor:
        ready.set()
        script_owner: int | None = None
        while True:
            info = await monitor.next_command()
            words = info["command"].split(" ", 2)
            name = words[0].upper()
            if info["client_type"] == "lua":
                pid = script_owner
            else:
                pid = log.owner(info["client_port"])
                if name in ("EVALSHA", "EVAL"):
                    script_owner = pid
            if name in WRITE_COMMANDS:
                log.add(Write(at=float(info["time"]), pid=pid, command=name, key=_arg(words)))


def _arg(words: list[str]) -> str:
    return words[1] if len(words) > 1 else ""
