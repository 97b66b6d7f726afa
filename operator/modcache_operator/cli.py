"""``modcache operator``: run the operator (kopf), its metrics and probe servers, and leader election.

The command reads credentials in-cluster (service account) or from a kubeconfig, serves ``/metrics`` and
``/healthz`` + ``/readyz`` on their ports, and, with ``--leader-election``, runs kopf only while this replica holds
the Lease (one replica needs none). SIGTERM/SIGINT stop it gracefully: the loops stop, the Lease is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

import click

from modcache_operator import app, handlers, health, kube, leader, metrics

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


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
        lease = leader.LeaseConfig(namespace=where, name=lease_name)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # one line per handled event is noise
    logging.getLogger("modcache_operator").setLevel(min(logging.INFO, logging.getLogger().getEffectiveLevel()))
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


async def serve(
    *,
    namespaces: tuple[str, ...],
    lease: leader.LeaseConfig | None,
    host: str,
    metrics_port: int,
    health_port: int,
    kubeconfig: str | None,
) -> None:
    """Run until SIGTERM/SIGINT."""
    configuration = await kube.load_configuration(kubeconfig=kubeconfig)
    api = kube.KubeApi.from_configuration(configuration)
    operator = handlers.Operator(
        configuration=configuration, kube_api=api, metrics=metrics.Metrics(), liveness=health.Liveness()
    )
    stop = asyncio.Event()
    _on_signals(stop)
    term = _Term(shutdown=stop)
    try:
        async with app.probes(
            operator=operator, ready=term.ready, host=host, metrics_port=metrics_port, health_port=health_port
        ) as ports:
            log.info("metrics on :%d/metrics, probes on :%d/healthz and /readyz", ports.metrics, ports.health)
            if lease is None:
                await term.work(operator, namespaces, stop)
            else:
                elector = leader.Elector(
                    api_client=api.api_client, lease=lease, work=lambda s: term.work(operator, namespaces, s)
                )
                term.elector = elector
                await elector.run(stop)
    finally:
        await api.close()


class _Term:
    """One run of kopf (a leadership term), and readiness: kopf ready, or standing by for the Lease."""

    def __init__(self, *, shutdown: asyncio.Event) -> None:
        self.shutdown = shutdown
        self.kopf_ready = asyncio.Event()
        self.elector: leader.Elector | None = None

    async def work(self, operator: handlers.Operator, namespaces: tuple[str, ...], stop: asyncio.Event) -> None:
        self.kopf_ready = asyncio.Event()
        await app.run_kopf(operator=operator, namespaces=namespaces, stop=stop, ready=self.kopf_ready)
        if not stop.is_set():  # kopf takes SIGTERM/SIGINT over while it runs: it stopped on a signal
            self.shutdown.set()
            _on_signals(self.shutdown)

    def ready(self) -> bool:
        standing_by = self.elector is not None and not self.elector.leading
        return standing_by or self.kopf_ready.is_set()


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
