"""The Kubernetes API adapter: credentials (shared with kopf), Secrets by name, status patches, the Lease.

One ``kubernetes_asyncio`` configuration serves both kopf (through an ``@kopf.on.login`` handler returning
``connection_info``) and the operator's own calls, so the two can never talk to different clusters. Every call
has a timeout (kubernetes-asyncio's default has none). Errors are translated here:

* ``spec.SpecProblem`` -- the Secret is missing or unreadable: a person must act;
* ``Rejected`` -- the API server refused a write for good (403, 422...): the same write will not succeed;
* ``errors.TransientError`` -- the API server is unwell or unreachable (5xx, 429, resets, timeouts): retry;
  ``LeaseConflict`` -- another replica wrote the Lease first.

Messages carry the object's name and the server's reason, never a Secret's data.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import kopf
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


#: A bound on every call the operator makes itself (kopf's own calls are bounded by its settings).
REQUEST_TIMEOUT_S = 10.0
_TRANSIENT_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
_NETWORK_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)


class Rejected(errors.ConfigError):
    """The API server refused a request and will refuse it again (RBAC, validation): ``status`` says why."""

    def __init__(self, doing: str, status: int, detail: str) -> None:
        super().__init__(doing, f"HTTP {status} {detail}")
        self.status = status


class LeaseConflict(errors.TransientError):
    """Another replica changed the Lease since it was read (HTTP 409)."""


@dataclasses.dataclass(frozen=True)
class SecretData:
    name: str
    resource_version: str
    data: Mapping[str, str]  # base64 values by key, as the API serves them


class KubeApi:
    """The few calls the operator makes besides what kopf does for it, each bounded by ``timeout_s``."""

    def __init__(self, *, api_client: client.ApiClient, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.api_client = api_client
        self.timeout_s = timeout_s
        self._core = client.CoreV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)
        self._coordination = client.CoordinationV1Api(api_client)

    @classmethod
    def from_configuration(cls, configuration: client.Configuration) -> KubeApi:
        return cls(api_client=client.ApiClient(configuration))

    async def close(self) -> None:
        await self.api_client.close()

    # -- Secrets ------------------------------------------------------------------------------------------------

    async def read_secret(self, namespace: str, name: str, *, field: str) -> SecretData:
        """One Secret by name (``get`` only: no list, no watch); ``field`` is the spec field that names it."""
        doing = f"reading Secret {namespace}/{name}"
        try:
            secret = await self._core.read_namespaced_secret(name, namespace, _request_timeout=self.timeout_s)
        except client.ApiException as e:
            if e.status == 404:
                raise spec.SpecProblem(
                    field, names.Reason.SECRET_NOT_FOUND, f"Secret {namespace}/{name} not found"
                ) from None
            if e.status in (401, 403):
                raise spec.SpecProblem(
                    field, names.Reason.SECRET_NOT_FOUND, f"{doing}: {e.reason} (check the operator's RBAC)"
                ) from None
            raise errors.TransientError(f"{doing}: HTTP {e.status} {e.reason}") from None
        except _NETWORK_ERRORS as e:
            raise errors.TransientError(f"{doing}: {errors.describe(e)}") from None
        version = str((secret.metadata and secret.metadata.resource_version) or "")
        return SecretData(name=name, resource_version=version, data=dict(secret.data or {}))

    # -- status -------------------------------------------------------------------------------------------------

    async def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """Merge-patch the status subresource; the object as the server now has it, or None if it is gone."""
        doing = f"patching status of {namespace}/{name}"
        # The stub lacks ``_content_type``; without it a dict body is sent as a JSON patch.
        patch_call: Callable[..., Awaitable[Any]] = self._custom.patch_namespaced_custom_object_status
        try:
            result: Mapping[str, Any] = await patch_call(
                names.GROUP,
                names.VERSION,
                namespace,
                names.PLURAL,
                name,
                {"status": dict(patch)},
                _content_type="application/merge-patch+json",
                _request_timeout=self.timeout_s,
            )
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise _translated(doing, e) from None
        except _NETWORK_ERRORS as e:
            raise errors.TransientError(f"{doing}: {errors.describe(e)}") from e
        return result

    # -- the Lease ----------------------------------------------------------------------------------------------

    async def read_lease(self, namespace: str, name: str, *, timeout_s: float) -> client.V1Lease | None:
        doing = f"reading Lease {namespace}/{name}"
        try:
            lease: client.V1Lease = await self._coordination.read_namespaced_lease(
                name, namespace, _request_timeout=timeout_s
            )
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise _translated(doing, e) from None
        except _NETWORK_ERRORS as e:
            raise errors.TransientError(f"{doing}: {errors.describe(e)}") from None
        return lease

    async def write_lease(self, lease: client.V1Lease, *, create: bool, timeout_s: float) -> client.V1Lease:
        """Create the Lease, or replace it guarded by its ``resourceVersion`` (optimistic concurrency)."""
        namespace, name = lease.metadata.namespace, lease.metadata.name
        doing = f"{'creating' if create else 'updating'} Lease {namespace}/{name}"
        try:
            if create:
                written: client.V1Lease = await self._coordination.create_namespaced_lease(
                    namespace, lease, _request_timeout=timeout_s
                )
            else:
                written = await self._coordination.replace_namespaced_lease(
                    name, namespace, lease, _request_timeout=timeout_s
                )
        except client.ApiException as e:
            if e.status == 409:
                raise LeaseConflict(f"{doing}: another replica wrote it first") from None
            raise _translated(doing, e) from None
        except _NETWORK_ERRORS as e:
            raise errors.TransientError(f"{doing}: {errors.describe(e)}") from None
        return written


def _translated(doing: str, e: client.ApiException) -> errors.ModcacheError:
    """A transient error for what may pass (5xx, 429, 408), else ``Rejected`` with the server's message."""
    if e.status in _TRANSIENT_STATUSES or not e.status:
        return errors.TransientError(f"{doing}: HTTP {e.status} {e.reason}")
    return Rejected(doing, int(e.status), _server_message(e))


def _server_message(e: client.ApiException) -> str:
    """The API server's own explanation (its Status ``message``), capped."""
    try:
        message = str(json.loads(e.body or b"{}").get("message") or "")
    except (TypeError, ValueError, AttributeError):
        message = ""
    return errors.truncate(f"{e.reason}: {message}" if message else str(e.reason))
