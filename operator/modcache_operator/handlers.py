"""The kopf registry: one daemon per ModuleCache, an index of them, and the event handler that wakes them.

Everything the handlers need arrives in an ``Operator`` object (no module-level registry or globals): the
credentials kopf logs in with, the API adapter, metrics, liveness, tunables, the prefix claims and
the current term's fence. The daemon owns a ``supervisor.Supervisor`` and its ``reporter.Reporter``; every
event on a ModuleCache pokes its supervisor (which decides from state, so a poke too many costs one look) and
tells its reporter that the server's copy changed. Secrets are not watched: supervisors read them by name.

The index exists for its timing: kopf hands it every ModuleCache before it starts any daemon, so a supervisor
knows which older ModuleCaches may still claim an overlapping key prefix (see ``claims``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import kopf

from modcache import keys
from modcache_operator import (
    claims,
    credentials,
    fence,
    health,
    kube,
    leader,
    metrics,
    names,
    reporter,
    status,
    statuswriter,
    supervisor,
)
from modcache_operator import tunables as tunables_

log = logging.getLogger(__name__)

#: How long kopf waits for a stopping daemon before re-checking later (a supervisor stops in well under a
#: second; its own stop is bounded by ``Tunables.stop_timeout_s``). Within this time the finalizer goes at once.
INSTANT_EXIT_TIMEOUT_S = 20.0
#: After that, the daemon is cancelled and given this long; then it is abandoned and the finalizer removed.
CANCELLATION_TIMEOUT_S = 30.0
#: Bounds on kopf's own API calls (kopf's defaults have none for connecting, and 5 minutes per request).
REQUEST_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
#: A watch request asks the server to end it after this long; the client gives up a minute later.
WATCH_SERVER_TIMEOUT_S = 600.0


@dataclasses.dataclass
class Operator:
    credentials: credentials.Credentials
    kube_api: kube.KubeApi
    metrics: metrics.Metrics
    liveness: health.Liveness
    tunables: tunables_.Tunables = dataclasses.field(default_factory=tunables_.Tunables)
    reporting_instance: str = dataclasses.field(default_factory=leader.pod_name)
    supervisors: dict[tuple[str, str], supervisor.Supervisor] = dataclasses.field(default_factory=dict)
    claims: claims.Registry = dataclasses.field(default_factory=claims.Registry)
    fence: fence.Fence = dataclasses.field(default_factory=fence.Fence)  # replaced at each leadership term


def settings(*, namespaced: bool, reporting_instance: str) -> kopf.OperatorSettings:
    """kopf's settings: our finalizer and annotation prefix, events from our component and pod, timeouts."""
    operator_settings = kopf.OperatorSettings()
    operator_settings.persistence.finalizer = names.FINALIZER
    operator_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=names.KOPF_ANNOTATION_PREFIX
    )
    operator_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=names.KOPF_ANNOTATION_PREFIX
    )
    operator_settings.posting.reporting_component = names.REPORTING_COMPONENT
    operator_settings.posting.reporting_instance = reporting_instance
    operator_settings.posting.level = logging.WARNING  # kopf's own log lines are not events; ours are posted
    operator_settings.networking.request_timeout = REQUEST_TIMEOUT_S
    operator_settings.networking.connect_timeout = CONNECT_TIMEOUT_S
    operator_settings.watching.connect_timeout = CONNECT_TIMEOUT_S
    operator_settings.watching.server_timeout = WATCH_SERVER_TIMEOUT_S
    operator_settings.watching.client_timeout = WATCH_SERVER_TIMEOUT_S + 60
    operator_settings.background.instant_exit_timeout = INSTANT_EXIT_TIMEOUT_S
    operator_settings.scanning.disabled = namespaced  # a namespaced Role cannot list namespaces or CRDs
    return operator_settings


def registry(operator: Operator) -> kopf.OperatorRegistry:
    reg = kopf.OperatorRegistry()

    @kopf.on.login(registry=reg)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        return credentials.connection_info(operator.credentials)

    @kopf.index(names.GROUP, names.VERSION, names.PLURAL, registry=reg)
    async def modulecache_claims(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> None:
        operator.claims.know((namespace or "", name), _known(body))

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

    # Async on purpose: kopf runs sync handlers in threads, and a supervisor's wake-up is an asyncio.Event.
    @kopf.on.event(names.GROUP, names.VERSION, names.PLURAL, registry=reg)
    async def modulecache_changed(
        body: kopf.Body, namespace: str | None, name: str, type: str | None, **_: Any
    ) -> None:
        owner = (namespace or "", name)
        if type == "DELETED":
            operator.claims.forget(owner)
        the_supervisor = operator.supervisors.get(owner)
        if the_supervisor is not None:
            the_supervisor.reporter.writer.body_changed(body.metadata.get("resourceVersion"))
            the_supervisor.poke()

    return reg


async def _run_modulecache(
    operator: Operator, body: kopf.Body, namespace: str, name: str, stopped: kopf.DaemonStopped
) -> None:
    term = operator.fence
    the_reporter = reporter.Reporter(
        namespace=namespace,
        name=name,
        body=body,
        outlets=statuswriter.Outlets(
            api=operator.kube_api,
            metrics=operator.metrics,
            post_event=_poster(body),
            config=operator.tunables,
            may_write=lambda: term.open,
        ),
    )
    the_supervisor = supervisor.Supervisor(
        namespace=namespace,
        name=name,
        body=body,
        secrets=operator.kube_api,
        reporter=the_reporter,
        claims=operator.claims,
        fence=term,
        liveness=operator.liveness,
        tunables=operator.tunables,
    )
    operator.supervisors[namespace, name] = the_supervisor
    try:
        await the_supervisor.run(stopped)
    finally:
        if operator.supervisors.get((namespace, name)) is the_supervisor:
            del operator.supervisors[namespace, name]
        if body.metadata.get("deletionTimestamp"):
            operator.metrics.forget(namespace, name)


def _known(body: kopf.Body) -> claims.Known:
    spec = body.spec
    prefix = spec.get("keyPrefix", keys.DEFAULT_PREFIX)
    return claims.Known(
        created=str(body.metadata.get("creationTimestamp") or ""),
        prefix=prefix if isinstance(prefix, str) else "",
        active=not spec.get("suspend", False) and not body.metadata.get("deletionTimestamp"),
    )


def _poster(body: kopf.Body) -> statuswriter.EventPoster:
    def post(event: status.Event) -> None:
        kopf.event(body, type=event.type.value, reason=event.reason, message=event.message)

    return post
