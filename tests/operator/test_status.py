"""The pure status logic: facts + previous status + now -> new status and events (table-driven)."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
from typing import Any

import pytest

from modcache import plan
from modcache_operator import names, status

T0 = datetime.datetime(2025, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
INTERVAL_S = 300.0
R = names.Reason

HEALTHY = status.Facts(
    generation=3,
    synced=True,
    source=status.Link(True, "db:5432/app"),
    cache=status.Link(True, "cache:6379/0"),
    listener=status.Link(True, "listening on modcache_modules"),
    keyspace=status.Link(True, "subscribed"),
    counts=status.Counts(source=10, cached=10, rejected=0),
    digest="sha256:abc",
    last_attempt_at=T0,
    last_success_at=T0,
)


def _compute(facts: status.Facts, previous: dict[str, Any] | None = None, at: datetime.datetime = T0) -> status.Update:
    return status.compute(facts, previous or {}, at, timestamp_interval_s=INTERVAL_S)


def _conditions(update: status.Update) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in update.conditions}


def _later(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


CASES: dict[str, tuple[status.Facts, dict[str, tuple[str, str]]]] = {
    "healthy": (
        HEALTHY,
        {
            "Ready": ("True", R.IN_SYNC),
            "Reconciling": ("False", R.IDLE),
            "Stalled": ("False", R.NOT_STALLED),
            "SourceReachable": ("True", R.CONNECTED),
            "CacheReachable": ("True", R.CONNECTED),
            "ListenerConnected": ("True", R.CONNECTED),
        },
    ),
    "starting": (
        status.Facts(generation=1),
        {
            "Ready": ("False", R.STARTING),
            "Reconciling": ("True", R.PROGRESSING),
            "Stalled": ("False", R.NOT_STALLED),
            "SourceReachable": ("Unknown", R.UNKNOWN),
            "CacheReachable": ("Unknown", R.UNKNOWN),
            "ListenerConnected": ("Unknown", R.UNKNOWN),
        },
    ),
    "secret missing stalls": (
        status.Facts(generation=1, problem=status.Problem(R.SECRET_NOT_FOUND, "spec.cache.redisUrlSecretRef: gone")),
        {
            "Ready": ("False", R.SECRET_NOT_FOUND),
            "Reconciling": ("False", R.IDLE),
            "Stalled": ("True", R.SECRET_NOT_FOUND),
        },
    ),
    "redis down retries": (
        dataclasses.replace(
            HEALTHY,
            problem=status.Problem(R.CACHE_UNAVAILABLE, "Redis: connection refused"),
            cache=status.Link(False, "connection refused"),
        ),
        {
            "Ready": ("False", R.CACHE_UNAVAILABLE),
            "Reconciling": ("True", R.PROGRESSING),
            "Stalled": ("False", R.NOT_STALLED),
            "CacheReachable": ("False", R.UNREACHABLE),
            "SourceReachable": ("True", R.CONNECTED),
        },
    ),
    "listener down keeps ready": (
        dataclasses.replace(HEALTHY, listener=status.Link(False, "connection lost")),
        {"Ready": ("True", R.LISTENER_DOWN), "ListenerConnected": ("False", R.DISCONNECTED)},
    ),
    "keyspace events off": (
        dataclasses.replace(HEALTHY, keyspace=status.Link(False, "CONFIG disabled; repairing on the timer alone")),
        {"Ready": ("True", R.IN_SYNC), "CacheReachable": ("True", R.KEYSPACE_EVENTS_OFF)},
    ),
    "suspended": (
        dataclasses.replace(HEALTHY, suspended=True),
        {
            "Ready": ("False", R.SUSPENDED),
            "Reconciling": ("False", R.SUSPENDED),
            "Stalled": ("False", R.NOT_STALLED),
            "SourceReachable": ("Unknown", R.SUSPENDED),
            "ListenerConnected": ("Unknown", R.SUSPENDED),
        },
    ),
}


@pytest.mark.parametrize(("facts", "expected"), CASES.values(), ids=CASES.keys())
def test_conditions(facts: status.Facts, expected: dict[str, tuple[str, str]]) -> None:
    got = _conditions(_compute(facts))
    assert {k: got[k] for k in expected} == expected


def test_status_fields_and_message() -> None:
    drift = status.Drift({plan.Reason.MISSING: 2, plan.Reason.ORPHAN: 1}, "keyspace", T0)
    facts = dataclasses.replace(HEALTHY, last_drift=drift, total_repairs=7, handled_token="now")
    new = _compute(facts).status
    assert new is not None
    assert new["observedGeneration"] == 3
    assert (new["sourceModules"], new["cachedModules"], new["rejectedModules"]) == (10, 10, 0)
    counts = {**{r.value: 0 for r in plan.Reason}, "missing": 2, "orphan": 1, "total": 3}
    assert new["lastDrift"] == counts | {"trigger": "keyspace", "time": "2025-01-01T12:00:00Z"}
    assert new["totalRepairs"] == 7
    assert new["lastHandledReconcileAt"] == "now"
    assert new["sourceDigest"] == "sha256:abc"
    assert new["lastSyncTime"] == new["lastSuccessfulSyncTime"] == "2025-01-01T12:00:00Z"
    assert new["message"] == "10 of 10 modules cached"
    assert [c["type"] for c in new["conditions"]] == [t.value for t in names.ConditionType]


def test_every_status_field_is_declared_in_the_crd(crd_schema: dict[str, Any]) -> None:
    drift = status.Drift({plan.Reason.STALE: 1}, "periodic", T0)
    facts = dataclasses.replace(HEALTHY, last_drift=drift, handled_token="t")
    new = _compute(facts).status
    assert new is not None
    declared = crd_schema["properties"]["status"]["properties"]
    assert set(new) <= set(declared)
    assert set(new["lastDrift"]) <= set(declared["lastDrift"]["properties"])
    assert set(new["conditions"][0]) <= set(declared["conditions"]["items"]["properties"])


def test_no_drift_resync_writes_only_a_throttled_timestamp() -> None:
    first = _compute(HEALTHY).status
    assert first is not None
    soon = dataclasses.replace(HEALTHY, last_attempt_at=_later(60), last_success_at=_later(60))
    assert _compute(soon, first, _later(60)).status is None
    later = dataclasses.replace(HEALTHY, last_attempt_at=_later(INTERVAL_S), last_success_at=_later(INTERVAL_S))
    written = _compute(later, first, _later(INTERVAL_S)).status
    assert written is not None
    assert status.patch_for(written, first) == {
        "lastSyncTime": "2025-01-01T12:05:00Z",
        "lastSuccessfulSyncTime": "2025-01-01T12:05:00Z",
    }


def test_transition_time_moves_only_when_status_changes() -> None:
    first = _compute(HEALTHY).status
    assert first is not None
    reason_only = dataclasses.replace(HEALTHY, listener=status.Link(True, "listening again"))
    second = _compute(reason_only, first, _later(10)).status
    assert second is not None  # the message changed
    assert [c["lastTransitionTime"] for c in second["conditions"]] == [
        c["lastTransitionTime"] for c in first["conditions"]
    ]
    broken = dataclasses.replace(HEALTHY, problem=status.Problem(R.SOURCE_UNAVAILABLE, "refused"))
    third = _compute(broken, second, _later(20)).status
    assert third is not None
    times = {c["type"]: c["lastTransitionTime"] for c in third["conditions"]}
    assert times["Ready"] == times["Reconciling"] == "2025-01-01T12:00:20Z"
    assert times["SourceReachable"] == "2025-01-01T12:00:00Z"


FAILED_CACHE = dataclasses.replace(HEALTHY, problem=status.Problem(R.CACHE_UNAVAILABLE, "refused"))
NO_SECRET = dataclasses.replace(HEALTHY, problem=status.Problem(R.SECRET_NOT_FOUND, "gone"))
STARTING = status.Facts(generation=3)
LISTENER_LOST = dataclasses.replace(HEALTHY, listener=status.Link(False, "terminated"))


def _told(*steps: status.Facts, announced: str | None = None) -> list[tuple[str, str]]:
    told: list[tuple[str, str]] = []
    for old, new in itertools.pairwise(steps):
        events, announced = status.events_between(old, new, announced)
        told += [(e.type.value, e.reason) for e in events]
    return told


EVENTS: dict[str, tuple[tuple[status.Facts, ...], list[tuple[str, str]]]] = {
    "steady": ((HEALTHY, HEALTHY), []),
    "first start": ((STARTING, HEALTHY), []),
    "sync failed once, then recovered": (
        (HEALTHY, FAILED_CACHE, FAILED_CACHE, HEALTHY),
        [("Warning", R.CACHE_UNAVAILABLE), ("Normal", R.RECOVERED)],
    ),
    "recovery through a restart is still told": (
        (HEALTHY, NO_SECRET, STARTING, HEALTHY),
        [("Warning", R.SECRET_NOT_FOUND), ("Normal", R.RECOVERED)],
    ),
    "failure changes cause": (
        (HEALTHY, NO_SECRET, FAILED_CACHE),
        [("Warning", R.SECRET_NOT_FOUND), ("Warning", R.CACHE_UNAVAILABLE)],
    ),
    "same failure, new message": (
        (FAILED_CACHE, dataclasses.replace(HEALTHY, problem=status.Problem(R.CACHE_UNAVAILABLE, "reset"))),
        [("Warning", R.CACHE_UNAVAILABLE)],
    ),
    "listener blip": (
        (HEALTHY, LISTENER_LOST, HEALTHY),
        [("Warning", R.LISTENER_DOWN), ("Normal", R.LISTENER_RECONNECTED)],
    ),
    "listener first connect": ((STARTING, dataclasses.replace(STARTING, listener=status.Link(True, "on"))), []),
    "suspended": ((HEALTHY, dataclasses.replace(HEALTHY, suspended=True)), [("Normal", R.SUSPENDED)]),
}


@pytest.mark.parametrize(("steps", "expected"), EVENTS.values(), ids=EVENTS.keys())
def test_events_mark_transitions_only(steps: tuple[status.Facts, ...], expected: list[tuple[str, str]]) -> None:
    assert _told(*steps) == expected


def test_a_failure_announced_before_a_restart_is_not_repeated() -> None:
    previous = _compute(FAILED_CACHE).status
    assert previous is not None
    announced = status.announced_failure(previous)
    assert announced == R.CACHE_UNAVAILABLE
    assert _told(STARTING, FAILED_CACHE, HEALTHY, announced=announced) == [("Normal", R.RECOVERED)]


def test_drift_events_are_throttled() -> None:
    drift = status.Drift({plan.Reason.MISSING: 1}, "keyspace", T0)
    first = status.drift_event(drift, None, interval_s=60)
    assert first is not None
    assert first.reason == R.DRIFT_CORRECTED
    assert first.message == "corrected 1 cache entries (1 missing)"
    assert status.drift_event(drift, 30.0, interval_s=60) is None
    merged = drift.merged(status.Drift({plan.Reason.STALE: 2}, "periodic", _later(30)))
    later = status.drift_event(merged, 61.0, interval_s=60)
    assert later is not None
    assert later.message == "corrected 3 cache entries (1 missing, 2 stale)"
    assert merged.trigger == "mixed"
    assert status.drift_event(None, None, interval_s=60) is None


def test_patch_for_nulls_removed_fields() -> None:
    assert status.patch_for({"a": 1, "b": [1]}, {"a": 1, "b": [2], "c": 3}) == {"b": [1], "c": None}


@pytest.mark.parametrize(
    "foreign", ["2025-01-01T11:59:59.5Z", "2025-01-01T11:59:59+00:00", "2025-01-01T12:59:59+01:00"]
)
def test_a_valid_rfc3339_timestamp_from_another_writer_is_read_not_a_crash(foreign: str) -> None:
    """Fractions and offsets are valid RFC 3339 (the CRD says ``date-time``; Go's MicroTime writes them): the
    attack froze the status writer with one such value. Within the interval it stands; nothing else changed."""
    first = _compute(HEALTHY).status
    assert first is not None
    assert _compute(HEALTHY, {**first, "lastSyncTime": foreign, "lastSuccessfulSyncTime": foreign}).status is None


@pytest.mark.parametrize("foreign", ["yesterday", "", 17, ["2025"], "2031-01-01T00:00:00Z"])
def test_an_unreadable_or_future_timestamp_left_on_the_server_is_replaced(foreign: object) -> None:
    """``kubectl edit --subresource=status`` can write anything, and a previous leader's fast clock a time ahead:
    ours replaces it at once instead of crashing or waiting for the wall clock to catch up."""
    first = _compute(HEALTHY).status
    assert first is not None
    written = _compute(HEALTHY, {**first, "lastSyncTime": foreign, "lastSuccessfulSyncTime": foreign}).status
    assert written is not None
    assert written["lastSyncTime"] == written["lastSuccessfulSyncTime"] == "2025-01-01T12:00:00Z"
