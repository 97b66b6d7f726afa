"""``modcache operator``: run the operator (kopf), its metrics and probe servers, and leader election.

The command reads credentials in-cluster (service account) or from a kubeconfig, serves ``/metrics`` and
``/healthz`` + ``/readyz`` on their ports, and, with ``--leader-election``, runs kopf only while this replica holds
the Lease (one replica needs none). SIGTERM/SIGINT stop it gracefully in every state (leading: the loops stop,
then the Lease is released; standing by or after a lost Lease: at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import click

from modcache_operator import app, credentials, fence, handlers, health, kube, leader, metrics

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
M_ARENA_MAX = -8  # mallopt(3)


@click.command("operator")
@click.option(
    "-n", "--namespace", "namespaces", multiple=True, metavar="NS",
    help="Watch ModuleCaches in this namespace (repeatable); needs only a namespaced Role.",
)  # fmt: skip
@click.option("-A", "--all-namespaces", is_flag=True, help="Watch ModuleCaches in every namespace (ClusterRole).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=9090, show_default=True)
@click.option("--health-port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--bind", default="0.0.0.0", show_default=True, help="Address the two servers listen on.")
@click.option(
    "--leader-election/--no-leader-election", default=False, show_default=True,
    help="Run only while holding a Lease, so several replicas never write at once (needed for replicas > 1).",
)  # fmt: skip
@click.option("--lease-name", default="modcache-operator", show_default=True)
@click.option(
    "--lease-namespace", default=None,
    help="Namespace of the Lease [default: the pod's namespace, else the single watched namespace].",
)  # fmt: skip
@click.option(
    "--lease-duration-seconds", type=click.FloatRange(min=1.0), default=15.0, show_default=True,
    help="A standby takes the Lease over this long after it last saw it renewed.",
)  # fmt: skip
@click.option(
    "--renew-deadline-seconds", type=click.FloatRange(min=0.5), default=10.0, show_default=True,
    help="The leader stops writing if it could not renew for this long (shorter than the lease duration).",
)  # fmt: skip
@click.option(
    "--retry-period-seconds", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
    help="How often the leader renews and standbys try (shorter than the renew deadline).",
)  # fmt: skip
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None, help="Instead of in-cluster credentials.")
def operator(
    namespaces: tuple[str, ...],
    all_namespaces: bool,
    metrics_port: int,
    health_port: int,
    bind: str,
    leader_election: bool,
    lease_name: str,
    lease_namespace: str | None,
    lease_duration_seconds: float,
    renew_deadline_seconds: float,
    retry_period_seconds: float,
    kubeconfig: str | None,
) -> None:
    """Keep every ModuleCache converged: one loop per resource, status, events, metrics."""
    if bool(namespaces) == all_namespaces:
        raise click.UsageError("give --namespace NS (repeatable) or --all-namespaces")
    lease = None
    if leader_election:
        where = lease_namespace or _own_namespace() or (namespaces[0] if len(namespaces) == 1 else None)
        if where is None:
            raise click.UsageError("--lease-namespace is needed: cannot tell this pod's namespace")
        try:
            lease = leader.LeaseConfig(
                namespace=where,
                name=lease_name,
                lease_duration_s=lease_duration_seconds,
                renew_deadline_s=renew_deadline_seconds,
                retry_period_s=retry_period_seconds,
            )
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # one line per handled event is noise
    logging.getLogger("modcache_operator").setLevel(min(logging.INFO, logging.getLogger().getEffectiveLevel()))
    _one_malloc_arena()
    asyncio.run(
        serve(
            namespaces=namespaces,
            lease=lease,
            host=bind,
            metrics_port=metrics_port,
            health_port=health_port,
            kubeconfig=kubeconfig,
        )
    )
    # Stopped cleanly: the loops are done and the Lease released. Skip the interpreter's teardown (a second and
    # more of garbage collection on a loaded node, while the pod is already counted as terminating).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


async def serve(
    *,
    namespaces: tuple[str, ...],
    lease: leader.LeaseConfig | None,
    host: str,
    metrics_port: int,
    health_port: int,
    kubeconfig: str | None,
) -> None:
    """Run until SIGTERM/SIGINT, in whatever state that finds the replica (leading, standing by, starting)."""
    stop = asyncio.Event()
    _on_signals(stop)
    connection = credentials.load(kubeconfig=kubeconfig)
    api = kube.KubeApi(credentials=connection)
    operator = handlers.Operator(
        credentials=connection, kube_api=api, metrics=metrics.Metrics(), liveness=health.Liveness()
    )
    term = _Term(operator=operator, namespaces=namespaces, on_signals=lambda: _on_signals(stop))
    try:
        async with app.probes(
            operator=operator, ready=term.ready, host=host, metrics_port=metrics_port, health_port=health_port
        ) as ports:
            log.info("metrics on :%d/metrics, probes on :%d/healthz and /readyz", ports.metrics, ports.health)
            if lease is None:
                await term.work(fence.Fence(), stop)
            else:
                term.elector = leader.Elector(api=api, lease=lease, work=term.work)
                await term.elector.run(stop)
    finally:
        await api.close()


class _Term:
    """One run of kopf (a leadership term), and readiness: kopf ready, or standing by for the Lease while the API
    answers."""

    def __init__(
        self, *, operator: handlers.Operator, namespaces: tuple[str, ...], on_signals: Callable[[], None]
    ) -> None:
        self.operator = operator
        self.namespaces = namespaces
        self.on_signals = on_signals
        self.kopf_ready = asyncio.Event()
        self.elector: leader.Elector | None = None

    async def work(self, term: fence.Fence, stop: asyncio.Event) -> None:
        self.operator.fence = term
        self.kopf_ready = asyncio.Event()
        await app.run_kopf(
            operator=self.operator,
            namespaces=self.namespaces,
            stop=stop,
            ready=self.kopf_ready,
            on_signals=self.on_signals,
        )

    def ready(self) -> bool:
        if self.elector is not None and not self.elector.leading:
            return self.elector.in_contact()  # a standby that cannot reach the API could never take over
        return self.kopf_ready.is_set()


def _one_malloc_arena() -> None:
    """glibc's malloc keeps an arena per thread that allocated (up to 8 per core); the operator's work is one event
    loop, and the few helper threads (DNS, kopf's executor) made arenas that kept freed resync buffers: one arena cut
    the peak RSS of a 100,000-module no-drift resync by 10-15 MB (docs/benchmarks.md, track resync). Unless
    MALLOC_ARENA_MAX says otherwise; elsewhere than glibc, nothing."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)


def _on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


def _own_namespace() -> str | None:
    """The pod's namespace: ``POD_NAMESPACE`` (downward API) or the service account's namespace file."""
    if namespace := os.environ.get("POD_NAMESPACE"):
        return namespace
    with contextlib.suppress(OSError):
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or None
    return None
