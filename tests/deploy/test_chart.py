"""The Helm chart, tested like code: lint, render with several values sets, validate every object against the
Kubernetes 1.34 schemas, and assert what a cluster admin would check (Pod Security, RBAC, secrets, probes)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "modcache"
COMPONENT = "app.kubernetes.io/component"
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "helm.sh/chart",
)
#: Volume types the restricted Pod Security Standard allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
#: Kinds the offline validator has no schema for; each is checked against its own schema elsewhere.
OWN_OR_THIRD_PARTY_KINDS = {"ModuleCache", "ServiceMonitor", "PrometheusRule"}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """Why a pod spec fails the restricted Pod Security Standard (Kubernetes 1.34), plus our read-only rootfs rule."""
    pod_sc = spec.get("securityContext") or {}
    found = _pod_violations(spec, pod_sc)
    containers = [*(spec.get("initContainers") or []), *spec["containers"], *(spec.get("ephemeralContainers") or [])]
    for c in containers:
        sc = c.get("securityContext") or {}
        found += [f"{c['name']}: {v}" for v in [*_privilege_violations(c, sc), *_identity_violations(sc, pod_sc)]]
    return found


def _pod_violations(spec: dict[str, Any], pod_sc: dict[str, Any]) -> list[str]:
    found = [f"{field} is set" for field in ("hostNetwork", "hostPID", "hostIPC") if spec.get(field)]
    if pod_sc.get("sysctls"):
        found.append("pod sets sysctls")
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        found.append("pod is a Windows hostProcess")
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']} has type {sorted(kinds)}")
    return found


def _privilege_violations(c: dict[str, Any], sc: dict[str, Any]) -> list[str]:
    found = []
    if sc.get("privileged"):
        found.append("privileged")
    if sc.get("allowPrivilegeEscalation") is not False:
        found.append("allowPrivilegeEscalation is not false")
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        found.append("does not drop ALL capabilities")
    if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
        found.append(f"adds capabilities {caps['add']}")
    if sc.get("procMount", "Default") != "Default":
        found.append(f"procMount {sc['procMount']}")
    found += [f"hostPort {port['hostPort']}" for port in c.get("ports") or [] if port.get("hostPort")]
    if sc.get("readOnlyRootFilesystem") is not True:
        found.append("root filesystem is writable")
    return found


def _identity_violations(sc: dict[str, Any], pod_sc: dict[str, Any]) -> list[str]:
    found = []
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
        found.append("runAsNonRoot is not true")
    if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
        found.append("runAsUser 0")
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        found.append(f"seccompProfile {seccomp!r}")
    selinux = sc.get("seLinuxOptions") or pod_sc.get("seLinuxOptions") or {}
    if selinux.get("user") or selinux.get("role"):
        found.append("custom SELinux user/role")
    if selinux.get("type") not in (None, "", "container_t", "container_init_t", "container_kvm_t"):
        found.append(f"SELinux type {selinux['type']}")
    apparmor = (sc.get("appArmorProfile") or pod_sc.get("appArmorProfile") or {}).get("type")
    if apparmor not in (None, "RuntimeDefault", "Localhost"):
        found.append(f"appArmorProfile {apparmor}")
    return found


@pytest.mark.parametrize(
    ("change", "violation"),
    [
        (lambda s: s.update(hostNetwork=True), "hostNetwork"),
        (
            lambda s: [
                s["securityContext"].pop("seccompProfile"),
                s["containers"][0]["securityContext"].pop("seccompProfile"),
            ],
            "seccompProfile",
        ),
        (lambda s: s["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True), "allowPrivilegeEscal"),
        (lambda s: s["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]), "drop ALL"),
        (lambda s: s["containers"][0]["securityContext"].update(runAsUser=0), "runAsUser 0"),
        (lambda s: s["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False), "writable"),
        (lambda s: s["volumes"].append({"name": "host", "hostPath": {"path": "/"}}), "hostPath"),
        (lambda s: s["containers"][0]["ports"].append({"containerPort": 80, "hostPort": 80}), "hostPort"),
    ],
    ids=["hostNetwork", "no-seccomp", "escalation", "capabilities", "root", "writable-root", "hostPath", "hostPort"],
)
def test_the_pod_security_check_catches_a_violation(render: Any, change: Any, violation: str) -> None:
    """The checker below is only worth something if it fails on a pod that breaks the standard."""
    (_, _, spec) = render({}).pods()[0]
    spec = yaml.safe_load(yaml.safe_dump(spec))
    assert restricted_violations(spec) == []
    change(spec)
    assert any(violation in v for v in restricted_violations(spec)), restricted_violations(spec)


def component_of(obj: dict[str, Any]) -> str | None:
    return (obj.get("metadata", {}).get("labels") or {}).get(COMPONENT)


def containers(rendered: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{where}/{c['name']}", c) for where, _, spec in rendered.pods() for c in spec["containers"]]


def test_lint_strict_passes_for_every_values_set(helm_run: Any, values: dict[str, Any], tmp_path: Path) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    done = helm_run("lint", "--strict", str(CHART), "-f", str(values_file), check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout
    assert "[WARNING]" not in done.stdout
    assert "[ERROR]" not in done.stdout


def test_helm_3_lints_and_renders_exactly_what_helm_4_renders(
    helm3_run: Any, render: Any, values: dict[str, Any], tmp_path: Path
) -> None:
    """Many clusters are still managed with Helm 3: the chart must mean the same there."""
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    lint = helm3_run("lint", "--strict", str(CHART), "-f", str(values_file))
    assert "0 chart(s) failed" in lint.stdout
    args = ["template", "r1", str(CHART), "-n", "apps", "--include-crds", "-f", str(values_file)]
    assert helm3_run(*args).stdout == render(values).text


def test_every_object_validates_against_kubernetes_1_34(rendered: Any) -> None:
    """kubernetes-validate --strict: unknown fields, wrong types and missing required fields are errors."""
    command = [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.34.0", "--quiet", str(rendered.path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert not [line for line in lines if line.startswith(("ERROR", "FATAL"))]
    unvalidated = {m.group(1) for line in lines if (m := re.search(r"schema for kind (\w+) ", line))}
    assert unvalidated <= OWN_OR_THIRD_PARTY_KINDS, lines
    assert len(rendered.objects) >= 5


def test_every_pod_meets_the_restricted_pod_security_standard(rendered: Any) -> None:
    pods = rendered.pods()
    assert pods
    for where, _, spec in pods:
        assert restricted_violations(spec) == [], where


#: The one writable mount besides /tmp: the consumer pod's socket directory, shared with its executor.
SOCKET_DIR = "/run/modcache"


def test_every_container_writes_only_to_emptydirs_and_has_resources(rendered: Any) -> None:
    for where, _, spec in rendered.pods():
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounted_by = Counter(m["name"] for c in spec["containers"] for m in c["volumeMounts"])
        for c in spec["containers"]:
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            tmp = mounts["/tmp"]["name"]
            assert "emptyDir" in volumes[tmp], where
            assert mounted_by[tmp] == 1, (where, "a /tmp shared with another container")
            writable = {path for path, m in mounts.items() if not m.get("readOnly")}
            assert writable <= {"/tmp", SOCKET_DIR}, where
            assert all("emptyDir" in volumes[mounts[path]["name"]] for path in writable), where
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert "memory" in c["resources"]["limits"], where


def test_no_rbac_rule_uses_a_wildcard(rendered: Any) -> None:
    for role in rendered.of_kind("Role") + rendered.of_kind("ClusterRole"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert not any("*" in item for item in rule.get(field, [])), (role["metadata"]["name"], rule)


def test_a_cluster_role_exists_only_when_asked(rendered: Any, effective_values: dict[str, Any]) -> None:
    cluster_wide = effective_values["rbac"]["clusterWide"]
    assert bool(rendered.of_kind("ClusterRole")) is cluster_wide
    assert bool(rendered.of_kind("ClusterRoleBinding")) is cluster_wide
    assert len(rendered.of_kind("ClusterRole")) <= 1


def granted(rendered: Any, kind: str, component: str = "operator") -> set[tuple[str, str, str, str]]:
    """(apiGroup, resource, verb, resourceName or '') granted by the Roles/ClusterRoles of a kind and component."""
    out = set()
    for role in rendered.of_kind(kind):
        if component_of(role) != component:
            continue
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        for name in rule.get("resourceNames") or [""]:
                            out.add((group, resource, verb, name))
    return out


def expand(rules: dict[tuple[str, str], str]) -> set[tuple[str, str, str, str]]:
    return {(g, r, v, "") for (g, r), verbs in rules.items() for v in verbs.split()}


OPERATOR_RULES = {
    ("modcache.dev", "modulecaches"): "get list watch patch",
    ("modcache.dev", "modulecaches/status"): "get patch",
    ("", "events"): "create patch",
    ("events.k8s.io", "events"): "create patch",
    ("", "secrets"): "get",  # by name only: no Secret list or watch, namespaced or cluster-wide
}
CLUSTER_SCAN_RULES = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): "get list watch",
    ("", "namespaces"): "list watch",
}


def test_the_operator_gets_exactly_the_verbs_it_uses(rendered: Any, effective_values: dict[str, Any]) -> None:
    lease = "r1-modcache-operator"
    if not effective_values["rbac"]["create"]:
        assert [o["kind"] for o in rendered.objects if o["kind"].endswith(("Role", "RoleBinding"))] == []
        return
    if effective_values["rbac"]["clusterWide"]:
        assert granted(rendered, "ClusterRole") == expand(OPERATOR_RULES | CLUSTER_SCAN_RULES)
        namespaced = set()
    else:
        namespaced = expand(OPERATOR_RULES)
    namespaced |= {("coordination.k8s.io", "leases", "create", "")}  # the one-writer Lease, one name only
    namespaced |= {("coordination.k8s.io", "leases", v, lease) for v in ("get", "update", "patch")}
    assert granted(rendered, "Role") == namespaced
    bindings = rendered.of_kind("RoleBinding") + rendered.of_kind("ClusterRoleBinding")
    for binding in [b for b in bindings if component_of(b) == "operator"]:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "r1-modcache-operator", "namespace": "apps"}]
        bound = [
            r
            for r in rendered.of_kind(binding["roleRef"]["kind"])
            if r["metadata"]["name"] == binding["roleRef"]["name"]
        ]
        assert len(bound) == 1
        assert bound[0]["metadata"].get("namespace") == binding["metadata"].get("namespace")


def test_no_role_lets_the_operator_list_or_watch_secrets(rendered: Any) -> None:
    """A Secret list or watch would read every Secret in scope (cluster-wide with --all-namespaces)."""
    for kind in ("Role", "ClusterRole"):
        verbs = {verb for group, resource, verb, _ in granted(rendered, kind) if (group, resource) == ("", "secrets")}
        assert verbs <= {"get"}, (kind, verbs)


def test_the_consumer_mounts_no_service_account_token(rendered: Any, effective_values: dict[str, Any]) -> None:
    pods = [(m, s) for _, m, s in rendered.pods() if m["labels"][COMPONENT] == "consumer"]
    if not effective_values["consumer"]["enabled"]:
        assert pods == []
        return
    ((_, spec),) = pods
    assert spec["automountServiceAccountToken"] is False
    account = [a for a in rendered.of_kind("ServiceAccount") if a["metadata"]["name"] == spec["serviceAccountName"]]
    assert len(account) == int(effective_values["consumer"]["serviceAccount"]["create"])
    assert all(a["automountServiceAccountToken"] is False for a in account)
    bindings = rendered.of_kind("RoleBinding") + rendered.of_kind("ClusterRoleBinding")
    assert not [b for b in bindings if any(s["name"] == spec["serviceAccountName"] for s in b["subjects"])]
    for where, metadata, pod in rendered.pods():
        if metadata["labels"][COMPONENT] not in ("operator", "cleanup"):  # the two that talk to the API
            assert pod["automountServiceAccountToken"] is False, where


def secret_file_sources(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """``MODCACHE_*_FILE`` variable -> (Secret name, key) it reads, through the container's read-only mounts of
    projected Secret volumes; a variable pointing anywhere else is missing from the result."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    files: dict[str, tuple[str, str]] = {}
    for mount in container.get("volumeMounts", []):
        projected = volumes[mount["name"]].get("projected")
        if not projected or not mount.get("readOnly"):
            continue
        for source in projected["sources"]:
            for item in source["secret"]["items"]:
                files[f"{mount['mountPath']}/{item['path']}"] = (source["secret"]["name"], item["key"])
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    return {name: files[path] for name, path in env.items() if name.endswith("_FILE") and path in files}


