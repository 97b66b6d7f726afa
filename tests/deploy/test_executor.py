"""The consumer pod's executor container, where customers' workflow code runs (issue 8, item 2), checked on the
rendered manifests: no Secret reference of any kind, no service-account token, a uid other than the consumer's,
a read-only root filesystem, a private /tmp, and only the socket directory shared with the consumer.

``executor_exposures`` is the checker; ``test_the_checker_catches_each_exposure`` proves it fails on a pod that
leaks, so the rendered-manifest tests can fail.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

SOCKET_DIR = "/run/modcache"
SOCKET = f"{SOCKET_DIR}/executor.sock"


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in spec["containers"] if c["name"] == name]
    return found


def effective(spec: dict[str, Any], c: dict[str, Any], field: str) -> Any:
    return (c.get("securityContext") or {}).get(field, (spec.get("securityContext") or {}).get(field))


def holds_a_secret(volume: dict[str, Any]) -> bool:
    if "secret" in volume:
        return True
    sources = (volume.get("projected") or {}).get("sources") or []
    return any("secret" in s or "serviceAccountToken" in s for s in sources)


def executor_exposures(spec: dict[str, Any], account: dict[str, Any] | None) -> list[str]:
    """What in a consumer pod spec hands the executor a secret, a token, the consumer's identity or its files."""
    executor, consumer = container(spec, "executor"), container(spec, "consumer")
    return [
        *_env_exposures(executor),
        *_volume_exposures(spec, executor, consumer),
        *_token_exposures(spec, account),
        *_identity_exposures(spec, executor, consumer),
    ]


def _env_exposures(executor: dict[str, Any]) -> list[str]:
    found = ["envFrom"] if executor.get("envFrom") else []
    for env in executor.get("env") or []:
        if "valueFrom" in env:
            found.append(f"env {env['name']} from {sorted(env['valueFrom'])}")
        if env["name"].startswith("MODCACHE_") and env["name"] != "MODCACHE_EXECUTOR_SOCKET":
            found.append(f"env {env['name']}")
    return found


def _volume_exposures(spec: dict[str, Any], executor: dict[str, Any], consumer: dict[str, Any]) -> list[str]:
    found = []
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in executor.get("volumeMounts") or []}
    for path, name in mounts.items():
        if holds_a_secret(volumes[name]):
            found.append(f"mounts a Secret or token at {path}")
        elif "emptyDir" not in volumes[name]:
            found.append(f"mounts {sorted(set(volumes[name]) - {'name'})} at {path}")
    consumer_volumes = {m["name"] for m in consumer.get("volumeMounts") or []}
    if mounts.get("/tmp") in consumer_volumes:
        found.append("shares /tmp with the consumer")
    if set(mounts.values()) & consumer_volumes != {mounts.get(SOCKET_DIR)}:
        found.append("shares more than the socket directory with the consumer")
    return found


def _token_exposures(spec: dict[str, Any], account: dict[str, Any] | None) -> list[str]:
    found = []
    if spec.get("automountServiceAccountToken") is not False:
        found.append("the pod may mount a service-account token")
    if account is not None and account.get("automountServiceAccountToken") is not False:
        found.append("the service account may mount a token")
    if spec.get("shareProcessNamespace"):
        found.append("shares the process namespace (the consumer's /proc)")
    return found


def _identity_exposures(spec: dict[str, Any], executor: dict[str, Any], consumer: dict[str, Any]) -> list[str]:
    found = []
    if effective(spec, executor, "runAsUser") == effective(spec, consumer, "runAsUser"):
        found.append("runs as the consumer's uid")
    if effective(spec, executor, "runAsGroup") == effective(spec, consumer, "runAsGroup"):
        found.append("runs as the consumer's gid")
    if effective(spec, executor, "runAsUser") in (None, 0) or effective(spec, executor, "runAsNonRoot") is not True:
        found.append("may run as root")
    if (executor.get("securityContext") or {}).get("readOnlyRootFilesystem") is not True:
        found.append("writable root filesystem")
    return found


