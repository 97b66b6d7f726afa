"""The chart's alerts and metrics held to Prometheus' own tool, ``promtool``.

* The rendered PrometheusRule passes ``promtool check rules`` (expressions and annotation templates parse).
* Every alert has unit tests (``tests/deploy/alerts/rules_test.yaml``, run with ``promtool test rules``) in which
  it fires and in which it stays quiet; an alert added without both fails here.
* What the operator and the consumer export passes ``promtool check metrics`` (naming and type conventions).

``promtool`` comes from Debian's ``prometheus`` package; ``./dev test`` installs it when it is missing.
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from modcache import plan

CASES = Path(__file__).parent / "alerts" / "rules_test.yaml"
RULE_VALUES = {"metrics": {"prometheusRule": {"enabled": True, "runbookBaseUrl": "https://runbooks.example.org/m"}}}


@pytest.fixture(scope="session")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: install Debian's prometheus package (./dev test does it when it can)")
    return found


def run(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def rule_groups(render: Any) -> list[dict[str, Any]]:
    """The PrometheusRule's groups as rendered for release r1 in namespace apps (what the cases are written for)."""
    (rule,) = render(RULE_VALUES, release="r1", namespace="apps").of_kind("PrometheusRule")
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


def alert_names(groups: list[dict[str, Any]]) -> set[str]:
    return {r["alert"] for group in groups for r in group["rules"] if "alert" in r}


def test_the_rendered_rules_pass_promtool_check(
    promtool: str, rule_groups: list[dict[str, Any]], tmp_path: Path
) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups}))
    done = run(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_names(rule_groups))} rules found" in done.stdout


def test_every_alert_fires_and_stays_quiet_as_its_unit_tests_say(
    promtool: str, rule_groups: list[dict[str, Any]], tmp_path: Path
) -> None:
    logic = [
        {**group, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in group["rules"]]}
        for group in rule_groups
    ]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": logic}))
    shutil.copy(CASES, tmp_path / CASES.name)
    done = run(promtool, "test", "rules", CASES.name, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_firing_and_a_quiet_case(rule_groups: list[dict[str, Any]]) -> None:
    cases = yaml.safe_load(CASES.read_text())["tests"]
    checks = [check for case in cases for check in case.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in checks if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in checks if not c.get("exp_alerts")}
    alerts = alert_names(rule_groups)
    assert alerts - fires == set(), "alerts without a case where they fire"
    assert alerts - quiet == set(), "alerts without a case where they stay quiet"
    assert (fires | quiet) - alerts == set(), "cases for alerts the chart does not ship"


def operator_exposition() -> bytes:
    from modcache_operator import metrics

    meters = metrics.Metrics()
    report = plan.Report(
        plan=plan.Plan(items=()),
        applied={reason: 1 for reason in plan.Reason},
        superseded=0,
        vanished=0,
        source_count=3,
        cached_count=3,
        digest="sha256:0",
        duration_s=0.25,
    )
    meters.synced("apps", "c1", "periodic", report, at_s=datetime.datetime.now(datetime.UTC).timestamp())
    meters.failed("apps", "c1", "notify")
    meters.listener("apps", "c1", True)
    meters.counts("apps", "c1", source=3, cached=3)
    meters.conditions("apps", "c1", {"Ready": "True"})
    return meters.exposition()


def consumer_exposition() -> bytes:
    from modcache_consumer import messages, metrics

    meters = metrics.Metrics()
    for status in messages.Status:
        meters.executions.labels(status=status.value).inc()
    meters.duration.observe(0.01)
    return meters.exposition()


@pytest.mark.parametrize("exposition", [operator_exposition, consumer_exposition], ids=["operator", "consumer"])
def test_exported_metrics_pass_promtool_check(promtool: str, exposition: Any, tmp_path: Path) -> None:
    text = exposition()
    assert b"# TYPE modcache_" in text
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
    assert done.stdout.strip() == b"", done.stdout.decode()  # lint findings are printed even on success
