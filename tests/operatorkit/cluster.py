"""The operator (kopf in-process, our registry, metrics and probe servers) running against the emulator, and
``Cluster``: what a test does to it (Secrets, ModuleCaches) and how it waits on what the operator writes back
(``wait_for`` re-checks its predicate after every write the emulator serves: no polling)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import threading
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

import kmock
import pytest

from modcache_operator import app, credentials, handlers, health, kube, metrics, names, tunables
from operatorkit.emulator import Emulator

NAMESPACE = "modcache-test"
MODULECACHES = f"{names.GROUP}/{names.VERSION}/{names.PLURAL}"
WAIT_S = 20.0

#: Fast timings, so recoveries and retries happen within a test's patience.
FAST = tunables.Tunables(
    timestamp_interval_s=300.0,
    drift_event_interval_s=0.0,
    status_debounce_s=0.05,
    retry_initial_s=0.2,
    retry_max_s=1.0,
    heartbeat_s=0.5,
    secret_recheck_s=1.0,
    stop_timeout_s=5.0,
    status_retry_initial_s=0.2,
    status_retry_max_s=1.0,
    rejected_initial_s=0.5,
    rejected_max_s=2.0,
)


@dataclasses.dataclass
class Cluster:
    """The emulated API server with the operator running against it, and what a test does to it."""

    emulator: Emulator
    operator: handlers.Operator
    ports: app.Ports

    # -- doing -------------------------------------------------------------------------------------------------

    async def apply_secret(self, name: str, data: dict[str, str]) -> None:
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        if self._stored(SECRETS, name) is None:
            body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": encoded}
            await self._call("post", f"/api/v1/namespaces/{NAMESPACE}/secrets", body)
        else:
            await self._call("patch", f"/api/v1/namespaces/{NAMESPACE}/secrets/{name}", {"data": encoded})

    async def create_cache(self, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": f"{names.GROUP}/{names.VERSION}", "kind": names.KIND, "metadata": {"name": name}}
        await self._call("post", f"/apis/{names.GROUP}/{names.VERSION}/namespaces/{NAMESPACE}/{names.PLURAL}", {
            **body, "spec": spec,
        })  # fmt: skip

    async def patch_cache(self, name: str, patch: dict[str, Any]) -> None:
        await self._call("patch", self._cache_path(name), patch)

    async def delete_cache(self, name: str) -> None:
        await self._call("delete", self._cache_path(name), None)

    # -- looking -----------------------------------------------------------------------------------------------

    def body(self, name: str) -> dict[str, Any] | None:
        return self._stored(MODULECACHES, name)

    def status(self, name: str) -> dict[str, Any]:
        return dict((self.body(name) or {}).get("status") or {})

    def condition(self, name: str, kind: names.ConditionType) -> tuple[str, str, str]:
        """(status, reason, message) of a condition, or empty strings if absent."""
        for c in self.status(name).get("conditions", []):
            if c["type"] == kind.value:
                return c["status"], c["reason"], c["message"]
        return "", "", ""

    def ready(self, name: str) -> bool:
        return self.condition(name, names.ConditionType.READY)[0] == "True"

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every stored version of the object (the emulator keeps them), oldest first."""
        versions = self.emulator.objects[kmock.resource(MODULECACHES), NAMESPACE, name].history
        return [dict(v.raw) for v in versions if v is not None]

    def events(self, name: str) -> list[tuple[str, str, str]]:
        """(type, reason, message) of the events posted about a ModuleCache, oldest first."""
        found = []
        for (resource, namespace, _), obj in self.emulator.objects.items():
            if resource == kmock.resource("v1/events") and namespace == NAMESPACE and not obj.deleted:
                event = obj.raw
                if event.get("involvedObject", {}).get("name") == name:
                    found.append((event.get("type", ""), event.get("reason", ""), event.get("message", "")))
        return found

    async def told(self, name: str, kind: str, reason: str) -> None:
        """Until an event of this type and reason about ``name`` has been posted (kopf posts from a queue)."""
        await self.wait_for(lambda: (kind, reason) in [e[:2] for e in self.events(name)], f"a {kind} {reason} event")

    async def wait_for(self, predicate: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
        """Until ``predicate`` (over the emulator's objects) holds, re-checked after each write; or fail naming it."""
        if not await self.emulator.until(predicate, timeout_s=timeout_s):
            pytest.fail(f"timed out after {timeout_s}s waiting for: {what}")

    # -- plumbing ----------------------------------------------------------------------------------------------

    def _stored(self, resource: str, name: str) -> dict[str, Any] | None:
        key = (kmock.resource(resource), NAMESPACE, name)
        if key not in self.emulator.objects or self.emulator.objects[key].deleted:
            return None
        body: dict[str, Any] = self.emulator.objects[key].raw
        return body

    @staticmethod
    def _cache_path(name: str) -> str:
        return f"/apis/{names.GROUP}/{names.VERSION}/namespaces/{NAMESPACE}/{names.PLURAL}/{name}"

    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> None:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "patch" else {}
        response = await getattr(self.emulator, method)(path, json=body, headers=headers)
        assert response.status < 300, f"{method} {path}: HTTP {response.status} {await response.text()}"


SECRETS = "v1/secrets"


def cache_spec(prefix: str, *, secret: str = "urls", **extra: Any) -> dict[str, Any]:
    """A ModuleCache's spec over the Secret ``secret`` (keys ``database`` and ``redis``), plus ``extra`` fields."""
    return {
        "source": {"databaseUrlSecretRef": {"name": secret, "key": "database"}},
        "cache": {"redisUrlSecretRef": {"name": secret, "key": "redis"}},
        "keyPrefix": prefix,
        **extra,
    }


def register_resources(emulator: Emulator) -> None:
    with warnings.catch_warnings():  # kmock 0.8 reads its bundled file with a deprecated importlib call
        warnings.simplefilter("ignore", DeprecationWarning)
        emulator.resources.load_bundled()
    emulator.resources[MODULECACHES] = kmock.ResourceInfo(
        kind=names.KIND,
        singular="modulecache",
        namespaced=True,
        verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
        subresources={"status"},
        shortnames={"mcache"},
        categories={"modcache"},
    )


class ApiServer:
    """The emulator behind an HTTP server that can stop and start again on the same port, its objects kept."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self.port: int | None = None
        self._server: kmock.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        server = kmock.Server(self.emulator, port=self.port)
        await server.__aenter__()
        self._server, self.port = server, server.port

    async def stop(self) -> None:
        """Close the port and every connection on it (watch streams included), as a restarting server does."""
        server, self._server = self._server, None
        if server is None:
            return
        runner = server.server.runner
        if runner is not None:
            for site in list(runner.sites):  # stop accepting first, so no connection slips in behind the closing
                await site.stop()
            await asyncio.sleep(0)  # a connection accepted just before gets its handler, to be closed with the rest
            for connection in list(runner.server.connections if runner.server is not None else ()):
                connection.force_close()  # aiohttp would wait up to a minute for each stream
        await server.__aexit__(None, None, None)


@contextlib.asynccontextmanager
async def api_server() -> AsyncIterator[ApiServer]:
    async with Emulator() as emulator:
        register_resources(emulator)
        server = ApiServer(emulator)
        await server.start()
        try:
            yield server
        finally:
            await server.stop()


@contextlib.asynccontextmanager
async def emulated_api() -> AsyncIterator[tuple[Emulator, str]]:
    async with api_server() as server:
        yield server.emulator, server.url


class OperatorThread:
    """The operator in a thread with an event loop of its own, as if it were another process.

    kopf cancels every task created after it started when it stops (it cannot tell its own from others), so
    it must not share the test's loop. It talks to the emulator over HTTP, like a real operator would.
    """

    def __init__(self, url: str, *, config: tunables.Tunables, namespaces: tuple[str, ...]) -> None:
        self.url = url
        self.config = config
        self.namespaces = namespaces
        self.ports: app.Ports | None = None
        self.operator: handlers.Operator | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="operator", daemon=True)

    def start(self, timeout_s: float = WAIT_S) -> None:
        self._thread.start()
        assert self._ready.wait(timeout_s), "the operator did not get ready"
        assert self.error is None, f"the operator stopped at once: {self.error!r}"

    def stop(self, timeout_s: float = 60) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the operator did not stop"
        assert self.error is None, f"the operator failed: {self.error!r}"

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as e:  # reported to the test by start() or stop()
            self.error = e
            self._ready.set()

    async def _run(self) -> None:
        connection = credentials.Credentials(server=self.url)
        api = kube.KubeApi(credentials=connection)
        self.operator = handlers.Operator(
            credentials=connection,
            kube_api=api,
            metrics=metrics.Metrics(),
            liveness=health.Liveness(),
            tunables=self.config,
            reporting_instance="operator-thread",
        )
        try:
            async with app.probes(
                operator=self.operator, ready=self._ready.is_set, host="127.0.0.1", metrics_port=0, health_port=0
            ) as ports:
                self.ports = ports
                await app.run_kopf(
                    operator=self.operator, namespaces=self.namespaces, stop=self._stop, ready=self._ready
                )
        finally:
            await api.close()


@contextlib.asynccontextmanager
async def running_operator(emulator: Emulator, url: str, *, config: tunables.Tunables = FAST) -> AsyncIterator[Cluster]:
    thread = OperatorThread(url, config=config, namespaces=(NAMESPACE,))
    await asyncio.to_thread(thread.start)
    try:
        assert thread.operator is not None
        assert thread.ports is not None
        yield Cluster(emulator=emulator, operator=thread.operator, ports=thread.ports)
    finally:
        await asyncio.to_thread(thread.stop)
