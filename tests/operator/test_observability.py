"""What Prometheus and the kubelet see: the metrics endpoint scraped and parsed, the liveness/readiness probes."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from prometheus_client import parser

from modcache import keys, pgsource
from modcache_operator import app, credentials, handlers, health, kube, metrics
from operatorkit.cluster import NAMESPACE, Cluster, cache_spec

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def _get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


async def _scrape(port: int) -> Samples:
    status, text = await _get(port, "/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in parser.text_string_to_metric_families(text)
        for s in family.samples
    }


def _ours(samples: Samples, name: str, **labels: str) -> float | None:
    want = frozenset({"namespace": NAMESPACE, "name": "main", **labels}.items())
    return samples.get((name, want))


async def test_metrics_are_served_in_base_units_with_bounded_labels(
    cluster: Cluster, source: pgsource.PgSource, database_url: str, redis_url: str, keyspace: keys.KeySpace
) -> None:
    for n in range(3):
        await source.put_module(f"m{n}.py", b"X = 1\n")
    await cluster.apply_secret("urls", {"database": database_url, "redis": redis_url})
    await cluster.create_cache("main", cache_spec(keyspace.prefix))
    await cluster.wait_for(lambda: cluster.ready("main"), "Ready True")
    samples = await _scrape(cluster.ports.metrics)  # conditions reach the metrics before the status is written
    assert _ours(samples, "modcache_status_condition", type="Ready", status="True") == 1
    assert _ours(samples, "modcache_status_condition", type="Ready", status="False") == 0
    assert _ours(samples, "modcache_source_modules") == 3
    assert _ours(samples, "modcache_cached_modules") == 3
    assert _ours(samples, "modcache_listener_connected") == 1
    assert (_ours(samples, "modcache_reconciles_total", trigger="connect", result="success") or 0) >= 1
    assert _ours(samples, "modcache_corrections_total", reason="missing") == 3
    assert (_ours(samples, "modcache_reconcile_duration_seconds_count", kind="full") or 0) >= 1
    assert abs((_ours(samples, "modcache_last_success_timestamp_seconds") or 0) - time.time()) < 60
    assert any(name == "modcache_build_info" for name, _ in samples)
    label_names = {k for _, labels in samples for k, _ in labels}
    assert label_names <= {
        "namespace",
        "name",
        "trigger",
        "result",
        "kind",
        "reason",
        "type",
        "status",
        "version",
        "le",
    }

    await cluster.delete_cache("main")
    await cluster.wait_for(lambda: cluster.body("main") is None, "deleted")
    left = [key for key in await _scrape(cluster.ports.metrics) if ("name", "main") in key[1]]
    assert left == [], "a deleted ModuleCache's series must go"


async def test_probes_say_the_loops_run(cluster: Cluster) -> None:
    status, body = await _get(cluster.ports.health, "/healthz")
    assert (status, '"status": "ok"' in body) == (200, True)
    assert (await _get(cluster.ports.health, "/readyz"))[0] == 200


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_liveness_fails_once_a_loop_falls_silent() -> None:
    clock = FakeClock()
    liveness = health.Liveness(monotonic=clock)
    liveness.beat("operator", allowed_silence_s=30)
    liveness.beat("ns/cache", allowed_silence_s=10)
    operator = handlers.Operator(
        credentials=credentials.Credentials(server="http://127.0.0.1:1"),
        kube_api=kube.KubeApi(credentials=credentials.Credentials(server="http://127.0.0.1:1")),
        metrics=metrics.Metrics(),
        liveness=liveness,
    )
    ready = asyncio.Event()
    try:
        async with app.probes(
            operator=operator, ready=ready.is_set, host="127.0.0.1", metrics_port=0, health_port=0
        ) as ports:
            clock.now += 5
            assert (await _get(ports.health, "/healthz"))[0] == 200
            assert (await _get(ports.health, "/readyz"))[0] == 503
            clock.now += 20  # "operator" keeps beating (the probes' own heartbeat); the cache's loop went silent
            status, body = await _get(ports.health, "/healthz")
            assert status == 503
            assert "ns/cache" in body
    finally:
        await operator.kube_api.close()
