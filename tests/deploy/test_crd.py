"""The ModuleCache CRD: one source shared by ``crds/`` and the chart, the shape kubectl users rely on, and every
example or chart-made ModuleCache valid against its schema (invalid ones rejected)."""

from __future__ import annotations

import copy
import tarfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "modcache"
CRD_FILE = REPO / "crds" / "modulecache.yaml"
CHART_CRD = CHART / "crds" / "modulecache.yaml"
EXAMPLES = sorted((REPO / "docs" / "examples").glob("*.yaml"))


def test_the_chart_carries_exactly_the_crd_of_crds_dir(helm_run: Any) -> None:
    assert CHART_CRD.read_bytes() == CRD_FILE.read_bytes()
    shown = helm_run("show", "crds", str(CHART)).stdout
    assert list(yaml.safe_load_all(shown)) == [yaml.safe_load(CRD_FILE.read_text())]


def test_a_packaged_chart_carries_the_same_crd(helm_run: Any, tmp_path: Path) -> None:
    """`helm package` resolves the chart's link into a real file, byte for byte the same."""
    helm_run("package", str(CHART), "-d", str(tmp_path))
    (package,) = tmp_path.glob("modcache-*.tgz")
    with tarfile.open(package) as tar:
        member = tar.extractfile("modcache/crds/modulecache.yaml")
        assert member is not None
        assert member.read() == CRD_FILE.read_bytes()


def test_the_crd_has_the_names_columns_and_status_users_rely_on(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "modulecaches.modcache.dev"
    assert (spec["group"], spec["scope"]) == ("modcache.dev", "Namespaced")
    names = spec["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("ModuleCache", "modulecaches", ["mcache"])
    assert names.get("categories")
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Ready", "Status", "Modules", "Drift", "Last Sync", "Age"]
    schema = version["schema"]["openAPIV3Schema"]["properties"]
    spec_fields = set(schema["spec"]["properties"])
    assert spec_fields >= {"source", "cache", "keyPrefix", "resyncInterval", "ttl", "suspend", "prune"}
    assert schema["spec"]["properties"]["prune"]["default"] is True
    status = schema["status"]["properties"]
    assert {"observedGeneration", "conditions", "lastHandledReconcileAt"} <= set(status)


def test_the_crd_validates_against_kubernetes_1_34(crd: dict[str, Any]) -> None:
    assert kubernetes_validate.validate(crd, "1.34.0", strict=True) == "1.34"


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_every_example_in_the_docs_is_valid(crd_problems: Any, example: Path) -> None:
    """ModuleCaches against the CRD (schema, strict fields, CEL); anything else against Kubernetes 1.34."""
    documents = [d for d in yaml.safe_load_all(example.read_text()) if d]
    assert [d for d in documents if d["kind"] == "ModuleCache"]
    for document in documents:
        if document["kind"] == "ModuleCache":
            assert crd_problems(document) == []
        else:
            assert kubernetes_validate.validate(document, "1.34.0", strict=True)


def test_the_docs_have_examples() -> None:
    assert len(EXAMPLES) >= 2


def test_the_module_cache_the_chart_creates_is_valid(
    crd_problems: Any, rendered: Any, effective_values: dict[str, Any]
) -> None:
    caches = rendered.of_kind("ModuleCache")
    assert len(caches) == int(effective_values["instance"]["enabled"])
    for cache in caches:
        assert crd_problems(cache) == []


def _minimal() -> dict[str, Any]:
    text = (REPO / "docs" / "examples" / "modulecache.yaml").read_text()
    (loaded,) = [d for d in yaml.safe_load_all(text) if d and d["kind"] == "ModuleCache"]
    return dict(loaded)


def _drop(path: str) -> Any:
    def change(cr: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = cr
        for part in parents:
            node = node[part]
        del node[last]

    return change


def _set(path: str, value: Any) -> Any:
    def change(cr: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = cr
        for part in parents:
            node = node[part]
        node[last] = value

    return change


@pytest.mark.parametrize(
    "change",
    [
        _drop("spec.source"),
        _drop("spec.cache.redisUrlSecretRef"),
        _drop("spec.source.databaseUrlSecretRef.key"),
        _set("spec.keyprefix", "typo:"),
        _set("spec.source.databaseUrl", "postgresql://inline-secret"),
        _set("spec.suspend", "yes"),
        _set("spec.resyncInterval", "five minutes"),
        _set("spec.ttl", 3600),
        _set("spec.keyPrefix", ""),
        _set("kind", "ModuleCaches"),
        _set("spec.resyncInterval", "2s"),
        _set("spec.ttl", "1m"),
    ],
    ids=[
        "no-source",
        "no-redis-ref",
        "ref-without-key",
        "misspelled-field",
        "inline-url",
        "suspend-not-bool",
        "bad-interval",
        "ttl-not-duration",
        "empty-prefix",
        "wrong-kind",
        "interval-below-cel-bound",
        "ttl-not-above-interval",
    ],
)
def test_an_invalid_module_cache_is_rejected(crd_problems: Any, change: Any) -> None:
    cr = copy.deepcopy(_minimal())
    assert crd_problems(cr) == []
    change(cr)
    assert crd_problems(cr) != []