def test_secrets_reach_containers_only_as_files(rendered: Any, effective_values: dict[str, Any]) -> None:
    """No secret in any environment (checkov CKV_K8S_35, and /proc/<pid>/environ): connection settings come
    as MODCACHE_<NAME>_FILE pointing into a read-only Secret volume."""
    secret_like = re.compile(r"^MODCACHE_(\w+_URL|SECRETS_KEY)$")
    refs = effective_values["secretRefs"]
    seen: dict[str, set[str]] = {}
    for where, _, spec in rendered.pods():
        for c in spec["containers"]:
            assert "envFrom" not in c, where
            for env in c.get("env", []):
                assert not secret_like.match(env["name"]), (where, env["name"])
                assert "secretKeyRef" not in (env.get("valueFrom") or {}), (where, env["name"])
            sources = secret_file_sources(spec, c)
            seen[c["name"]] = set(sources)
            for name, (secret, key) in sources.items():
                ref = {"MODCACHE_DATABASE_URL_FILE": refs["databaseUrl"], "MODCACHE_REDIS_URL_FILE": refs["redisUrl"]}
                ref |= {"MODCACHE_AMQP_URL_FILE": refs["amqpUrl"], "MODCACHE_SECRETS_KEY_FILE": refs["secretsKey"]}
                ref["MODCACHE_REDIS_SENTINEL_PASSWORD_FILE"] = effective_values["redis"]["sentinel"][
                    "passwordSecretRef"
                ]
                assert (secret, key) == (ref[name]["name"], ref[name]["key"]), (where, name)
    named = effective_values["redis"]["sentinel"]["passwordSecretRef"]["name"]
    sentinel = {"MODCACHE_REDIS_SENTINEL_PASSWORD_FILE"} if named else set()  # every pod that connects
    if effective_values["consumer"]["enabled"]:
        assert (
            seen["consumer"]
            == {
                "MODCACHE_DATABASE_URL_FILE",
                "MODCACHE_REDIS_URL_FILE",
                "MODCACHE_AMQP_URL_FILE",
                "MODCACHE_SECRETS_KEY_FILE",
            }
            | sentinel
        )
    if effective_values["tests"]["enabled"]:
        assert seen["sync"] == {"MODCACHE_DATABASE_URL_FILE", "MODCACHE_REDIS_URL_FILE"} | sentinel
    assert seen["operator"] == sentinel
    workloads = yaml.safe_dump([o for o in rendered.objects if o["kind"] != "CustomResourceDefinition"])
    assert not re.search(r"(postgres(ql)?|rediss?|amqps?)://", workloads)
    assert not rendered.of_kind("Secret")


