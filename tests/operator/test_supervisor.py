"""An hour in the life of a supervisor, in fast-forwarded loop time (looptime): no state makes it busy.

The supervisor and its reporter run for real, over a fake object, Secret reader and status API (no services:
these states never start a watcher). A busy loop shows as passes (liveness beats), Secret reads or status
writes far above what the heartbeat, the backoff ceiling and the Secret re-read period allow; a wake-up storm
must cost passes only, never API calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from modcache import errors, plan
from modcache_operator import (
    claims,
    fence,
    health,
    kube,
    metrics,
    names,
    reporter,
    spec,
    statuswriter,
    supervisor,
    tunables,
)

HOUR_S = 3600.0
DEFAULTS = tunables.Tunables()
#: Retries an hour at the backoff's ceiling (each at least half the ceiling), plus the climb to it.
MAX_RETRIES = 2 * HOUR_S / DEFAULTS.retry_max_s + 10
#: Passes an idle supervisor makes in an hour: one per heartbeat, one per retry, a few at the start.
MAX_PASSES = HOUR_S / DEFAULTS.heartbeat_s + MAX_RETRIES + 20


@dataclasses.dataclass
class Body:
    spec: dict[str, Any]
    metadata: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"generation": 1, "creationTimestamp": "2025-01-01T00:00:00Z"}
    )
    status: dict[str, Any] = dataclasses.field(default_factory=dict)


class Secrets:
    """A Secret reader that fails every read in a given way, and counts them."""

    def __init__(self, failure: errors.ModcacheError) -> None:
        self.failure = failure
        self.reads = 0

    async def read_secret(self, namespace: str, name: str, *, field: str) -> kube.SecretData:
        self.reads += 1
        raise self.failure


class StatusApi:
    def __init__(self, body: Body) -> None:
        self.body = body
        self.patches = 0

    async def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> Mapping[str, Any] | None:
        self.patches += 1
        self.body.status = {**self.body.status, **patch}
        self.body.metadata["resourceVersion"] = str(self.patches)
        return {"status": self.body.status, "metadata": dict(self.body.metadata)}


class CountingLiveness(health.Liveness):
    beats: int = 0

    def beat(self, loop: str, *, allowed_silence_s: float) -> None:
        self.beats += 1
        super().beat(loop, allowed_silence_s=allowed_silence_s)


@dataclasses.dataclass
class Run:
    body: Body
    secrets: Secrets
    api: StatusApi
    liveness: CountingLiveness
    supervisor: supervisor.Supervisor
    stopped: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Started by the test itself, so every deadline is on the test's (fast-forwarded) loop time."""
        self.task = asyncio.create_task(self.supervisor.run(self.stopped))

    async def stop(self) -> None:
        self.stopped.set()
        self.supervisor.poke()
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)


def _spec(**extra: Any) -> dict[str, Any]:
    refs = {"databaseUrlSecretRef": {"name": "urls", "key": "database"}}
    return {"source": refs, "cache": {"redisUrlSecretRef": {"name": "urls", "key": "redis"}}, **extra}


@pytest.fixture
async def run(request: pytest.FixtureRequest) -> AsyncIterator[Run]:
    body_spec, failure = request.param
    body = Body(spec=body_spec)
    secrets, api, liveness = Secrets(failure), StatusApi(body), CountingLiveness()
    the_reporter = reporter.Reporter(
        namespace="ns",
        name="main",
        body=body,
        outlets=statuswriter.Outlets(api=api, metrics=metrics.Metrics(), post_event=lambda _: None),
    )
    the_supervisor = supervisor.Supervisor(
        namespace="ns",
        name="main",
        body=body,
        secrets=secrets,
        reporter=the_reporter,
        claims=claims.Registry(),
        fence=fence.Fence(),
        liveness=liveness,
    )
    the_run = Run(body, secrets, api, liveness, the_supervisor)
    try:
        yield the_run
    finally:
        await the_run.stop()


