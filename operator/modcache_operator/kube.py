"""The Kubernetes API adapter: credentials (shared with kopf), Secret values, status patches.

One ``kubernetes_asyncio`` configuration serves both kopf (through an ``@kopf.on.login`` handler returning
``connection_info``) and the operator's own calls, so the two can never talk to different clusters.
ApiExceptions and network errors become ``spec.SpecProblem`` (the Secret is missing or unreadable: a person must
act) or ``errors.TransientError`` (the API server is unwell: retry), with the Secret's name, never its data.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import kopf
import pydantic
from kubernetes_asyncio import client, config

from modcache import errors
from modcache_operator import names, spec

log = logging.getLogger(__name__)


async def load_configuration(*, kubeconfig: str | None = None) -> client.Configuration:
    """In-cluster credentials when running in a pod, else the kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``)."""
    configuration = client.Configuration()
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            return configuration
        except config.ConfigException:
            pass
    try:
        await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    except (config.ConfigException, OSError) as e:
        raise errors.ConfigError("kubeconfig", f"no in-cluster service account and no usable kubeconfig: {e}") from e
    return configuration


async def connection_info(configuration: client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the same configuration (the token is re-read on every login, so it can rotate)."""
    header: Any = configuration.get_api_key_with_prefix("BearerToken")
    if inspect.isawaitable(header):  # kubernetes-asyncio >= 33.3
        header = await header
    scheme, _, token = str(header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host or "",
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


class KubeApi:
    """The few calls the runner makes besides what kopf does for it."""

    def __init__(self, *, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self._core = client.CoreV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)

    @classmethod
    def from_configuration(cls, configuration: client.Configuration) -> KubeApi:
        return cls(api_client=client.ApiClient(configuration))

    async def close(self) -> None:
        await self.api_client.close()

    async def read_secret_value(self, namespace: str, ref: spec.SecretKeyRef) -> pydantic.SecretStr:
        """The value under ``ref.key`` in the Secret, as text with surrounding whitespace removed."""
        secret = await self._call(
            self._core.read_namespaced_secret(ref.name, namespace), f"reading Secret {namespace}/{ref.name}", ref
        )
        data: Mapping[str, str] = secret.data or {}
        if ref.key not in data:
            raise spec.SpecProblem(
                ref.field, names.Reason.SECRET_KEY_NOT_FOUND, f"Secret {namespace}/{ref.name} has no key {ref.key!r}"
            )
        try:
            return pydantic.SecretStr(base64.b64decode(data[ref.key], validate=True).decode().strip())
        except (binascii.Error, UnicodeDecodeError):
            raise spec.SpecProblem(
                ref.field, names.Reason.INVALID_URL, f"{ref.describe(namespace)} is not UTF-8 text"
            ) from None

    async def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> bool:
        """Merge-patch the status subresource; False if the object is gone."""
        # The stub lacks ``_content_type``; without it a dict body is sent as a JSON patch.
        patch_call: Callable[..., Awaitable[Any]] = self._custom.patch_namespaced_custom_object_status
        try:
            await patch_call(
                names.GROUP,
                names.VERSION,
                namespace,
                names.PLURAL,
                name,
                {"status": dict(patch)},
                _content_type="application/merge-patch+json",
            )
        except client.ApiException as e:
            if e.status == 404:
                return False
            raise errors.TransientError(f"patching status of {namespace}/{name}: HTTP {e.status} {e.reason}") from e
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise errors.TransientError(f"patching status of {namespace}/{name}: {errors.describe(e)}") from e
        return True

    async def _call(self, request: Any, doing: str, ref: spec.SecretKeyRef) -> Any:
        try:
            return await request
        except client.ApiException as e:
            if e.status == 404:
                raise spec.SpecProblem(
                    ref.field, names.Reason.SECRET_NOT_FOUND, f"{doing.removeprefix('reading ')} not found"
                ) from None
            if e.status in (401, 403):
                raise spec.SpecProblem(
                    ref.field, names.Reason.SECRET_NOT_FOUND, f"{doing}: {e.reason} (check the operator's RBAC)"
                ) from None
            raise errors.TransientError(f"{doing}: HTTP {e.status} {e.reason}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise errors.TransientError(f"{doing}: {errors.describe(e)}") from None
