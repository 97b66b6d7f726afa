"""checkov (issue 11 item 5) on the rendered chart and on the Dockerfile: no failed check, and every check skipped
on purpose is skipped next to the resource it concerns, with its reason (``checkov.io/skipN: CKV_...=reason``
annotations on the workload; ``# checkov:skip=CKV_...: reason`` in the Dockerfile).

checkov comes from PyPI, installed on first use into its own virtualenv in the tools cache
(``~/.cache/modcache-test-tools/checkov-venv``, or ``$MODCACHE_TEST_TOOLS``), as the chart tests fetch helm.
It scans ``helm template`` output (its ``--framework helm`` trips over Helm 4's INFO line about the symlinked
``crds/``), offline (``--skip-download``).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SKIP_ANNOTATION = re.compile(r"^checkov\.io/skip\d+$")
DOCKERFILE_SKIP = re.compile(r"^# checkov:skip=(CKV\w+): (.+)$", re.M)
MIN_REASON_WORDS = 8
Render = Any


def production(values_sets: dict[str, Any]) -> dict[str, Any]:
    """The "everything" values set with the "topologies" one over it: digest, network policies, TLS files."""

    def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in extra.items():
            both = isinstance(value, dict) and isinstance(out.get(key), dict)
            out[key] = merge(out[key], value) if both else value
        return out

    return merge(values_sets["everything"], values_sets["topologies"])


def scanned(values_sets: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The renderings checkov scans: the defaults (no network policy, no digest) and production-like values."""
    return {"defaults": {}, "production": production(values_sets)}


@pytest.fixture(scope="module")
def report(
    checkov: Path, render: Render, values_sets: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, list[str]]]:
    """One checkov run (it takes seconds to start) over both renderings, a copy of the default rendering without
    the operator's skip annotations (the scan must be able to fail), and the Dockerfile: the failed checks and
    the skipped count per file."""
    scratch = tmp_path_factory.mktemp("checkov")
    files = {name: render(values).path for name, values in scanned(values_sets).items()}
    objects = render({}).objects
    for obj in objects:
        (obj.get("metadata", {}).get("annotations") or {}).pop("checkov.io/skip4", None)
    files["stripped"] = scratch / "stripped.yaml"
    files["stripped"].write_text(yaml.safe_dump_all(objects))
    files["Dockerfile"] = REPO / "Dockerfile"
    command = [str(checkov), "--framework", "kubernetes", "dockerfile", "--skip-download", "--quiet", "--compact"]
    for path in files.values():
        command += ["-f", str(path)]
    done = subprocess.run([*command, "-o", "json"], capture_output=True, text=True, timeout=900, check=False)
    try:
        results = json.loads(done.stdout)
    except ValueError:
        pytest.fail(f"checkov printed no JSON (exit {done.returncode}):\n{done.stderr[-2000:]}", pytrace=False)
    by_file: dict[str, dict[str, list[str]]] = {name: {"failed": []} for name in files}
    names = {str(path.resolve()): name for name, path in files.items()}
    for result in results if isinstance(results, list) else [results]:
        assert result["summary"]["parsing_errors"] == 0, result["check_type"]
        assert result["summary"]["passed"] > 50, result["check_type"]  # it really scanned something
        for failed in result.get("results", {}).get("failed_checks", []):
            name = names[str(Path(failed["file_abs_path"]).resolve())]
            by_file[name]["failed"].append(f"{failed['check_id']} {failed['resource']}: {failed['check_name']}")
    return by_file


@pytest.mark.parametrize("rendering", ["defaults", "production"])
def test_the_rendered_chart_passes_checkov(report: dict[str, dict[str, list[str]]], rendering: str) -> None:
    assert report[rendering]["failed"] == []


def test_the_scan_fails_a_workload_without_its_justified_skip(report: dict[str, dict[str, list[str]]]) -> None:
    assert [f for f in report["stripped"]["failed"] if f.startswith("CKV_K8S_38 Deployment")]


def test_the_dockerfile_passes_checkov_with_each_skip_justified(report: dict[str, dict[str, list[str]]]) -> None:
    assert report["Dockerfile"]["failed"] == []
    justified = DOCKERFILE_SKIP.findall((REPO / "Dockerfile").read_text())
    assert {check for check, _ in justified} == {"CKV_DOCKER_2", "CKV_DOCKER_7"}
    assert all(len(reason.split()) >= MIN_REASON_WORDS for _, reason in justified)


@pytest.mark.parametrize("rendering", ["defaults", "production"])
def test_every_skipped_check_is_justified_on_its_resource(
    render: Render, values_sets: dict[str, Any], rendering: str
) -> None:
    for obj in render(scanned(values_sets)[rendering]).objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        checks = []
        for key, value in (obj.get("metadata", {}).get("annotations") or {}).items():
            if not key.startswith("checkov.io/"):
                continue
            assert SKIP_ANNOTATION.match(key), (where, key)
            check, _, reason = value.partition("=")
            assert re.fullmatch(r"CKV2?_K8S_\d+", check), (where, value)
            assert len(reason.split()) >= MIN_REASON_WORDS, (where, value)
            checks.append(check)
        assert len(checks) == len(set(checks)), where
        pod = obj.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations") or {}
        assert not [k for k in pod if k.startswith("checkov.io/")], f"{where}: checkov reads skips on the workload"


def test_skips_that_values_make_necessary_go_away_with_those_values(render: Render) -> None:
    """No digest, no network policy: those skips exist only while the values leave them unset."""
    pinned = render({"image": {"digest": "sha256:" + "ab" * 32}, "networkPolicy": {"enabled": True}})
    for obj in pinned.of_kind("Deployment"):
        checks = {v.partition("=")[0] for v in (obj["metadata"].get("annotations") or {}).values()}
        assert not checks & {"CKV_K8S_43", "CKV2_K8S_6"}, obj["metadata"]["name"]
