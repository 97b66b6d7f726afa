"""The Kubernetes API adapter: Secrets by name, status patches and the Lease, over plain aiohttp.

The few calls the operator makes besides kopf's, with the same ``credentials.Credentials`` kopf logs in with.
Every call has a timeout. Errors are translated here:

* ``spec.SpecProblem`` -- the Secret is missing or unreadable: a person must act;
* ``Rejected`` -- the API server refused a write for good (403, 422...): the same write will not succeed;
* ``errors.TransientError`` -- the API server is unwell or unreachable (5xx, 429, resets, timeouts): retry;
  ``LeaseConflict`` -- another replica wrote the Lease first.

Messages carry the object's name and the server's reason, never a Secret's data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp

from modcache import errors
from modcache_operator import credentials, names, spec

log = logging.getLogger(__name__)

#: A bound on every call the operator makes itself (kopf's own calls are bounded by its settings).
REQUEST_TIMEOUT_S = 10.0
_TRANSIENT_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))


class Rejected(errors.ConfigError):
    """The API server refused a request and will refuse it again (RBAC, validation): ``status`` says why."""

    def __init__(self, doing: str, status: int, detail: str) -> None:
        super().__init__(doing, f"HTTP {status} {detail}")
        self.status = status


class LeaseConflict(errors.TransientError):
    """The Lease changed since it was read: another replica wrote it (HTTP 409), or it was deleted (404)."""


@dataclasses.dataclass(frozen=True)
class SecretData:
    name: str
    resource_version: str
    data: Mapping[str, str]  # base64 values by key, as the API serves them


Lease = dict[str, Any]  # a coordination.k8s.io/v1 Lease as the API serves it


class KubeApi:
    """The operator's own calls, each bounded by ``timeout_s`` (or a shorter one the caller gives)."""

    def __init__(self, *, credentials: credentials.Credentials, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.credentials = credentials
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- Secrets ------------------------------------------------------------------------------------------------

    async def read_secret(self, namespace: str, name: str, *, field: str) -> SecretData:
        """One Secret by name (``get`` only: no list, no watch); ``field`` is the spec field that names it."""
        doing = f"reading Secret {namespace}/{name}"
        try:
            secret = await self._call("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}", doing=doing)
        except _Refused as e:
            if e.status == 404:
                raise spec.SpecProblem(
                    field, names.Reason.SECRET_NOT_FOUND, f"Secret {namespace}/{name} not found"
                ) from None
            if e.status in (401, 403):
                raise spec.SpecProblem(
                    field, names.Reason.SECRET_NOT_FOUND, f"{doing}: {e.reason} (check the operator's RBAC)"
                ) from None
            raise e.translated() from None
        version = str((secret.get("metadata") or {}).get("resourceVersion") or "")
        return SecretData(name=name, resource_version=version, data=dict(secret.get("data") or {}))

    # -- status -------------------------------------------------------------------------------------------------

    async def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """Merge-patch the status subresource; the object as the server now has it, or None if it is gone."""
        path = f"{_modulecache(namespace, name)}/status"
        doing = f"patching status of {namespace}/{name}"
        try:
            return await self._call("PATCH", path, doing=doing, body={"status": dict(patch)}, merge=True)
        except _Refused as e:
            if e.status == 404:
                return None
            raise e.translated() from None

    # -- the object itself (the chart's uninstall hook) -------------------------------------------------------------

    async def read_modulecache(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("GET", _modulecache(namespace, name), doing=f"reading {namespace}/{name}")
        except _Refused as e:
            if e.status == 404:
                return None
            raise e.translated() from None

    async def delete_modulecache(self, namespace: str, name: str) -> bool:
        """Delete it (the finalizers decide when it is gone); False if there was nothing to delete."""
        try:
            await self._call("DELETE", _modulecache(namespace, name), doing=f"deleting {namespace}/{name}")
        except _Refused as e:
            if e.status == 404:
                return False
            raise e.translated() from None
        return True

    async def patch_modulecache(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        """A merge patch of the object (its metadata, e.g. finalizers guarded by a resourceVersion)."""
        doing = f"patching {namespace}/{name}"
        try:
            await self._call("PATCH", _modulecache(namespace, name), doing=doing, body=patch, merge=True)
        except _Refused as e:
            raise e.translated() from None

    # -- the Lease ----------------------------------------------------------------------------------------------

    async def read_lease(self, namespace: str, name: str, *, timeout_s: float) -> Lease | None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        try:
            return await self._call("GET", path, doing=f"reading Lease {namespace}/{name}", timeout_s=timeout_s)
        except _Refused as e:
            if e.status == 404:
                return None
            raise e.translated() from None

    async def write_lease(self, lease: Lease, *, create: bool, timeout_s: float) -> Lease:
        """Create the Lease, or replace it guarded by its ``resourceVersion`` (optimistic concurrency)."""
        namespace, name = lease["metadata"]["namespace"], lease["metadata"]["name"]
        collection = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        doing = f"{'creating' if create else 'updating'} Lease {namespace}/{name}"
        method, path = ("POST", collection) if create else ("PUT", f"{collection}/{name}")
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", **lease}
        try:
            return await self._call(method, path, doing=doing, body=body, timeout_s=timeout_s)
        except _Refused as e:
            if e.status == 409:
                raise LeaseConflict(f"{doing}: another replica wrote it first") from None
            if e.status == 404 and not create:
                raise LeaseConflict(f"{doing}: it was deleted") from None
            raise e.translated() from None

    # -- plumbing -------------------------------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        doing: str,
        body: Mapping[str, Any] | None = None,
        merge: bool = False,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """One request: its JSON answer, ``_Refused`` for an HTTP error, TransientError when the server is away."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/merge-patch+json" if merge else "application/json"
        if token := self.credentials.current_token():
            headers["Authorization"] = f"Bearer {token}"
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        try:
            session = self._session_()
            data = json.dumps(body) if body is not None else None
            async with session.request(
                method, self.credentials.server + path, data=data, headers=headers, timeout=timeout
            ) as r:
                text = await r.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise errors.TransientError(f"{doing}: {errors.describe(e)}") from None
        if r.status >= 400:
            raise _Refused(doing, r.status, str(r.reason or ""), _server_message(text))
        try:
            answer: dict[str, Any] = json.loads(text) if text else {}
        except ValueError:
            raise errors.TransientError(f"{doing}: the answer is not JSON") from None
        return answer

    def _session_(self) -> aiohttp.ClientSession:
        if self._session is None:
            auth = None
            if self.credentials.username and self.credentials.password:
                auth = aiohttp.BasicAuth(self.credentials.username, self.credentials.password)
            connector = aiohttp.TCPConnector(ssl=self.credentials.ssl_context())
            self._session = aiohttp.ClientSession(connector=connector, auth=auth)
        return self._session


@dataclasses.dataclass
class _Refused(Exception):
    """An HTTP error answer, before the caller decides what it means for it."""

    doing: str
    status: int
    reason: str
    message: str

    def translated(self) -> errors.ModcacheError:
        """A transient error for what may pass (5xx, 429, 408), else ``Rejected`` with the server's message."""
        if self.status in _TRANSIENT_STATUSES:
            return errors.TransientError(f"{self.doing}: HTTP {self.status} {self.reason}")
        detail = f"{self.reason}: {self.message}" if self.message else self.reason
        return Rejected(self.doing, self.status, errors.truncate(detail))


def _modulecache(namespace: str, name: str) -> str:
    return f"/apis/{names.GROUP}/{names.VERSION}/namespaces/{namespace}/{names.PLURAL}/{name}"


def _server_message(text: str) -> str:
    """The API server's own explanation (its Status ``message``)."""
    try:
        return str(json.loads(text).get("message") or "")
    except (ValueError, AttributeError):
        return ""
