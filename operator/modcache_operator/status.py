"""Pure: what a ModuleCache's status should say, and which events its change deserves.

``compute(facts, previous, now)`` takes what the reporter observed (``Facts``), the status as last written and the
current time, and returns an ``Update``: the new status, or None when nothing worth a write changed.
``events_between(old, new)`` says which events a change of facts deserves. Nothing here reads the clock or talks
to Kubernetes.

Rules the anchors (External Secrets, cert-manager, CloudNativePG, Flux) converge on:

* conditions are metav1.Conditions; ``lastTransitionTime`` moves only when a condition's status changes;
* ``Ready`` summarises, ``Reconciling``/``Stalled`` follow kstatus, three domain conditions say why;
* a sync that finds no drift changes nothing but ``lastSyncTime``/``lastSuccessfulSyncTime``, and those alone
  are written at most once per ``timestamp_interval_s``;
* events mark transitions (failed, recovered, listener lost/back, suspended); drift corrections are announced
  at most once per ``drift_event_interval_s`` with the counts gathered since the last announcement.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
from collections.abc import Mapping
from typing import Any

from modcache import plan
from modcache_operator import names

C = names.ConditionType
R = names.Reason
TIMESTAMP_FIELDS = ("lastSyncTime", "lastSuccessfulSyncTime")


class EventType(enum.StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"


@dataclasses.dataclass(frozen=True)
class Event:
    type: EventType
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Link:
    """A connection's state as last heard: None unknown, True up, False down; ``detail`` says more."""

    up: bool | None = None
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Problem:
    reason: names.Reason
    message: str


@dataclasses.dataclass(frozen=True)
class Counts:
    source: int
    cached: int
    rejected: int


@dataclasses.dataclass(frozen=True)
class Drift:
    """Corrections by reason, what triggered them, and when."""

    counts: Mapping[plan.Reason, int]
    trigger: str
    at: datetime.datetime

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merged(self, other: Drift) -> Drift:
        counts = {r: self.counts.get(r, 0) + other.counts.get(r, 0) for r in plan.Reason}
        trigger = self.trigger if self.trigger == other.trigger else "mixed"
        return Drift(counts=counts, trigger=trigger, at=other.at)

    def describe(self) -> str:
        parts = [f"{n} {reason.value}" for reason, n in self.counts.items() if n]
        return ", ".join(parts) or "nothing"


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the reporter knows about one ModuleCache right now."""

    generation: int
    suspended: bool = False
    problem: Problem | None = None  # a spec/Secret problem, or the last sync's failure (cleared by a full sync)
    synced: bool = False  # a full resync succeeded since the current watcher started
    source: Link = Link()
    cache: Link = Link()
    listener: Link = Link()
    keyspace: Link = Link()
    counts: Counts | None = None
    digest: str | None = None
    last_attempt_at: datetime.datetime | None = None  # end of the last full resync, successful or not
    last_success_at: datetime.datetime | None = None
    last_drift: Drift | None = None
    total_repairs: int = 0
    handled_token: str | None = None


@dataclasses.dataclass(frozen=True)
class Update:
    status: dict[str, Any] | None  # None: nothing worth a write
    conditions: tuple[dict[str, Any], ...]  # as they now stand (written or not), for metrics


def compute(
    facts: Facts,
    previous: Mapping[str, Any],
    now: datetime.datetime,
    *,
    timestamp_interval_s: float,
) -> Update:
    conditions = _merge_conditions(_conditions(facts), previous.get("conditions") or [], now, facts.generation)
    desired = _status(facts, conditions)
    write = _worth_writing(desired, previous, timestamp_interval_s)
    return Update(status=desired if write else None, conditions=tuple(conditions))


def drift_event(pending: Drift | None, since_announced_s: float | None, *, interval_s: float) -> Event | None:
    """An event for the corrections not yet announced, unless one went out less than ``interval_s`` ago."""
    if pending is None or pending.total == 0:
        return None
    if since_announced_s is not None and since_announced_s < interval_s:
        return None
    return Event(EventType.NORMAL, R.DRIFT_CORRECTED, f"corrected {pending.total} cache entries ({pending.describe()})")


def patch_for(new: Mapping[str, Any], old: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch turning status ``old`` into ``new`` (removed fields become null; lists are replaced)."""
    patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch


def rejected_conditions(update: Update, message: str) -> list[dict[str, Any]]:
    """The conditions as they stand, with Ready saying that the API server rejects the status."""
    ready = {"status": "False", "reason": R.STATUS_REJECTED.value, "message": message}
    return [({**c, **ready} if c["type"] == C.READY.value else dict(c)) for c in update.conditions]


