"""Liveness, readiness and metrics over plain HTTP (``/livez``, ``/readyz``, ``/metrics``).

A few lines of asyncio instead of a web framework: probes send one GET and read one response. ``/readyz``
answers 503 with the reasons (one per line) while the consumer should not get traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

Probe = Callable[[], list[str]]  # the problems; an empty list means healthy

_STATUS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HealthServer:
    def __init__(self, *, host: str, port: int, live: Probe, ready: Probe, metrics: Callable[[], bytes]) -> None:
        self._host = host
        self._port = port
        self._live = live
        self._ready = ready
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readline()
                while (await reader.readline()).strip():
                    pass  # headers: not needed
            status, content_type, body = self._respond(request.decode("latin-1").split())
            head = f"HTTP/1.1 {status} {_STATUS[status]}\r\nContent-Type: {content_type}\r\n"
            writer.write(f"{head}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _respond(self, request: list[str]) -> tuple[int, str, bytes]:
        if len(request) < 2 or request[0] not in ("GET", "HEAD"):
            return 405, "text/plain", b"GET only\n"
        path = request[1].split("?")[0]
        if path == "/metrics":
            return 200, PROMETHEUS_TYPE, self._metrics()
        probe = {"/livez": self._live, "/healthz": self._live, "/readyz": self._ready}.get(path)
        if probe is None:
            return 404, "text/plain", b"try /livez, /readyz or /metrics\n"
        problems = probe()
        if problems:
            return 503, "text/plain", "".join(f"{p}\n" for p in problems).encode()
        return 200, "text/plain", b"ok\n"
