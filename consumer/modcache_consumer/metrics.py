"""The consumer's Prometheus metrics, on a registry of its own (no process-wide singletons).

``Metrics`` also implements the observers of ``database``, ``pool`` and ``readiness``, so those modules report
facts and never import prometheus_client themselves.
"""

from __future__ import annotations

import prometheus_client as prom

DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class Metrics:
    def __init__(self, registry: prom.CollectorRegistry | None = None) -> None:
        self.registry = registry or prom.CollectorRegistry()
        r = self.registry
        self.executions = prom.Counter("modcache_executions", "Executions finished, by status.", ["status"], registry=r)
        self.duration = prom.Histogram(
            "modcache_execution_duration_seconds",
            "Time in a worker per execution.",
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.in_flight = prom.Gauge("modcache_executions_in_flight", "Messages being handled now.", registry=r)
        self.poisoned = prom.Counter("modcache_messages_poisoned", "Messages moved to the poison queue.", registry=r)
        self.requeued = prom.Counter(
            "modcache_messages_requeued", "Messages requeued after a service outage.", registry=r
        )
        self.db_connections = prom.Counter(
            "modcache_db_connections_opened", "PostgreSQL connections opened by the pool.", registry=r
        )
        self.db_reconnects = prom.Counter(
            "modcache_db_reconnects", "Pooled PostgreSQL connections found dead and replaced.", registry=r
        )
        self.cache_repairs = prom.Counter(
            "modcache_cache_repairs",
            "Module cache repairs on the hot path: 'path' (a worker's missing module), 'full' (cache lost).",
            ["kind"],
            registry=r,
        )
        self.broker_reconnects = prom.Counter(
            "modcache_broker_reconnects", "Times the RabbitMQ connection was re-established.", registry=r
        )
        self.workers_started = prom.Counter("modcache_workers_started", "Worker processes started.", registry=r)
        self.workers_lost = prom.Counter(
            "modcache_workers_lost", "Worker processes that died during an execution.", registry=r
        )

    def exposition(self) -> bytes:
        return prom.generate_latest(self.registry)

    # -- database.Observer ------------------------------------------------------------------------------------

    def on_connect(self) -> None:
        self.db_connections.inc()

    def on_reconnect(self, reason: str) -> None:
        self.db_reconnects.inc()

    # -- pool.Observer --------------------------------------------------------------------------------------

    def on_worker_started(self, pid: int) -> None:
        self.workers_started.inc()

    def on_worker_lost(self, pid: int, reason: str) -> None:
        self.workers_lost.inc()

    # -- readiness.Observer ---------------------------------------------------------------------------------

    def on_repair(self, kind: str, count: int) -> None:
        self.cache_repairs.labels(kind=kind).inc(count)