def timestamp(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- conditions -------------------------------------------------------------------------------------------------


def _conditions(facts: Facts) -> list[tuple[C, bool | None, R, str]]:
    ready_status, ready_reason, ready_message = _ready(facts)
    stalled = facts.problem is not None and facts.problem.reason in names.STALLING and not facts.suspended
    reconciling = not facts.suspended and not stalled and ready_status is not True
    return [
        (C.READY, ready_status, ready_reason, ready_message),
        (C.RECONCILING, reconciling, *_reconciling(facts, reconciling)),
        (C.STALLED, stalled, ready_reason if stalled else R.NOT_STALLED, ready_message if stalled else ""),
        (C.SOURCE_REACHABLE, *_reachable(facts, facts.source, "PostgreSQL")),
        (C.CACHE_REACHABLE, *_cache_reachable(facts)),
        (C.LISTENER_CONNECTED, *_listener(facts)),
    ]


def _ready(facts: Facts) -> tuple[bool, R, str]:
    if facts.suspended:
        return False, R.SUSPENDED, "spec.suspend is true: the cache is not being written and may drift"
    if facts.problem is not None:
        return False, facts.problem.reason, facts.problem.message
    if not facts.synced or facts.counts is None:
        return False, R.STARTING, "waiting for the first full resync"
    summary = _summary(facts.counts)
    if facts.listener.up is False:
        detail = f" ({facts.listener.detail})" if facts.listener.detail else ""
        return True, R.LISTENER_DOWN, f"{summary}; LISTEN connection down{detail}: changes arrive by resync only"
    return True, R.IN_SYNC, summary


def _summary(counts: Counts) -> str:
    text = f"{counts.cached} of {counts.source} modules cached"
    return f"{text}; {counts.rejected} rejected in the source" if counts.rejected else text


def _reconciling(facts: Facts, reconciling: bool) -> tuple[R, str]:
    if facts.suspended:
        return R.SUSPENDED, "suspended"
    if not reconciling:
        return R.IDLE, ""
    if facts.problem is not None and facts.problem.reason == R.STARTING:
        return R.PROGRESSING, facts.problem.message
    if facts.problem is not None:
        return R.PROGRESSING, f"retrying after: {facts.problem.message}"
    return R.PROGRESSING, "first full resync pending"


def _reachable(facts: Facts, link: Link, what: str) -> tuple[bool | None, R, str]:
    if facts.suspended:
        return None, R.SUSPENDED, "not checked while suspended"
    if link.up is None:
        return None, R.UNKNOWN, link.detail or f"{what} not contacted yet"
    if link.up:
        return True, R.CONNECTED, link.detail
    return False, R.UNREACHABLE, link.detail


def _cache_reachable(facts: Facts) -> tuple[bool | None, R, str]:
    status, reason, message = _reachable(facts, facts.cache, "Redis")
    if status is True and facts.keyspace.up is False:
        return True, R.KEYSPACE_EVENTS_OFF, facts.keyspace.detail
    return status, reason, message


def _listener(facts: Facts) -> tuple[bool | None, R, str]:
    if facts.suspended:
        return None, R.SUSPENDED, "not listening while suspended"
    if facts.listener.up is None:
        return None, R.UNKNOWN, facts.listener.detail or "not connected yet"
    if facts.listener.up:
        return True, R.CONNECTED, facts.listener.detail
    return False, R.DISCONNECTED, facts.listener.detail


def _merge_conditions(
    wanted: list[tuple[C, bool | None, R, str]], previous: list[Mapping[str, Any]], now: datetime.datetime, gen: int
) -> list[dict[str, Any]]:
    before = {c.get("type"): c for c in previous}
    merged = []
    for kind, status, reason, message in wanted:
        text = _status_text(status)
        merged.append(
            {
                "type": kind.value,
                "status": text,
                "reason": reason.value,
                "message": message,
                "lastTransitionTime": _transition_time(before.get(kind.value), text, now),
                "observedGeneration": gen,
            }
        )
    return merged


def _transition_time(old: Mapping[str, Any] | None, status: str, now: datetime.datetime) -> str:
    """The old condition's time if its status is unchanged, else now."""
    kept = old.get("lastTransitionTime") if old is not None and old.get("status") == status else None
    return str(kept) if kept else timestamp(now)


def _status_text(status: bool | None) -> str:
    return "Unknown" if status is None else "True" if status else "False"


# -- the status object ---------------------------------------------------------------------------------------


def _status(facts: Facts, conditions: list[dict[str, Any]]) -> dict[str, Any]:
    status: dict[str, Any] = {"observedGeneration": facts.generation, "conditions": conditions}
    if facts.counts is not None:
        status |= {
            "sourceModules": facts.counts.source,
            "cachedModules": facts.counts.cached,
            "rejectedModules": facts.counts.rejected,
        }
    if facts.digest:
        status["sourceDigest"] = facts.digest
    if facts.last_attempt_at is not None:
        status["lastSyncTime"] = timestamp(facts.last_attempt_at)
    if facts.last_success_at is not None:
        status["lastSuccessfulSyncTime"] = timestamp(facts.last_success_at)
    if facts.last_drift is not None:
        status["lastDrift"] = _drift(facts.last_drift)
    status["totalRepairs"] = facts.total_repairs
    if facts.handled_token is not None:
        status["lastHandledReconcileAt"] = facts.handled_token
    status["message"] = conditions[0]["message"]
    return status


def _drift(drift: Drift) -> dict[str, Any]:
    counts = {reason.value: drift.counts.get(reason, 0) for reason in plan.Reason}
    return counts | {"total": drift.total, "trigger": drift.trigger, "time": timestamp(drift.at)}


def _worth_writing(desired: Mapping[str, Any], previous: Mapping[str, Any], interval_s: float) -> bool:
    """Anything but the sync timestamps changed, or those are older than ``interval_s``."""
    if _without_timestamps(desired) != _without_timestamps(previous):
        return True
    return any(_advanced(desired.get(f), previous.get(f), interval_s) for f in TIMESTAMP_FIELDS)


def _without_timestamps(status: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if k not in TIMESTAMP_FIELDS}


def _advanced(new: str | None, old: object, interval_s: float) -> bool:
    """Whether our timestamp is worth a write over the server's: it moved by ``interval_s``, or the server's
    value is one we cannot read (someone else wrote it) or lies ahead of ours (a previous leader's fast clock)."""
    if new is None or new == old:
        return False
    ours, theirs = _parse(new), _parse(old)
    if ours is None or theirs is None or theirs > ours:
        return True
    return (ours - theirs).total_seconds() >= interval_s


def _parse(text: object) -> datetime.datetime | None:
    """An RFC 3339 timestamp as the API server accepts it (``Z`` or an offset, fractions allowed), or None."""
    if not isinstance(text, str):
        return None
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed.replace(tzinfo=datetime.UTC) if parsed.tzinfo is None else parsed


# -- events ---------------------------------------------------------------------------------------------------


def events_between(old: Facts, new: Facts, announced: str | None) -> tuple[list[Event], str | None]:
    """Events for the change from ``old`` to ``new`` facts, and the failure announced and not yet recovered.

    Computed on every change of facts (not on written statuses), so a blip shorter than a status write, such
    as a LISTEN connection dropped and restored at once, is still told.
    """
    events, announced = _ready_events(new, announced)
    if new.suspended and not old.suspended:
        events.append(Event(EventType.NORMAL, R.SUSPENDED, _ready(new)[2]))
    events += _listener_events(old, new)
    return events, announced


def announced_failure(previous: Mapping[str, Any]) -> str | None:
    """The failure a previous run announced (Ready False with a failing reason), so a restart does not repeat it."""
    for condition in previous.get("conditions") or []:
        if condition.get("type") == C.READY and condition.get("status") == "False":
            reason = condition.get("reason")
            return str(reason) if reason in names.FAILING else None
    return None


def _ready_events(new: Facts, announced: str | None) -> tuple[list[Event], str | None]:
    status, reason, message = _ready(new)
    if not status and reason in names.FAILING and reason != announced:
        return [Event(EventType.WARNING, reason, message)], reason
    if status and announced is not None:
        return [Event(EventType.NORMAL, R.RECOVERED, f"recovered from {announced}: {message}")], None
    return [], announced


def _listener_events(old: Facts, new: Facts) -> list[Event]:
    if old.listener.up is False and new.listener.up is True:
        return [Event(EventType.NORMAL, R.LISTENER_RECONNECTED, new.listener.detail or "LISTEN connection restored")]
    if old.listener.up is True and new.listener.up is False:
        return [Event(EventType.WARNING, R.LISTENER_DOWN, new.listener.detail or "LISTEN connection lost")]
    return []
