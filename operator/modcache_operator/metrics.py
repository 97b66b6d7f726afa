"""Prometheus metrics of the operator, in one registry the operator owns (no global collectors).

Names follow Prometheus conventions: base units, ``_total`` counters, and bounded labels: ``namespace`` and
``name`` of the ModuleCache (removed when it is deleted), a ``trigger`` from the watcher's fixed set, a
``result``, a drift ``reason``, a condition ``type``/``status``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata

import prometheus_client
from prometheus_client import registry as prom_registry

from modcache import plan
from modcache_operator import names

PREFIX = "modcache"
#: Triggers the watcher reports (anything else is counted as "other"; coalesced batches as "mixed").
TRIGGERS = frozenset({"connect", "reconnect", "periodic", "manual", "notify", "keyspace", "retry"})
TRIGGER_LABELS = TRIGGERS | {"mixed", "other"}
CONDITION_STATUSES = ("True", "False", "Unknown")
DURATION_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, *, registry: prom_registry.CollectorRegistry | None = None) -> None:
        self.registry = registry or prom_registry.CollectorRegistry()
        labels = ["namespace", "name"]
        self.reconciles = prometheus_client.Counter(
            f"{PREFIX}_reconciles_total",
            "Syncs run, by what triggered them and whether they succeeded.",
            [*labels, "trigger", "result"],
            registry=self.registry,
        )
        self.duration = prometheus_client.Histogram(
            f"{PREFIX}_reconcile_duration_seconds",
            "Duration of successful syncs (kind: full resync or incremental).",
            [*labels, "kind"],
            buckets=DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.corrections = prometheus_client.Counter(
            f"{PREFIX}_corrections_total",
            "Cache entries written or removed, by plan reason (missing, stale, orphan, index).",
            [*labels, "reason"],
            registry=self.registry,
        )
        self.source_modules = prometheus_client.Gauge(
            f"{PREFIX}_source_modules", "Live modules in the source of truth.", labels, registry=self.registry
        )
        self.cached_modules = prometheus_client.Gauge(
            f"{PREFIX}_cached_modules", "Module content keys present in the cache.", labels, registry=self.registry
        )
        self.listener_connected = prometheus_client.Gauge(
            f"{PREFIX}_listener_connected", "1 while the LISTEN connection is up.", labels, registry=self.registry
        )
        self.listener_server_changes = prometheus_client.Counter(
            f"{PREFIX}_listener_server_changes_total",
            "Times the listener reconnected to another PostgreSQL server than before (a failover, a switchover).",
            labels,
            registry=self.registry,
        )
        self.source_refusals = prometheus_client.Counter(
            f"{PREFIX}_source_refusals_total",
            "PostgreSQL servers refused as the source: another cluster, or a timeline older than the cache was filled"
            " from (a former primary that came back).",
            labels,
            registry=self.registry,
        )
        self.last_success = prometheus_client.Gauge(
            f"{PREFIX}_last_success_timestamp_seconds",
            "Unix time of the last successful full resync.",
            labels,
            registry=self.registry,
        )
        self.condition = prometheus_client.Gauge(
            f"{PREFIX}_status_condition",
            "1 for the status each condition currently has, 0 for the others.",
            [*labels, "type", "status"],
            registry=self.registry,
        )
        self.build_info = prometheus_client.Gauge(
            f"{PREFIX}_build_info", "The running modcache version.", ["version"], registry=self.registry
        )
        self.build_info.labels(version=_version()).set(1)

    def synced(self, namespace: str, name: str, trigger: str, report: plan.Report, *, at_s: float) -> None:
        self.reconciles.labels(namespace, name, trigger_label(trigger), "success").inc()
        self.duration.labels(namespace, name, "full" if report.full else "incremental").observe(report.duration_s)
        for reason, n in report.applied.items():
            if n:
                self.corrections.labels(namespace, name, reason.value).inc(n)
        if report.full:
            self.last_success.labels(namespace, name).set(at_s)

    def failed(self, namespace: str, name: str, trigger: str) -> None:
        self.reconciles.labels(namespace, name, trigger_label(trigger), "failure").inc()

    def counts(self, namespace: str, name: str, *, source: int, cached: int) -> None:
        self.source_modules.labels(namespace, name).set(source)
        self.cached_modules.labels(namespace, name).set(cached)

    def listener(self, namespace: str, name: str, connected: bool) -> None:
        self.listener_connected.labels(namespace, name).set(1 if connected else 0)

    def listener_server_changed(self, namespace: str, name: str, times: int = 1) -> None:
        self.listener_server_changes.labels(namespace, name).inc(times)

    def source_refused(self, namespace: str, name: str, times: int = 1) -> None:
        self.source_refusals.labels(namespace, name).inc(times)

    def conditions(self, namespace: str, name: str, conditions: dict[str, str]) -> None:
        """``conditions`` maps a condition type to its status."""
        for kind, current in conditions.items():
            for status in CONDITION_STATUSES:
                self.condition.labels(namespace, name, kind, status).set(1 if status == current else 0)

    def forget(self, namespace: str, name: str) -> None:
        """Drop every series of a deleted ModuleCache, so label sets stay bounded."""
        ours = (namespace, name)
        for metric in (
            self.source_modules,
            self.cached_modules,
            self.listener_connected,
            self.listener_server_changes,
            self.source_refusals,
            self.last_success,
        ):
            _remove(metric, ours)
        for trigger in TRIGGER_LABELS:
            for result in ("success", "failure"):
                _remove(self.reconciles, (*ours, trigger, result))
        for kind in ("full", "incremental"):
            _remove(self.duration, (*ours, kind))
        for reason in plan.Reason:
            _remove(self.corrections, (*ours, reason.value))
        for condition in names.ConditionType:
            for status in CONDITION_STATUSES:
                _remove(self.condition, (*ours, condition.value, status))

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


def trigger_label(trigger: str) -> str:
    parts = set(trigger.split("+"))
    if len(parts) > 1:
        return "mixed"
    return trigger if trigger in TRIGGERS else "other"


def _remove(metric: prometheus_client.metrics.MetricWrapperBase, labels: tuple[str, ...]) -> None:
    with contextlib.suppress(KeyError):  # never recorded
        metric.remove(*labels)


def _version() -> str:
    try:
        return importlib.metadata.version("modcache")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