def test_consumer_settings_follow_values(rendered: Any, effective_values: dict[str, Any]) -> None:
    consumer = effective_values["consumer"]
    found = [c for where, c in containers(rendered) if c["name"] == "consumer"]
    if not consumer["enabled"]:
        assert found == []
        return
    env = {e["name"]: e.get("value") for e in found[0]["env"]}
    assert env["MODCACHE_CONSUMER_CONCURRENCY"] == str(consumer["concurrency"])
    assert env["MODCACHE_KEY_PREFIX"] == effective_values["keyPrefix"]
    secrets = {"MODCACHE_AMQP_URL", "MODCACHE_SECRETS_KEY", "MODCACHE_DATABASE_URL", "MODCACHE_REDIS_URL"}
    assert set(env) >= {f"{name}_FILE" for name in secrets}
    assert env["MODCACHE_EXECUTOR_SOCKET"] == f"{SOCKET_DIR}/executor.sock"
    assert rendered.one("Deployment", "consumer")["spec"]["replicas"] == consumer["replicas"]


def test_every_object_carries_the_standard_labels(rendered: Any) -> None:
    for obj in rendered.objects:
        if obj["kind"] == "CustomResourceDefinition":
            continue
        missing = [k for k in STANDARD_LABELS if k not in (obj["metadata"].get("labels") or {})]
        assert missing == [], (obj["kind"], obj["metadata"]["name"])
    for where, metadata, _ in rendered.pods():
        assert metadata["labels"][COMPONENT] in ("operator", "consumer", "test", "cleanup"), where
    for deployment in rendered.of_kind("Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        template = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= template.items()
        assert selector[COMPONENT] == component_of(deployment)


def test_the_operator_runs_as_configured(rendered: Any, effective_values: dict[str, Any]) -> None:
    operator = effective_values["operator"]
    deployment = rendered.one("Deployment", "operator")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[: args.index("operator")] == ["-v"] * operator["logVerbosity"]
    if effective_values["rbac"]["clusterWide"]:
        assert "--all-namespaces" in args
        assert "--namespace" not in args
    else:
        assert args[args.index("--namespace") + 1] == (operator["watchNamespace"] or "apps")
    assert args[args.index("--metrics-port") + 1] == str(operator["metricsPort"])
    assert args[args.index("--health-port") + 1] == str(operator["healthPort"])
    assert deployment["spec"]["replicas"] == operator["replicas"]
    strategy = deployment["spec"]["strategy"]["type"]
    if operator["leaderElection"]["enabled"]:
        assert strategy == "RollingUpdate"
        assert args[args.index("--lease-name") + 1] == "r1-modcache-operator"
    else:
        assert strategy == "Recreate"
        assert not [a for a in args if a.startswith("--lease")]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": operator["metricsPort"], "health": operator["healthPort"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}


def test_the_consumer_is_probed_for_liveness_and_readiness(rendered: Any, effective_values: dict[str, Any]) -> None:
    if not effective_values["consumer"]["enabled"]:
        return
    container, _executor = rendered.one("Deployment", "consumer")["spec"]["template"]["spec"]["containers"]
    assert container["args"][container["args"].index("consumer") :] == [
        "consumer",
        "--metrics-port",
        str(effective_values["consumer"]["metricsPort"]),
        "--health-port",
        str(effective_values["consumer"]["healthPort"]),
    ]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}


