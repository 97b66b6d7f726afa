"""Probes and the small HTTP servers that expose them and the metrics.

Liveness proves that the operator's loops run, not that PostgreSQL or Redis are up (those are conditions and
metrics): each loop ``beat``s with the silence it is allowed, and ``/healthz`` fails once any loop has been silent
for longer. A ModuleCache's supervisor beats from its loop, and only while its watcher keeps reporting
syncs (successful or failed), so a hung watcher fails the probe too. ``/readyz`` says whether kopf is up.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from aiohttp import web


@dataclasses.dataclass
class Liveness:
    monotonic: Callable[[], float] = time.monotonic
    _beats: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

    def beat(self, loop: str, *, allowed_silence_s: float) -> None:
        self._beats[loop] = (self.monotonic(), allowed_silence_s)

    def forget(self, loop: str) -> None:
        self._beats.pop(loop, None)

    def stalled(self) -> list[str]:
        now = self.monotonic()
        return sorted(loop for loop, (at, allowed) in self._beats.items() if now - at > allowed)

    def loops(self) -> list[str]:
        return sorted(self._beats)


def health_app(*, liveness: Liveness, ready: Callable[[], bool]) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        stalled = liveness.stalled()
        body = {"status": "stalled" if stalled else "ok", "stalled": stalled, "loops": len(liveness.loops())}
        return web.json_response(body, status=503 if stalled else 200)

    async def readyz(_: web.Request) -> web.Response:
        is_ready = ready()
        return web.json_response({"ready": is_ready}, status=200 if is_ready else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def metrics_app(*, exposition: Callable[[], bytes]) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=exposition(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


class HttpServer:
    """One aiohttp application on one port (0: any free port; ``port`` tells which after ``start``)."""

    def __init__(self, app: web.Application, *, host: str, port: int) -> None:
        self._runner = web.AppRunner(app, access_log=None)
        self._host = host
        self._port = port
        self.port = port

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self.port = _bound_port(self._runner)

    async def stop(self) -> None:
        await self._runner.cleanup()


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("the server is not listening on a TCP port")
