"""Private server processes for fault tests (never the shared ones): free ports, waiting, private Redis."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, *, timeout_s: float = 15.0, up: bool = True) -> None:
    """Block until ``port`` accepts connections (or, with ``up=False``, until it refuses them)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            if up:
                return
        except OSError:
            if not up:
                return
        time.sleep(0.01)
    raise TimeoutError(f"port {port} never {'opened' if up else 'closed'}")


class PrivateRedis:
    """A redis-server of the test's own on a free port; ``stop()``/``start()`` to inject faults."""

    def __init__(self, *extra_args: str) -> None:
        self.port = free_port()
        self.extra_args = extra_args
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._proc = subprocess.Popen([*args, *self.extra_args], stdout=subprocess.DEVNULL)
        wait_port(self.port)

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections, nothing is answered (a partition, a frozen VM)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)  # a paused server would not see the SIGTERM
            self._proc.terminate()
            self._proc.wait(10)
            self._proc = None
            wait_port(self.port, up=False)


@contextlib.contextmanager
def private_redis(*extra_args: str) -> Iterator[PrivateRedis]:
    server = PrivateRedis(*extra_args)
    server.start()
    try:
        yield server
    finally:
        server.stop()