MISSING = spec.SpecProblem(
    "spec.source.databaseUrlSecretRef", names.Reason.SECRET_NOT_FOUND, "Secret ns/urls not found"
)
STATES = {
    "suspended": (_spec(suspend=True), MISSING),
    "invalid spec": ({"source": {}}, MISSING),
    "missing Secret": (_spec(), MISSING),
    "API server failing": (_spec(), errors.TransientError("reading Secret ns/urls: HTTP 503 Service Unavailable")),
}


@pytest.mark.looptime
@pytest.mark.parametrize("run", list(STATES.values()), ids=list(STATES), indirect=True)
async def test_an_hour_at_rest_costs_a_pass_per_heartbeat_and_bounded_retries(run: Run) -> None:
    run.start()
    await asyncio.sleep(HOUR_S)
    assert run.liveness.beats <= MAX_PASSES, f"{run.liveness.beats} passes in an hour: a busy loop"
    assert run.secrets.reads <= MAX_RETRIES, f"{run.secrets.reads} Secret reads in an hour"
    assert run.api.patches <= 3, f"{run.api.patches} status writes in an hour with nothing changing"
    if run.body.spec.get("suspend") or "cache" not in run.body.spec:
        assert run.secrets.reads == 0, "nothing to read while suspended or while the spec is unusable"
    else:
        assert run.secrets.reads >= HOUR_S / DEFAULTS.retry_max_s - 2, "it must keep retrying, with a ceiling"


@pytest.mark.looptime
@pytest.mark.parametrize("run", [STATES["missing Secret"]], ids=["missing Secret"], indirect=True)
async def test_a_storm_of_wake_ups_costs_no_api_calls(run: Run) -> None:
    run.start()
    for _ in range(3600):
        run.supervisor.poke()
        await asyncio.sleep(1.0)
    assert run.secrets.reads <= MAX_RETRIES, "wake-ups must not bypass the backoff"
    assert run.api.patches <= 3


@pytest.mark.looptime
@pytest.mark.parametrize("run", [STATES["missing Secret"]], ids=["missing Secret"], indirect=True)
async def test_a_new_generation_is_tried_at_once_despite_the_backoff(run: Run) -> None:
    run.start()
    await asyncio.sleep(HOUR_S)  # the backoff is at its ceiling now
    reads = run.secrets.reads
    run.body.metadata["generation"] = 2
    run.body.spec["cache"]["redisUrlSecretRef"]["key"] = "other"
    run.supervisor.poke()
    await asyncio.sleep(0.5)
    assert run.secrets.reads == reads + 1, "a spec change waited for the old backoff"


class CountingMetrics(metrics.Metrics):
    """Counts the reporter's passes (each one publishes the conditions it computed)."""

    passes = 0

    def conditions(self, namespace: str, name: str, conditions: dict[str, str]) -> None:
        self.passes += 1
        super().conditions(namespace, name, conditions)


def _repair(count: int) -> plan.Report:
    return plan.Report(
        plan=plan.Plan(items=()),
        applied={plan.Reason.MISSING: count},
        superseded=0,
        vanished=0,
        source_count=10,
        cached_count=10,
        digest="sha256:x",
        duration_s=0.01,
        full=False,
    )


@pytest.mark.looptime
async def test_drift_announced_later_waits_on_a_timer_not_a_poll() -> None:
    body = Body(spec=_spec())
    counting, told = CountingMetrics(), []
    the_reporter = reporter.Reporter(
        namespace="ns",
        name="main",
        body=body,
        outlets=statuswriter.Outlets(api=StatusApi(body), metrics=counting, post_event=told.append),
    )
    writer = asyncio.create_task(the_reporter.writer.write_forever())
    try:
        the_reporter.on_sync(_repair(1), "keyspace")  # announced at once
        await asyncio.sleep(1.0)
        the_reporter.on_sync(_repair(2), "keyspace")  # within the minute: announced when it has passed
        await asyncio.sleep(DEFAULTS.drift_event_interval_s)
        drift = [e for e in told if e.reason == names.Reason.DRIFT_CORRECTED]
        assert [e.message for e in drift] == [
            "corrected 1 cache entries (1 missing)",
            "corrected 2 cache entries (2 missing)",
        ]
        assert counting.passes <= 6, f"{counting.passes} passes for two drift events: polling"
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
