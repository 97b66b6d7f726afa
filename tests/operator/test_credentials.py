"""Credentials without a client library: a pod's service account, a kubeconfig's current context, TLS, kopf's login."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

import pytest
import yaml

from modcache import errors
from modcache_operator import credentials


def _kubeconfig(path: Path, user: dict[str, object], cluster: dict[str, object] | None = None) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "dev",
                "contexts": [
                    {"name": "other", "context": {"cluster": "nowhere", "user": "nobody"}},
                    {"name": "dev", "context": {"cluster": "dev", "user": "me", "namespace": "apps"}},
                ],
                "clusters": [{"name": "dev", "cluster": cluster or {"server": "https://api.example:6443/"}}],
                "users": [{"name": "me", "user": user}],
            }
        )
    )
    return path


def test_a_kubeconfig_token_and_current_context(tmp_path: Path) -> None:
    loaded = credentials.load(kubeconfig=str(_kubeconfig(tmp_path / "config", {"token": "s3cr3t"})))
    assert loaded.server == "https://api.example:6443"
    assert loaded.current_token() == "s3cr3t"
    assert loaded.namespace == "apps"
    assert "s3cr3t" not in repr(loaded)
    info = credentials.connection_info(loaded)
    assert (info.server, info.scheme, info.token, info.default_namespace) == (loaded.server, "Bearer", "s3cr3t", "apps")


def test_relative_paths_in_a_kubeconfig_are_relative_to_it(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-a-file\n")
    config = _kubeconfig(
        tmp_path / "config", {"tokenFile": "token"}, {"server": "https://x", "certificate-authority": "ca.pem"}
    )
    loaded = credentials.load(kubeconfig=str(config))
    assert loaded.current_token() == "from-a-file"
    assert loaded.ca_path == str(tmp_path / "ca.pem")


def test_inline_certificate_data_is_decoded(tmp_path: Path) -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    config = _kubeconfig(
        tmp_path / "config",
        {"token": "t"},
        {"server": "https://x", "certificate-authority-data": base64.b64encode(pem).decode()},
    )
    assert credentials.load(kubeconfig=str(config)).ca_data == pem


def test_an_insecure_cluster_skips_verification(tmp_path: Path) -> None:
    config = _kubeconfig(tmp_path / "config", {"token": "t"}, {"server": "https://x", "insecure-skip-tls-verify": True})
    context = credentials.load(kubeconfig=str(config)).ssl_context()
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize("plugin", ["exec", "auth-provider"])
def test_credential_plugins_are_refused_with_a_reason(tmp_path: Path, plugin: str) -> None:
    config = _kubeconfig(tmp_path / "config", {plugin: {"command": "aws"}})
    with pytest.raises(errors.ConfigError, match="credential plugins"):
        credentials.load(kubeconfig=str(config))


def test_no_kubeconfig_and_no_service_account_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="no usable kubeconfig"):
        credentials.load(kubeconfig=str(tmp_path / "missing"), service_account=tmp_path)


def test_in_a_pod_the_service_account_is_used_and_its_token_re_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("first")
    (tmp_path / "namespace").write_text("apps\n")
    (tmp_path / "ca.crt").write_text("")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    loaded = credentials.load(service_account=tmp_path)
    assert (loaded.server, loaded.namespace, loaded.ca_path) == (
        "https://10.0.0.1:443",
        "apps",
        str(tmp_path / "ca.crt"),
    )
    assert loaded.current_token() == "first"
    (tmp_path / "token").write_text("rotated")  # the kubelet refreshes projected tokens
    assert loaded.current_token() == "rotated"
    assert credentials.connection_info(loaded).token == "rotated"