def consumer_pod(rendered: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    deployment = rendered.one("Deployment", "consumer")
    spec = deployment["spec"]["template"]["spec"]
    accounts = [a for a in rendered.of_kind("ServiceAccount") if a["metadata"]["name"] == spec["serviceAccountName"]]
    return spec, (accounts[0] if accounts else None)


def test_the_executor_gets_no_secret_no_token_and_an_identity_of_its_own(
    rendered: Any, effective_values: dict[str, Any]
) -> None:
    if not effective_values["consumer"]["enabled"]:
        assert not [c for _, c in _containers(rendered) if c["name"] == "executor"]
        return
    spec, account = consumer_pod(rendered)
    assert executor_exposures(spec, account) == []
    executor = container(spec, "executor")
    wanted = effective_values["consumer"]["executor"]
    assert executor["securityContext"]["runAsUser"] == wanted["runAsUser"]
    assert executor["securityContext"]["runAsGroup"] == wanted["runAsGroup"]
    assert executor["resources"] == wanted["resources"]


def test_the_executor_serves_the_contracted_socket_the_consumer_is_told_about(
    rendered: Any, effective_values: dict[str, Any]
) -> None:
    if not effective_values["consumer"]["enabled"]:
        return
    spec, _ = consumer_pod(rendered)
    executor, consumer = container(spec, "executor"), container(spec, "consumer")
    uid = str(effective_values["podSecurity"]["runAsUser"])
    assert executor["args"] == ["executor", "--socket", SOCKET, "--consumer-uid", uid]  # only the consumer's uid
    assert {e["name"]: e.get("value") for e in consumer["env"]}["MODCACHE_EXECUTOR_SOCKET"] == SOCKET
    volumes = {v["name"]: v for v in spec["volumes"]}
    shared = {m["name"] for c in (executor, consumer) for m in c["volumeMounts"] if m["mountPath"] == SOCKET_DIR}
    (name,) = shared  # the same volume in both containers
    assert "emptyDir" in volumes[name]
    tmp = next(m["name"] for m in executor["volumeMounts"] if m["mountPath"] == "/tmp")
    assert volumes[tmp]["emptyDir"]["sizeLimit"] == effective_values["consumer"]["executor"]["tmpSizeLimit"]


def test_the_executor_image_defaults_to_the_chart_image(rendered: Any, effective_values: dict[str, Any]) -> None:
    if not effective_values["consumer"]["enabled"]:
        return
    spec, _ = consumer_pod(rendered)
    own = effective_values["consumer"]["executor"]["image"]
    image = container(spec, "executor")["image"]
    if own["repository"]:
        assert image == f"{own['repository']}@{own['digest']}" if own["digest"] else f"{own['repository']}:0.1.0"
    else:
        assert image == container(spec, "consumer")["image"]


def test_the_consumer_reads_its_secrets_from_files_on_a_read_only_secret_volume(render: Any) -> None:
    spec, _ = consumer_pod(render({}))
    consumer = container(spec, "consumer")
    volumes = {v["name"]: v for v in spec["volumes"]}
    env = {e["name"]: e.get("value") for e in consumer["env"]}
    (mount,) = [m for m in consumer["volumeMounts"] if holds_a_secret(volumes[m["name"]])]
    assert mount["readOnly"] is True
    for name, file in [
        ("MODCACHE_DATABASE_URL", "database-url"),
        ("MODCACHE_REDIS_URL", "redis-url"),
        ("MODCACHE_AMQP_URL", "amqp-url"),
        ("MODCACHE_SECRETS_KEY", "secrets-key"),
    ]:
        assert name not in env
        assert env[f"{name}_FILE"] == f"{mount['mountPath']}/{file}"
    assert volumes[mount["name"]]["projected"]["defaultMode"] == 0o440


Change = Callable[[dict[str, Any], dict[str, Any]], Any]


def _executor(spec: dict[str, Any]) -> dict[str, Any]:
    return container(spec, "executor")


LEAKS: dict[str, tuple[Change, str]] = {
    "secretKeyRef env": (
        lambda s, a: (
            _executor(s)
            .setdefault("env", [])
            .append(
                {"name": "X", "valueFrom": {"secretKeyRef": {"name": "modcache-connections", "key": "database-url"}}}
            )
        ),
        "env X from ['secretKeyRef']",
    ),
    "envFrom a Secret": (lambda s, a: _executor(s).update(envFrom=[{"secretRef": {"name": "x"}}]), "envFrom"),
    "a MODCACHE_ setting": (
        lambda s, a: _executor(s).setdefault("env", []).append({"name": "MODCACHE_AMQP_URL_FILE", "value": "/x"}),
        "env MODCACHE_AMQP_URL_FILE",
    ),
    "the Secret volume": (
        lambda s, a: _executor(s)["volumeMounts"].append({"name": "secrets", "mountPath": "/s", "readOnly": True}),
        "mounts a Secret or token at /s",
    ),
    "a token volume": (
        lambda s, a: [
            s["volumes"].append(
                {"name": "tok", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}
            ),
            _executor(s)["volumeMounts"].append({"name": "tok", "mountPath": "/var/run/secrets/tokens"}),
        ],
        "mounts a Secret or token at /var/run/secrets/tokens",
    ),
    "automounted token": (lambda s, a: s.pop("automountServiceAccountToken"), "may mount a service-account token"),
    "account token": (lambda s, a: a.pop("automountServiceAccountToken"), "service account may mount a token"),
    "the consumer's uid": (
        lambda s, a: _executor(s)["securityContext"].update(runAsUser=10001),
        "runs as the consumer's uid",
    ),
    "root": (lambda s, a: _executor(s)["securityContext"].update(runAsUser=0), "may run as root"),
    "writable root": (
        lambda s, a: _executor(s)["securityContext"].update(readOnlyRootFilesystem=False),
        "writable root filesystem",
    ),
    "shared /tmp": (
        lambda s, a: [m.update(name="tmp") for m in _executor(s)["volumeMounts"] if m["mountPath"] == "/tmp"],
        "shares /tmp with the consumer",
    ),
    "shared pids": (lambda s, a: s.update(shareProcessNamespace=True), "shares the process namespace"),
}


@pytest.mark.parametrize(("change", "exposure"), list(LEAKS.values()), ids=list(LEAKS))
def test_the_checker_catches_each_exposure(render: Any, change: Change, exposure: str) -> None:
    spec, account = copy.deepcopy(consumer_pod(render({})))
    assert account is not None
    assert executor_exposures(spec, account) == []
    change(spec, account)
    assert any(exposure in found for found in executor_exposures(spec, account)), executor_exposures(spec, account)


def _containers(rendered: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(where, c) for where, _, spec in rendered.pods() for c in spec["containers"]]
