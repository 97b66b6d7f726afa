"""The alerts the chart ships query series the operator and the consumer really export, with labels they carry."""

from __future__ import annotations

import importlib
import json
import re
from typing import Any

import pytest

#: Labels Prometheus adds to every scraped series from the target (ServiceMonitor defaults).
TARGET_LABELS = {"namespace", "pod", "service", "job", "instance", "endpoint", "container"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "info": ("_info",)}
EXPORTERS = ("modcache_operator.metrics", "modcache_consumer.metrics")


def exported() -> tuple[dict[str, set[str]], list[str]]:
    """Series name -> label names, from each component's ``Metrics`` on a fresh registry; and missing modules."""
    series: dict[str, set[str]] = {}
    missing = []
    for module_name in EXPORTERS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is None or not module_name.startswith(e.name):
                raise
            missing.append(module_name)
            continue
        registry = module.Metrics().registry
        for collector in list(registry._collector_to_names):  # the registry's own index of its collectors
            name, kind = collector._name, collector._type
            if kind == "counter":
                name = name.removesuffix("_total")
            labels = set(collector._labelnames)
            for suffix in SUFFIXES.get(kind, ("",)):
                series[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series, missing


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names used) for every modcache_* series an expression reads, grouping labels included."""
    grouping = {g.strip() for m in re.finditer(r"\bby \(([^)]*)\)", expr) for g in m.group(1).split(",")}
    found = []
    for m in re.finditer(r"\b(modcache_\w+)(\{([^}]*)\})?", expr):
        matchers = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", m.group(3) or ""))
        found.append((m.group(1), matchers | grouping))
    return found


def test_the_selector_parser_sees_metrics_and_labels() -> None:
    expr = 'sum by (namespace, name) (rate(modcache_x_total{result="failure", kind=~"a|b"}[5m])) / modcache_y'
    assert selectors(expr) == [
        ("modcache_x_total", {"namespace", "name", "result", "kind"}),
        ("modcache_y", {"namespace", "name"}),
    ]


def test_every_alert_reads_series_that_exist(render: Any) -> None:
    rendering = render({"metrics": {"prometheusRule": {"enabled": True}}})
    (rule,) = rendering.of_kind("PrometheusRule")
    used = [s for group in rule["spec"]["groups"] for r in group["rules"] for s in selectors(r["expr"])]
    assert used
    series, missing = exported()
    if missing:
        pytest.xfail(f"not on main yet, alerts checked by name only: {', '.join(missing)}")
    for metric, labels in used:
        assert metric in series, f"{metric} is not exported by {', '.join(EXPORTERS)}"
        unknown = labels - series[metric] - TARGET_LABELS
        assert not unknown, f"{metric} has no label {sorted(unknown)}"


# -- the Grafana dashboard ---------------------------------------------------------------------------------------

DASHBOARD_TOPICS = (
    "Ready",
    "source modules vs cached",
    "drift corrected, by reason",
    "syncs, by trigger",
    "sync duration",
    "listen",
    "executions, by status",
    "execution duration",
)


def dashboard(render: Any, **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    values = {"metrics": {"grafanaDashboard": {"enabled": True, **extra}}}
    (config_map,) = [c for c in render(values).of_kind("ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    return config_map, json.loads(config_map["data"]["modcache.json"])


def panel_exprs(board: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def test_the_dashboard_ships_for_the_grafana_sidecar(render: Any) -> None:
    config_map, board = dashboard(render, annotations={"grafana_folder": "modcache"}, namespace="monitoring")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "modcache"}
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert board["uid"] == "modcache"
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "namespace"}
    titles = " | ".join(p["title"].lower() for p in board["panels"])
    for topic in DASHBOARD_TOPICS:
        assert topic.lower() in titles, topic
    assert not [c for c in render({}).of_kind("ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]


def test_every_dashboard_panel_reads_series_that_exist(render: Any) -> None:
    _, board = dashboard(render)
    used = [s for expr in panel_exprs(board) for s in selectors(expr.replace("$__rate_interval", "5m"))]
    assert len(used) >= len(DASHBOARD_TOPICS)
    series, missing = exported()
    assert not missing
    for metric, labels in used:
        assert metric in series, f"{metric} is not exported by {', '.join(EXPORTERS)}"
        unknown = labels - series[metric] - TARGET_LABELS - {"le"}
        assert not unknown, f"{metric} has no label {sorted(unknown)}"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
