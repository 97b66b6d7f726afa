"""The kopf registry: one daemon per ModuleCache, and the event handlers that wake it.

Everything the handlers need arrives in an ``Operator`` object (no module-level registry or globals):
the Kubernetes configuration kopf logs in with, the API adapter, metrics, liveness and runner tunables. The
daemon owns a ``runner.Runner`` for its object; ``on.event`` handlers poke that runner when the object's
generation or resync annotation changes, or when a Secret it reads changes (so a rotated Secret is picked up at
once, not only when a sync fails).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import kopf
from kubernetes_asyncio import client

from modcache_operator import health, kube, metrics, names, runner, status

log = logging.getLogger(__name__)

#: How long kopf waits for a stopping daemon before re-checking later (a runner stops in well under a second;
#: its own stop is bounded by ``RunnerConfig.stop_timeout_s``). Within this time the finalizer goes at once.
INSTANT_EXIT_TIMEOUT_S = 20.0
#: After that, the daemon is cancelled and given this long; then it is abandoned and the finalizer removed.
CANCELLATION_TIMEOUT_S = 30.0


@dataclasses.dataclass
class Operator:
    configuration: client.Configuration
    kube_api: kube.KubeApi
    metrics: metrics.Metrics
    liveness: health.Liveness
    runner_config: runner.RunnerConfig = dataclasses.field(default_factory=runner.RunnerConfig)
    runners: dict[tuple[str, str], runner.Runner] = dataclasses.field(default_factory=dict)


def settings(*, namespaced: bool) -> kopf.OperatorSettings:
    """kopf's settings: our finalizer and annotation prefix, events from our component."""
    operator_settings = kopf.OperatorSettings()
    operator_settings.persistence.finalizer = names.FINALIZER
    operator_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=names.KOPF_ANNOTATION_PREFIX
    )
    operator_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=names.KOPF_ANNOTATION_PREFIX
    )
    operator_settings.posting.reporting_component = names.REPORTING_COMPONENT
    operator_settings.posting.level = logging.WARNING  # kopf's own log lines are not events; ours are posted
    operator_settings.background.instant_exit_timeout = INSTANT_EXIT_TIMEOUT_S
    operator_settings.scanning.disabled = namespaced  # a namespaced Role cannot list namespaces or CRDs
    return operator_settings


def registry(operator: Operator) -> kopf.OperatorRegistry:
    reg = kopf.OperatorRegistry()

    @kopf.on.login(registry=reg)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        return await kube.connection_info(operator.configuration)

    @kopf.daemon(
        names.GROUP,
        names.VERSION,
        names.PLURAL,
        id="modulecache",
        registry=reg,
        cancellation_timeout=CANCELLATION_TIMEOUT_S,
    )
    async def modulecache(
        body: kopf.Body, namespace: str | None, name: str, stopped: kopf.DaemonStopped, **_: Any
    ) -> None:
        await _run_modulecache(operator, body, namespace or "", name, stopped)

    # Async on purpose: kopf runs sync handlers in threads, and a runner's wake-up is an asyncio.Event.
    @kopf.on.event(names.GROUP, names.VERSION, names.PLURAL, registry=reg)
    async def modulecache_changed(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> None:
        the_runner = operator.runners.get((namespace or "", name))
        if the_runner is not None and the_runner.wants_wakeup(body):
            the_runner.poke()

    @kopf.on.event("", "v1", "secrets", registry=reg)
    async def secret_changed(namespace: str | None, name: str, **_: Any) -> None:
        for (ns, _cache), the_runner in list(operator.runners.items()):
            if ns == namespace and the_runner.uses_secret(name):
                log.info("Secret %s/%s changed; %s re-reads it", namespace, name, the_runner.key)
                the_runner.poke()

    return reg


async def _run_modulecache(
    operator: Operator, body: kopf.Body, namespace: str, name: str, stopped: kopf.DaemonStopped
) -> None:
    the_runner = runner.Runner(
        namespace=namespace,
        name=name,
        body=body,
        kube_api=operator.kube_api,
        metrics=operator.metrics,
        liveness=operator.liveness,
        post_event=_poster(body),
        config=operator.runner_config,
    )
    operator.runners[namespace, name] = the_runner
    try:
        await the_runner.run(stopped)
    finally:
        if operator.runners.get((namespace, name)) is the_runner:
            del operator.runners[namespace, name]
        if body.metadata.get("deletionTimestamp"):
            operator.metrics.forget(namespace, name)


def _poster(body: kopf.Body) -> runner.EventPoster:
    def post(event: status.Event) -> None:
        kopf.event(body, type=event.type.value, reason=event.reason, message=event.message)

    return post
