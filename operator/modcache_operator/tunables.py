"""Operator-wide tunables of every ModuleCache's supervisor and reporter (tests shorten them)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Tunables:
    # supervising
    heartbeat_s: float = 5.0  # the supervisor looks at its object at least this often (and proves it runs)
    retry_initial_s: float = 1.0  # backoff of a configuration that cannot run, or of a crashed watcher
    retry_max_s: float = 60.0  # ... and its ceiling: a Secret created late is picked up within this
    secret_recheck_s: float = 60.0  # re-read the named Secrets this often (+-20%): the rotation delay
    watcher_grace_s: float = 60.0  # a watcher silent for 2 resync intervals + this is hung
    stop_timeout_s: float = 5.0  # bound on stopping a watcher and closing its connections
    elder_wait_s: float = 30.0  # at most this long, wait for an older ModuleCache to resolve its endpoint
    # reporting
    timestamp_interval_s: float = 300.0  # a no-drift resync refreshes lastSyncTime at most this often
    drift_event_interval_s: float = 60.0  # at most one DriftCorrected event per this period
    status_debounce_s: float = 0.05  # status changes arriving together make one write
    status_retry_initial_s: float = 1.0  # a status write that failed for a transient reason
    status_retry_max_s: float = 60.0
    rejected_initial_s: float = 10.0  # a status write the API server rejected (RBAC, schema)
    rejected_max_s: float = 600.0
    echo_wait_s: float = 5.0  # how long our own write's answer stands in for kopf's body until it catches up


DEFAULT = Tunables()