def test_one_image_for_every_pod(rendered: Any, effective_values: dict[str, Any]) -> None:
    images = {c["image"] for _, c in containers(rendered) if c["name"] != "executor"}  # its own: test_executor.py
    image = effective_values["image"]
    expected = f"{image['repository']}@{image['digest']}" if image["digest"] else f"{image['repository']}:0.1.0"
    assert images == {expected}
    for where, c in containers(rendered):  # the image's ENTRYPOINT `modcache`, but for the uninstall hook's script
        assert c.get("command", ["python", "/hook/release-modulecache.py"]) == [
            "python",
            "/hook/release-modulecache.py",
        ]
        assert ("command" in c) is (c["name"] == "cleanup"), where


def test_the_helm_test_hook_syncs_once_with_the_project_image(rendered: Any, effective_values: dict[str, Any]) -> None:
    hooks = [p for p in rendered.of_kind("Pod") if (p["metadata"].get("annotations") or {}).get("helm.sh/hook")]
    if not effective_values["tests"]["enabled"]:
        assert hooks == []
        return
    (hook,) = hooks
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = hook["spec"]["containers"]
    assert container["args"][-2:] == ["sync", "--once"]
    assert hook["spec"]["restartPolicy"] == "Never"
    env = {e["name"] for e in container["env"]}
    topology = {n for n in env if "_SSL_" in n or "SENTINEL" in n}  # TLS files and checks (test_topologies_chart)
    assert env - topology == {"MODCACHE_DATABASE_URL_FILE", "MODCACHE_REDIS_URL_FILE", "MODCACHE_KEY_PREFIX"}


