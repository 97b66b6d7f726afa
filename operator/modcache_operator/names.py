"""Every Kubernetes name the operator uses: the resource, the finalizer, annotations, condition types, reasons."""

from __future__ import annotations

import enum

GROUP = "modcache.dev"
VERSION = "v1alpha1"
PLURAL = "modulecaches"
KIND = "ModuleCache"

#: Replaces kopf's default finalizer, so ``kubectl get -o yaml`` says who holds the object.
FINALIZER = "modcache.dev/finalizer"
#: Set to any new value (e.g. a timestamp) to ask for a full resync; echoed as ``status.lastHandledReconcileAt``.
RESYNC_ANNOTATION = "modcache.dev/resync-requested-at"
#: Prefix of the annotations kopf may keep its own bookkeeping in.
KOPF_ANNOTATION_PREFIX = "operator.modcache.dev"
#: ``reportingComponent`` of the events the operator posts.
REPORTING_COMPONENT = "modcache-operator"


class ConditionType(enum.StrEnum):
    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"
    SOURCE_REACHABLE = "SourceReachable"
    CACHE_REACHABLE = "CacheReachable"
    LISTENER_CONNECTED = "ListenerConnected"


class Reason(enum.StrEnum):
    """Condition and event reasons (CamelCase, as metav1.Condition requires)."""

    # Ready
    IN_SYNC = "InSync"
    LISTENER_DOWN = "ListenerDown"
    SUSPENDED = "Suspended"
    STARTING = "Starting"
    SECRET_NOT_FOUND = "SecretNotFound"
    SECRET_KEY_NOT_FOUND = "SecretKeyNotFound"
    INVALID_SPEC = "InvalidSpec"
    INVALID_URL = "InvalidURL"
    SOURCE_UNAVAILABLE = "SourceUnavailable"
    CACHE_UNAVAILABLE = "CacheUnavailable"
    SYNC_FAILED = "SyncFailed"
    PREFIX_CONFLICT = "PrefixConflict"
    # Reconciling / Stalled
    PROGRESSING = "Progressing"
    IDLE = "Idle"
    NOT_STALLED = "NotStalled"
    # Reachability
    CONNECTED = "Connected"
    UNREACHABLE = "Unreachable"
    UNKNOWN = "Unknown"
    KEYSPACE_EVENTS_OFF = "KeyspaceEventsOff"
    DISCONNECTED = "Disconnected"
    # Events only
    DRIFT_CORRECTED = "DriftCorrected"
    RECOVERED = "Recovered"
    LISTENER_RECONNECTED = "ListenerReconnected"
    STATUS_REJECTED = "StatusRejected"


#: Ready reasons that need a person to act (Stalled True): retrying continues, but will not help by itself.
STALLING = frozenset(
    {
        Reason.SECRET_NOT_FOUND,
        Reason.SECRET_KEY_NOT_FOUND,
        Reason.INVALID_SPEC,
        Reason.INVALID_URL,
        Reason.PREFIX_CONFLICT,
    }
)

#: Ready reasons that mean the cache cannot be trusted because something failed (events go out on these).
FAILING = STALLING | {Reason.SOURCE_UNAVAILABLE, Reason.CACHE_UNAVAILABLE, Reason.SYNC_FAILED}
