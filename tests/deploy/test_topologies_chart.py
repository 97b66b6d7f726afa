"""The chart's values for Sentinel, Cluster and TLS (docs/topologies.md): CA bundles and client certificates come
from the Secrets/ConfigMaps the values name, mounted read-only as files, and the settings point at those files in
every pod that connects (operator, consumer, helm test); the schema and the templates refuse what would not work.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "modcache"
DOC = Path(__file__).resolve().parents[2] / "docs" / "topologies.md"
TOPOLOGIES: dict[str, Any] = {  # the "topologies" values set of conftest.VALUES_SETS
    "redis": {
        "topology": "sentinel",
        "tls": {"caBundle": {"configMap": "redis-ca"}, "clientCertificate": {"secret": "redis-client"}},
        "sentinel": {"passwordSecretRef": {"name": "redis-sentinel"}},
    },
    "postgres": {
        "tls": {
            "mode": "verify-full",
            "caBundle": {"secret": "pg-ca", "key": "root.crt"},
            "clientCertificate": {"secret": "pg-client"},
        }
    },
    "networkPolicy": {"enabled": True},
}
CLUSTER = {"keyPrefix": "{bifrost}:module:", "redis": {"topology": "cluster"}}
Render = Any

FILE_SETTINGS = {
    "MODCACHE_REDIS_SSL_CA_FILE": ("redis-ca", "ca.crt"),
    "MODCACHE_REDIS_SSL_CERT_FILE": ("redis-client", "tls.crt"),
    "MODCACHE_REDIS_SSL_KEY_FILE": ("redis-client", "tls.key"),
    "MODCACHE_DATABASE_SSL_ROOT_CERT_FILE": ("pg-ca", "root.crt"),
    "MODCACHE_DATABASE_SSL_CERT_FILE": ("pg-client", "tls.crt"),
    "MODCACHE_DATABASE_SSL_KEY_FILE": ("pg-client", "tls.key"),
}


def _source(volume: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """(Secret or ConfigMap name, mounted path -> key) of a volume."""
    if "secret" in volume:
        ref = volume["secret"]
        return ref["secretName"], {i["path"]: i["key"] for i in ref["items"]}
    ref = volume["configMap"]
    return ref["name"], {i["path"]: i["key"] for i in ref["items"]}


def test_every_connecting_pod_reads_the_tls_files_from_the_referenced_objects(render: Render) -> None:
    rendered = render(TOPOLOGIES)
    pods = [(where, spec) for where, _, spec in rendered.pods() if "operator" in where or "consumer" in where]
    pods += [(where, spec) for where, _, spec in rendered.pods() if "test-sync" in where]
    assert len(pods) == 3
    for where, spec in pods:
        volumes = {v["name"]: v for v in spec["volumes"]}
        container = spec["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        for setting, (source, key) in FILE_SETTINGS.items():
            path = Path(env[setting]["value"])
            mount = mounts[str(path.parent)]
            assert mount["readOnly"] is True, (where, setting)
            name, items = _source(volumes[mount["name"]])
            assert (name, items[path.name]) == (source, key), (where, setting)
            assert volumes[mount["name"]].get("secret", volumes[mount["name"]].get("configMap"))["defaultMode"] == 0o440
        assert env["MODCACHE_DATABASE_SSL_MODE"]["value"] == "verify-full"
        assert env["MODCACHE_REDIS_SSL_CERT_REQS"]["value"] == "required"
        assert "MODCACHE_REDIS_SENTINEL_PASSWORD" not in env  # a file, never the environment
        password = Path(env["MODCACHE_REDIS_SENTINEL_PASSWORD_FILE"]["value"])
        (secrets,) = [v for v in volumes.values() if "projected" in v]
        mount = mounts[str(password.parent)]
        assert mount["name"] == secrets["name"]
        assert {"name": "redis-sentinel", "items": [{"key": "sentinel-password", "path": password.name}]} in [
            s["secret"] for s in secrets["projected"]["sources"]
        ]


def test_by_default_no_topology_setting_or_volume_is_rendered(render: Render) -> None:
    for where, _, spec in render({}).pods():
        names = {e["name"] for c in spec["containers"] for e in c.get("env", [])}
        assert not {n for n in names if "_SSL_" in n or "SENTINEL" in n}, where
        assert not {v["name"] for v in spec["volumes"]} & {"redis-ca", "redis-client", "postgres-ca", "postgres-client"}


def test_a_sentinel_topology_opens_the_sentinel_port_in_the_network_policy(render: Render) -> None:
    for policy in render(TOPOLOGIES).of_kind("NetworkPolicy"):
        ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
        assert {6379, 26379} <= ports, policy["metadata"]["name"]


def test_a_cluster_topology_passes_its_tagged_prefix_on(render: Render) -> None:
    rendered = render(CLUSTER)
    prefixes = {
        e["value"]
        for _, _, spec in rendered.pods()
        for c in spec["containers"]
        for e in c.get("env", [])
        if e["name"] == "MODCACHE_KEY_PREFIX"
    }
    assert prefixes == {"{bifrost}:module:"}
    assert rendered.one("ModuleCache")["spec"]["keyPrefix"] == "{bifrost}:module:"


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"redis": {"topology": "clustered"}}, "topology"),
        ({"redis": {"topology": "cluster"}}, "keyPrefix"),  # the default prefix has no hash tag
        ({"redis": {"topology": "cluster"}, "keyPrefix": "bifrost:{}module:"}, "keyPrefix"),
        ({"redis": {"tls": {"caBundle": {"secret": "a", "configMap": "b"}}}}, "caBundle"),
        ({"redis": {"tls": {"certReqs": "maybe"}}}, "certReqs"),
        ({"redis": {"tls": {"clientCert": {"secret": "x"}}}}, "clientCert"),
        ({"postgres": {"tls": {"mode": "verify_full"}}}, "mode"),
        ({"postgres": {"tls": {"caBundle": {"secret": "Not_A_Name"}}}}, "secret"),
    ],
    ids=["topology", "untagged-cluster", "empty-tag", "two-ca-sources", "cert-reqs", "misspelled", "sslmode", "name"],
)
def test_the_schema_refuses_topology_values_that_would_not_work(
    helm_run: Any, tmp_path: Path, values: dict[str, Any], complaint: str
) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    done = helm_run("template", "r1", str(CHART), "-f", str(values_file), check=False)
    assert done.returncode != 0
    assert "schema" in done.stderr, done.stderr
    assert complaint in done.stderr, done.stderr


def _doc_examples() -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", DOC.read_text(), re.M | re.S)


def test_docs_topologies_has_chart_examples() -> None:
    assert _doc_examples(), "docs/topologies.md lost its chart values examples"


@pytest.mark.parametrize("number", range(len(_doc_examples())))
def test_every_chart_example_in_docs_topologies_renders_against_the_chart(
    number: int, helm_run: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """A values example a reader copies must pass the chart's schema and templates as written."""
    example = _doc_examples()[number]
    values = tmp_path / "values.yaml"
    values.write_text(example)
    done = helm_run("template", "r1", str(CHART), "-n", "apps", "-f", str(values), check=False)
    assert done.returncode == 0, f"docs/topologies.md example {number + 1}:\n{example}\n{done.stderr}"
    deployments = [d for d in yaml.safe_load_all(done.stdout) if d and d.get("kind") == "Deployment"]
    mounted = yaml.safe_dump(deployments)
    for name in re.findall(r"(?:configMap|secret|name): ([\w-]+)", example):  # every object the example names
        assert f" {name}\n" in mounted, f"docs/topologies.md example {number + 1}: {name!r} is not used"