def test_the_module_cache_instance_follows_values(rendered: Any, effective_values: dict[str, Any]) -> None:
    instance = effective_values["instance"]
    caches = rendered.of_kind("ModuleCache")
    if not instance["enabled"]:
        assert caches == []
        return
    (cache,) = caches
    spec = cache["spec"]
    refs = effective_values["secretRefs"]
    assert cache["metadata"]["namespace"] == "apps"
    assert spec["source"]["databaseUrlSecretRef"] == refs["databaseUrl"]
    assert spec["cache"]["redisUrlSecretRef"] == refs["redisUrl"]
    assert ("listenDatabaseUrlSecretRef" in spec["source"]) is bool(refs["listenDatabaseUrl"]["name"])
    assert spec["keyPrefix"] == effective_values["keyPrefix"]
    assert spec["resyncInterval"] == instance["resyncInterval"]
    assert spec.get("ttl", "") == instance["ttl"]
    assert (spec["suspend"], spec["prune"]) == (instance["suspend"], instance["prune"])


def test_metrics_services_select_their_pods(rendered: Any, effective_values: dict[str, Any]) -> None:
    services = rendered.of_kind("Service")
    expected = {"operator"} | ({"consumer"} if effective_values["consumer"]["enabled"] else set())
    assert {component_of(s) for s in services} == expected
    pods = {m["labels"][COMPONENT]: (m, s) for _, m, s in rendered.pods()}
    for service in services:
        metadata, spec = pods[component_of(service)]
        assert service["spec"]["selector"].items() <= metadata["labels"].items()
        (port,) = service["spec"]["ports"]
        container_ports = {p["name"]: p["containerPort"] for p in spec["containers"][0]["ports"]}
        assert port["targetPort"] == "metrics"
        assert port["port"] == container_ports["metrics"]
    monitors = rendered.of_kind("ServiceMonitor")
    assert bool(monitors) is effective_values["metrics"]["serviceMonitor"]["enabled"]
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert [s for s in services if selector.items() <= s["metadata"]["labels"].items()] == services
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
        assert monitor["spec"]["endpoints"][0]["honorLabels"] is True  # keep the ModuleCache's namespace label
        assert monitor["metadata"]["labels"].items() >= effective_values["metrics"]["serviceMonitor"]["labels"].items()


