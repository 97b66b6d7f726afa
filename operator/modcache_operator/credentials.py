"""Where the Kubernetes API server is and how the operator proves who it is: in-cluster, or a kubeconfig.

One ``Credentials`` value serves both kopf (``connection_info``, returned by an ``@kopf.on.login`` handler) and
the operator's own calls (``kube.KubeApi``), so the two can never talk to different clusters.

* In a pod: the service account's token, CA and namespace under ``/var/run/secrets/kubernetes.io/serviceaccount``,
  the server from ``KUBERNETES_SERVICE_HOST``/``_PORT``. The token file is re-read whenever it changes (projected
  tokens are rotated by the kubelet).
* Otherwise a kubeconfig (``--kubeconfig``, ``$KUBECONFIG`` or ``~/.kube/config``), its current context: a token or
  user name and password, client certificates and a CA as files or inline data, ``insecure-skip-tls-verify``.
  Credential plugins (``exec``, ``auth-provider``) are not run: use a token, or ``kubectl proxy``.

No client library is involved (kubernetes-asyncio alone, which kopf imports whole when present, costs 50 MB).
Secret material stays out of ``repr``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
import ssl
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kopf
import yaml

from modcache import errors

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclasses.dataclass(frozen=True)
class Credentials:
    server: str
    token: str | None = dataclasses.field(default=None, repr=False)
    token_path: Path | None = None  # re-read on use: it rotates
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    ca_path: str | None = None
    ca_data: bytes | None = dataclasses.field(default=None, repr=False)
    certificate_path: str | None = None
    certificate_data: bytes | None = dataclasses.field(default=None, repr=False)
    key_path: str | None = None
    key_data: bytes | None = dataclasses.field(default=None, repr=False)
    insecure: bool = False
    namespace: str | None = None

    def current_token(self) -> str | None:
        if self.token_path is not None:
            with contextlib.suppress(OSError):
                return self.token_path.read_text().strip() or None
        return self.token

    def ssl_context(self) -> ssl.SSLContext | bool:
        """The TLS settings for an ``https://`` server (``True``: the system's defaults)."""
        if not self.server.startswith("https://"):
            return True
        context = ssl.create_default_context(
            cafile=self.ca_path, cadata=self.ca_data.decode() if self.ca_data else None
        )
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        with (
            _as_file(self.certificate_path, self.certificate_data) as cert,
            _as_file(self.key_path, self.key_data) as key,
        ):
            if cert is not None:
                context.load_cert_chain(cert, key)
        return context


def load(*, kubeconfig: str | None = None, service_account: Path = SERVICE_ACCOUNT) -> Credentials:
    """In-cluster credentials when running in a pod (and no kubeconfig is given), else the kubeconfig."""
    if kubeconfig is None and (service_account / "token").exists():
        return _in_cluster(service_account)
    path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or "~/.kube/config"
    try:
        document = yaml.safe_load(Path(path).expanduser().read_text()) or {}
        return _from_kubeconfig(document, base=Path(path).expanduser().parent)
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        problem = f"no in-cluster service account and no usable kubeconfig at {path}: {errors.describe(e)}"
        raise errors.ConfigError("kubeconfig", problem) from None


def connection_info(credentials: Credentials) -> kopf.ConnectionInfo:
    """kopf's credentials (the token is read anew on every login, so a rotated one is used)."""
    return kopf.ConnectionInfo(
        server=credentials.server,
        ca_path=credentials.ca_path,
        ca_data=credentials.ca_data,
        insecure=credentials.insecure or None,
        username=credentials.username,
        password=credentials.password,
        scheme="Bearer" if credentials.current_token() else None,
        token=credentials.current_token(),
        certificate_path=credentials.certificate_path,
        certificate_data=credentials.certificate_data,
        private_key_path=credentials.key_path,
        private_key_data=credentials.key_data,
        default_namespace=credentials.namespace,
    )


def _in_cluster(directory: Path) -> Credentials:
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    host = f"[{host}]" if ":" in host else host  # an IPv6 address
    ca = directory / "ca.crt"
    namespace = directory / "namespace"
    return Credentials(
        server=f"https://{host}:{port}",
        token_path=directory / "token",
        ca_path=str(ca) if ca.exists() else None,
        namespace=namespace.read_text().strip() if namespace.exists() else None,
    )


def _from_kubeconfig(document: Mapping[str, Any], *, base: Path) -> Credentials:
    context = _named(document, "contexts", str(document["current-context"]))
    cluster = _named(document, "clusters", str(context["cluster"]))
    user = _named(document, "users", str(context["user"]))
    if user.get("exec") or user.get("auth-provider"):
        raise ValueError("credential plugins (exec, auth-provider) are not supported: use a token")
    token_file = user.get("tokenFile")
    return Credentials(
        server=str(cluster["server"]).rstrip("/"),
        token=user.get("token"),
        token_path=_relative(base, token_file) if token_file else None,
        username=user.get("username"),
        password=user.get("password"),
        ca_path=_path(base, cluster.get("certificate-authority")),
        ca_data=_data(cluster.get("certificate-authority-data")),
        certificate_path=_path(base, user.get("client-certificate")),
        certificate_data=_data(user.get("client-certificate-data")),
        key_path=_path(base, user.get("client-key")),
        key_data=_data(user.get("client-key-data")),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        namespace=context.get("namespace"),
    )


def _named(document: Mapping[str, Any], section: str, name: str) -> Mapping[str, Any]:
    for item in document.get(section) or []:
        if item.get("name") == name:
            found: Mapping[str, Any] = item.get(section[:-1]) or {}
            return found
    raise KeyError(f"{section} has no entry {name!r}")


def _relative(base: Path, path: str) -> Path:
    return (base / Path(path).expanduser()).resolve()


def _path(base: Path, path: str | None) -> str | None:
    return str(_relative(base, path)) if path else None


def _data(text: str | None) -> bytes | None:
    return base64.b64decode(text) if text else None


@contextlib.contextmanager
def _as_file(path: str | None, data: bytes | None) -> Iterator[str | None]:
    """A path for ``ssl``, which loads certificates only from files: inline data goes to a private temp file."""
    if data is None:
        yield path
        return
    with tempfile.NamedTemporaryFile(prefix="modcache-", suffix=".pem") as file:  # mode 0600
        file.write(data)
        file.flush()
        yield file.name
