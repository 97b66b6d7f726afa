"""Assembling a running operator: the probe and metrics servers, kopf itself, and its heartbeat.

Used by ``modcache operator`` and, unchanged, by the tests (which point it at kmock's emulator).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence

import kopf

from modcache_operator import handlers, health

log = logging.getLogger(__name__)

#: How often the operator's own loop proves it runs (liveness), and the silence it is allowed.
HEARTBEAT_S = 5.0
HEARTBEAT_ALLOWED_S = 30.0


@dataclasses.dataclass(frozen=True)
class Ports:
    metrics: int
    health: int


#: A flag kopf can wait on: set from this loop (asyncio) or from another thread (threading).
Flag = asyncio.Event | threading.Event


@contextlib.asynccontextmanager
async def probes(
    *, operator: handlers.Operator, ready: Callable[[], bool], host: str, metrics_port: int, health_port: int
) -> AsyncIterator[Ports]:
    """Serve ``/metrics`` and ``/healthz`` + ``/readyz`` (port 0: any free port) and beat while open."""
    metrics_server = health.HttpServer(
        health.metrics_app(exposition=operator.metrics.exposition), host=host, port=metrics_port
    )
    health_server = health.HttpServer(
        health.health_app(liveness=operator.liveness, ready=ready), host=host, port=health_port
    )
    await metrics_server.start()
    try:
        await health_server.start()
        beating = asyncio.create_task(_heartbeat(operator.liveness), name="modcache-heartbeat")
        try:
            yield Ports(metrics=metrics_server.port, health=health_server.port)
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
            await health_server.stop()
    finally:
        await metrics_server.stop()


async def run_kopf(
    *,
    operator: handlers.Operator,
    namespaces: Sequence[str],
    stop: Flag,
    ready: Flag,
    on_signals: Callable[[], None] | None = None,
) -> None:
    """Run kopf until ``stop`` is set: cluster-wide when ``namespaces`` is empty.

    kopf installs SIGTERM/SIGINT handlers of its own when it starts in the main thread, and leaves them behind
    when it stops; ``on_signals`` puts the caller's back at once, so a signal always reaches the caller (which
    stops kopf through ``stop``), whether kopf runs, stopped after a lost Lease, or never started.
    """
    existing = set(asyncio.all_tasks())
    tasks = await kopf.spawn_tasks(
        registry=handlers.registry(operator),
        settings=handlers.settings(namespaced=bool(namespaces), reporting_instance=operator.reporting_instance),
        standalone=True,  # no kopf peering: leader election (a Lease) decides who runs
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        stop_flag=stop,
        ready_flag=ready,
    )
    if on_signals is not None:
        on_signals()
    await kopf.run_tasks([*tasks, asyncio.create_task(_log_when_ready(ready), name="modcache-ready")], ignored=existing)


async def _log_when_ready(ready: Flag) -> None:
    """Say once that kopf is up (then ``/readyz`` answers 200), and wait until kopf stops."""
    if isinstance(ready, asyncio.Event):
        await ready.wait()
        log.info("ready: kopf is watching ModuleCaches")
    await asyncio.Event().wait()


async def _heartbeat(liveness: health.Liveness) -> None:
    while True:
        liveness.beat("operator", allowed_silence_s=HEARTBEAT_ALLOWED_S)
        await asyncio.sleep(HEARTBEAT_S)