def test_alerts_carry_severity_summary_and_runbook(rendered: Any, effective_values: dict[str, Any]) -> None:
    config = effective_values["metrics"]["prometheusRule"]
    rules = rendered.of_kind("PrometheusRule")
    assert bool(rules) is config["enabled"]
    if not rules:
        return
    runbooks = (REPO / "docs" / "runbooks.md").read_text()
    alerts = [r for group in rules[0]["spec"]["groups"] for r in group["rules"]]
    names = {a["alert"] for a in alerts}
    assert {"ModuleCacheNotReady", "ModuleCacheSyncStale", "ModcacheOperatorDown"} <= names
    assert ("ModcacheConsumerDown" in names) is effective_values["consumer"]["enabled"]
    for alert in alerts:
        assert alert["labels"]["severity"] in ("critical", "warning")
        assert alert["annotations"]["summary"]
        assert alert["annotations"]["description"].startswith("Runbook: 1. ")
        assert f"## {alert['alert']}" in runbooks, f"docs/runbooks.md has no section for {alert['alert']}"
        base = config["runbookBaseUrl"]
        assert alert["annotations"].get("runbook_url") == (f"{base}#{alert['alert'].lower()}" if base else None)
        assert re.fullmatch(r"[0-9]+[smh]", alert["for"])


