"""kmock's Kubernetes API emulator, with the server behaviour kopf and leader election rely on, and faults."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import itertools
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
from kmock._internal import dicts as kmock_dicts


class Emulator(kmock.KubernetesEmulator):
    """kmock 0.8's emulator plus what a real API server does and kopf relies on.

    * objects get ``uid``, ``creationTimestamp``, ``resourceVersion`` and ``generation`` (and a name from
      ``generateName``) when created; every patch bumps ``resourceVersion``; a spec change bumps ``generation``;
    * a JSON patch whose ``test`` fails is HTTP 422 (kopf's optimistic finalizer patches), not 500;
    * the status subresource only changes status, the main resource never does;
    * PUT replaces an object if its ``resourceVersion`` matches, else 409 (leader election's Lease updates).

    Mutations are serialised, so a check and the write it guards see the same object.

    For tests: ``until(predicate)`` waits for a request that makes ``predicate`` true (no polling); ``faults``
    make chosen requests hang, reset their connection or fail with a status (see ``Fault``), by the client's
    bearer token, so one operator process can be cut off while another is not.
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._mutating = asyncio.Lock()
        self._versions = itertools.count(1000)
        self._changed = asyncio.Event()
        self._healed = asyncio.Event()
        self.faults: list[Fault] = []

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        try:
            return await self._serve(request)
        finally:
            if request.action != kmock.action.WATCH:  # a stream "ends" when its client goes: nothing changed
                self._changed.set()  # wake every ``until``: what it waits for may hold now
                self._changed = asyncio.Event()

    async def _serve(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        fault = next((f for f in self.faults if f.matches(request)), None)
        if fault is not None:
            return await self._inflict(fault, request)
        mutating = request.action in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE)
        if request.resource is None or not (mutating or request.method == kmock.method.PUT):
            return await super()._handle(request)
        async with self._mutating:
            if request.method == kmock.method.PUT:
                return await self._replace(request)
            if request.action == kmock.action.CREATE:
                self._fill_new(request)
            elif request.action == kmock.action.UPDATE:
                self._prepare_patch(request)
            return await super()._handle(request)

    # -- for tests --------------------------------------------------------------------------------------------

    async def until(self, predicate: Callable[[], object], *, timeout_s: float) -> bool:
        """Wait until ``predicate()`` holds, checked after every request served; False if ``timeout_s`` passed first."""
        async with asyncio.timeout(timeout_s) as within:
            while not predicate():
                await self._changed.wait()
        return not within.expired()

    def requests_log(self) -> list[kmock.Request]:
        """Every request served so far, oldest first."""
        return list(self._requests)

    def heal(self) -> None:
        """Remove every fault; hung requests then fail with 504 (their clients gave up long ago)."""
        self.faults.clear()
        self._healed.set()
        self._healed = asyncio.Event()

    async def _inflict(self, fault: Fault, request: kmock.Request) -> aiohttp.web.StreamResponse:
        fault.hits += 1
        if fault.action == "hang":
            await self._healed.wait()
            return aiohttp.web.Response(status=504)
        if fault.action == "reset":
            raw = request._raw_request  # the only way to the connection
            if raw is not None and raw.transport is not None:
                raw.transport.abort()
            return aiohttp.web.Response(status=500)
        body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": fault.action, "reason": "Fault"}
        body["message"] = f"injected HTTP {fault.action}"
        return aiohttp.web.json_response(body, status=int(fault.action))

    def stored(self, request: kmock.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        body: dict[str, Any] = self.objects[key].raw
        return body

    def _fill_new(self, request: kmock.Request) -> None:
        meta = request.data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        meta.update(
            uid=str(uuid.uuid4()),
            creationTimestamp=_now(),
            resourceVersion=str(next(self._versions)),
            generation=1,
        )

    def _prepare_patch(self, request: kmock.Request) -> None:
        old = self.stored(request)
        if old is None:
            return  # the emulator answers 404
        version = str(next(self._versions))
        if isinstance(request.data, list):
            self._prepare_json_patch(request, old, version)
        elif isinstance(request.data, dict):
            self._prepare_merge_patch(request, old, version)

    def _prepare_merge_patch(self, request: kmock.Request, old: dict[str, Any], version: str) -> None:
        data = request.data
        for key in list(data):
            if (key == "status") != (request.subresource == "status") and key != "metadata":
                del data[key]
        if request.subresource == "status":
            data.pop("metadata", None)
        new = kmock_dicts.patch_dict(old, data)
        meta = data.setdefault("metadata", {})
        meta["resourceVersion"] = version
        if new.get("spec") != old.get("spec"):
            meta["generation"] = old["metadata"].get("generation", 1) + 1

    def _prepare_json_patch(self, request: kmock.Request, old: dict[str, Any], version: str) -> None:
        ops = request.data
        status_only = request.subresource == "status"
        ops[:] = [op for op in ops if op["op"] == "test" or op["path"].startswith("/status") == status_only]
        try:
            new = jsonpatch.apply_patch(old, ops, in_place=False)
        except (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPatchConflict) as e:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e)) from None
        ops.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
        if new.get("spec") != old.get("spec"):
            generation = old["metadata"].get("generation", 1) + 1
            ops.append({"op": "add", "path": "/metadata/generation", "value": generation})

    async def _replace(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        old = self.stored(request)
        if old is None:
            raise kmock.KubernetesObjectNotFoundError()
        new = copy.deepcopy(request.data)
        meta = new.setdefault("metadata", {})
        if meta.get("resourceVersion") not in (None, old["metadata"].get("resourceVersion")):
            raise kmock.KubernetesError(status=409, reason="Conflict", message="the object has been modified")
        kept = {k: old["metadata"][k] for k in ("uid", "creationTimestamp", "generation") if k in old["metadata"]}
        meta.update(kept, resourceVersion=str(next(self._versions)))
        self.objects[request.resource, request.namespace, request.name].history.append(new)
        await self._buses[request.resource].put({"type": "MODIFIED", "object": new})
        return aiohttp.web.json_response(new)


@dataclasses.dataclass
class Fault:
    """Requests that match every given criterion are answered badly: the client's token, the method, the
    resource's plural, object name and subresource, a text the body contains.

    ``action``: "hang" (never answered until ``Emulator.heal``), "reset" (the connection is aborted), or an
    HTTP status code.
    """

    action: str | int
    token: str | None = None
    method: str | None = None
    plural: str | None = None
    name: str | None = None
    subresource: str | None = None
    body_contains: str | None = None
    hits: int = 0

    def matches(self, request: kmock.Request) -> bool:
        checks = [
            self.token is None or request.headers.get("Authorization") == f"Bearer {self.token}",
            self.method is None or request.method.value == self.method.upper(),
            self.plural is None or (request.resource is not None and request.resource.plural == self.plural),
            self.name is None or request.name == self.name,
            self.subresource is None or request.subresource == self.subresource,
            self.body_contains is None or self.body_contains in request.text,
        ]
        return all(checks)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
