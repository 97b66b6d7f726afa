"""The CRD as the API server would apply it: defaults, the OpenAPI schema and the CEL rules.

Example CRs in docs/examples must be accepted; invalid specs must be rejected with the rule that names the problem.
The checker (``crd_validator`` in conftest) applies defaults, validates with jsonschema, then evaluates every
``x-kubernetes-validations`` rule with cel-python, as the API server does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from modcache_operator import names

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("modulecache*.yaml"))

Validate = Callable[[dict[str, Any]], list[str]]

VALID: dict[str, Any] = {
    "apiVersion": "modcache.dev/v1alpha1",
    "kind": "ModuleCache",
    "metadata": {"name": "x", "namespace": "ns"},
    "spec": {
        "source": {"databaseUrlSecretRef": {"name": "db", "key": "url"}},
        "cache": {"redisUrlSecretRef": {"name": "redis", "key": "url"}},
    },
}


def test_crd_names_match_the_operator(crd: dict[str, Any]) -> None:
    assert crd["spec"]["group"] == names.GROUP
    assert crd["spec"]["names"]["plural"] == names.PLURAL
    assert crd["spec"]["names"]["kind"] == names.KIND
    assert "mcache" in crd["spec"]["names"]["shortNames"]
    assert crd["spec"]["names"]["categories"]
    (version,) = crd["spec"]["versions"]
    assert version["name"] == names.VERSION
    assert version["subresources"] == {"status": {}}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_crs_are_valid(path: Path, crd_validator: Validate) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == names.KIND]
    assert documents, f"{path.name} holds no ModuleCache"
    for document in documents:
        assert crd_validator(document) == []


def test_defaults_are_applied(crd_defaults: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    spec = crd_defaults(copy.deepcopy(VALID))["spec"]
    assert spec["keyPrefix"] == "bifrost:module:"
    assert spec["resyncInterval"] == "5m"
    assert spec["deepInterval"] == "1h"
    assert spec["suspend"] is False
    assert spec["prune"] is True
    assert "ttl" not in spec


def _with(path: str, value: Any) -> dict[str, Any]:
    document = copy.deepcopy(VALID)
    *parents, leaf = path.split(".")
    node = document
    for part in parents:
        node = node.setdefault(part, {})
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return document


_DELETE = object()

INVALID = {
    "no source": ("spec.source", _DELETE, "source"),
    "no redis ref": ("spec.cache.redisUrlSecretRef", _DELETE, "redisUrlSecretRef"),
    "secret ref without key": ("spec.cache.redisUrlSecretRef", {"name": "redis"}, "key"),
    "secret name not a DNS name": ("spec.source.databaseUrlSecretRef", {"name": "Bad_Name", "key": "u"}, "Bad_Name"),
    "empty prefix": ("spec.keyPrefix", "", "keyPrefix"),
    "prefix with a space": ("spec.keyPrefix", "bifrost module:", "bifrost module:"),
    "interval not a duration": ("spec.resyncInterval", "five minutes", "five minutes"),
    "interval too short": ("spec.resyncInterval", "5s", "resyncInterval must be between 10s and 24h"),
    "interval too long": ("spec.resyncInterval", "25h", "resyncInterval must be between 10s and 24h"),
    "deep interval too short": ("spec.deepInterval", "30s", "deepInterval must be between 1m and 168h"),
    "ttl too short": ("spec.ttl", "30s", "ttl must be between 1m and 8760h"),
    "ttl not above interval": ("spec.ttl", "2m", "ttl must be longer than resyncInterval"),
    "suspend not a boolean": ("spec.suspend", "yes", "suspend"),
}


@pytest.mark.parametrize(("path", "value", "expected"), INVALID.values(), ids=INVALID.keys())
def test_invalid_specs_are_rejected(path: str, value: Any, expected: str, crd_validator: Validate) -> None:
    problems = crd_validator(_with(path, value))
    assert problems, "accepted"
    assert any(expected in problem for problem in problems), problems


def test_printer_columns_point_at_declared_fields(crd: dict[str, Any]) -> None:
    (version,) = crd["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert [n for n, c in columns.items() if not c.get("priority")] == [
        "Ready", "Status", "Modules", "Drift", "Last Sync", "Age",
    ]  # fmt: skip
    for column in columns.values():
        path = column["jsonPath"].split("[")[0].strip(".").split(".")
        if path[0] == "metadata":
            continue
        node = schema
        for part in path:
            assert part in node["properties"], f"{column['name']}: {column['jsonPath']} not declared"
            node = node["properties"][part]