def test_disruption_budgets_cover_replicated_components(rendered: Any, effective_values: dict[str, Any]) -> None:
    budgets = {component_of(b): b for b in rendered.of_kind("PodDisruptionBudget")}
    config = effective_values["podDisruptionBudget"]
    expected = set()
    if config["enabled"]:
        expected |= {"consumer"} if effective_values["consumer"]["enabled"] else set()
        expected |= {"operator"} if effective_values["operator"]["replicas"] > 1 else set()
    assert set(budgets) == expected
    pods = {m["labels"][COMPONENT]: m for _, m, _ in rendered.pods()}
    for component, budget in budgets.items():
        assert budget["spec"]["selector"]["matchLabels"].items() <= pods[component]["labels"].items()
        wanted = config[component]
        key = "minAvailable" if wanted.get("minAvailable") is not None else "maxUnavailable"
        assert {k: v for k, v in budget["spec"].items() if k != "selector"} == {key: wanted[key]}


def test_network_policies_allow_only_the_needed_traffic(rendered: Any, effective_values: dict[str, Any]) -> None:
    policies = {component_of(p): p for p in rendered.of_kind("NetworkPolicy")}
    config = effective_values["networkPolicy"]
    if not config["enabled"]:
        assert policies == {}
        return
    needs = {
        "operator": ("dns", "postgresql", "redis", "apiServer"),
        "consumer": ("dns", "postgresql", "redis", "rabbitmq"),
    }
    pods = {m["labels"][COMPONENT]: m for _, m, _ in rendered.pods()}
    assert set(policies) == {c for c in needs if c in pods}
    for component, policy in policies.items():
        spec = policy["spec"]
        assert spec["podSelector"]["matchLabels"].items() <= pods[component]["labels"].items()
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        (ingress,) = spec["ingress"]
        assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
        assert ingress.get("from", []) == config["metrics"]["from"]
        allowed = {(p["port"], p["protocol"]) for rule in spec["egress"] for p in rule["ports"]}
        wanted = {(port, "TCP") for need in needs[component] for port in config[need]["ports"]}
        wanted |= {(port, "UDP") for port in config["dns"]["ports"]}
        if effective_values["redis"]["topology"] == "sentinel":
            wanted.add((26379, "TCP"))  # the sentinels, asked for the master first
        assert allowed == wanted
        postgres = [r for r in spec["egress"] if {p["port"] for p in r["ports"]} == set(config["postgresql"]["ports"])]
        assert postgres[0].get("to", []) == config["postgresql"]["to"]


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"consumer": {"replcas": 3}}, "replcas"),
        ({"instnace": {"enabled": False}}, "instnace"),
        ({"networkPolicy": {"enabled": True, "postgres": {"ports": [5432]}}}, "postgres"),
        ({"operator": {"leaderElection": {"enable": True}}}, "enable"),
        ({"secretRefs": {"redisUrl": {"name": "x", "key": "y", "optional": True}}}, "optional"),
    ],
    ids=["consumer.replcas", "instnace", "networkPolicy.postgres", "leaderElection.enable", "secretRefs.optional"],
)
def test_the_schema_rejects_a_misspelled_key(
    helm_run: Any, tmp_path: Path, values: dict[str, Any], complaint: str
) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    done = helm_run("template", "r1", str(CHART), "-f", str(values_file), check=False)
    assert done.returncode != 0
    assert "schema" in done.stderr, done.stderr
    assert complaint in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"operator": {"replicas": 2}}, "requires operator.leaderElection.enabled"),
        ({"operator": {"watchNamespace": "elsewhere"}}, "would not see"),
        ({"podSecurity": {"runAsUser": 0}}, "runAsUser"),
        ({"instance": {"resyncInterval": "5 minutes"}}, "resyncInterval"),
        ({"secretRefs": {"databaseUrl": {"name": "", "key": "url"}}}, "databaseUrl"),
        ({"consumer": {"executor": {"runAsUser": 10001}}}, "executor.runAsUser must differ from podSecurity.runAsUser"),
        ({"consumer": {"executor": {"runAsUser": 0}}}, "runAsUser"),
    ],
    ids=[
        "ha-without-election",
        "instance-not-watched",
        "root",
        "interval",
        "no-db-secret",
        "executor-as-consumer",
        "executor-as-root",
    ],
)
def test_a_broken_combination_fails_with_a_clear_message(
    helm_run: Any, tmp_path: Path, values: dict[str, Any], complaint: str
) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    done = helm_run("template", "r1", str(CHART), "-f", str(values_file), check=False)
    assert done.returncode != 0
    assert complaint in done.stderr, done.stderr


def test_values_yaml_and_every_values_set_satisfy_the_schema(
    values_schema: dict[str, Any], effective_values: dict[str, Any]
) -> None:
    jsonschema.Draft7Validator.check_schema(values_schema)
    jsonschema.validate(effective_values, values_schema)


def test_every_object_of_the_schema_is_closed(values_schema: dict[str, Any]) -> None:
    """additionalProperties is false on every chart-owned object, so no typo passes anywhere."""

    def walk(node: dict[str, Any], where: str) -> list[str]:
        open_ = []
        if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
            open_.append(where)
        for key, child in (node.get("properties") or {}).items():
            open_ += walk(child, f"{where}.{key}")
        return open_

    assert walk(values_schema, "values") == []


def test_notes_tell_how_to_check_wait_resync_and_unstick(helm_run: Any) -> None:
    done = helm_run("install", "r1", str(CHART), "-n", "apps", "--dry-run=client")
    notes = done.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n apps get modulecaches" in notes
    assert "kubectl -n apps wait modulecache/r1-modcache --for=condition=Ready" in notes
    assert "modcache.dev/resync-requested-at=" in notes
    assert "finalizer modcache.dev/finalizer" in notes
    assert '[{"op":"remove","path":"/metadata/finalizers"}]' in notes
    assert "kubectl apply -f crds/modulecache.yaml" in notes
    assert "deletes this release's ModuleCache first (a pre-delete hook)" in notes


def test_the_uninstall_hook_releases_only_the_charts_module_cache(
    rendered: Any, effective_values: dict[str, Any]
) -> None:
    hooked = [o for o in rendered.objects if component_of(o) == "cleanup"]
    instance = effective_values["instance"]
    if not (instance["enabled"] and instance["uninstallHook"]["enabled"] and effective_values["rbac"]["create"]):
        assert hooked == []
        return
    kinds = sorted(o["kind"] for o in hooked)
    assert kinds == ["ConfigMap", "Job", "Role", "RoleBinding", "ServiceAccount"]
    for obj in hooked:
        annotations = obj["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-delete"
        assert "hook-succeeded" in annotations["helm.sh/hook-delete-policy"]
    weights = {o["kind"]: int(o["metadata"]["annotations"]["helm.sh/hook-weight"]) for o in hooked}
    assert all(weights[k] < weights["Job"] for k in kinds if k != "Job")  # RBAC and script exist before the Job
    assert granted(rendered, "Role", "cleanup") == {
        ("modcache.dev", "modulecaches", verb, "r1-modcache") for verb in ("get", "delete", "patch")
    }
    (config_map,) = [o for o in hooked if o["kind"] == "ConfigMap"]
    script = (CHART / "files" / "release-modulecache.py").read_text()
    assert config_map["data"] == {"release-modulecache.py": script}
    (job,) = [o for o in hooked if o["kind"] == "Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {
        "MODCACHE_CLEANUP_NAMESPACE": "apps",
        "MODCACHE_CLEANUP_NAME": "r1-modcache",
        "MODCACHE_CLEANUP_TIMEOUT_S": str(instance["uninstallHook"]["timeoutSeconds"]),
    }
    assert job["spec"]["activeDeadlineSeconds"] > instance["uninstallHook"]["timeoutSeconds"]
