"""A ModuleCache's spec as typed values, and the core ``Settings`` it turns into once its Secrets are read.

Pure: nothing here talks to Kubernetes. The CRD schema already rejects malformed specs; ``parse`` still checks
what it relies on, so an object stored before a schema change gets a clear ``InvalidSpec`` instead of a crash.
Problems are ``SpecProblem``s: a ``ConfigError`` carrying the condition reason and the spec field to name.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import re
from collections.abc import Mapping
from typing import Any

import pydantic

from modcache import endpoints, errors, keys, settings
from modcache_operator import names

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SECRET_FIELDS = {
    "database_url": "spec.source.databaseUrlSecretRef",
    "listen_database_url": "spec.source.listenDatabaseUrlSecretRef",
    "redis_url": "spec.cache.redisUrlSecretRef",
}


class SpecProblem(errors.ConfigError):
    """The spec or a Secret it points at cannot be used; ``reason`` becomes the Ready condition's reason."""

    def __init__(self, field: str, reason: names.Reason, detail: str) -> None:
        super().__init__(field, detail)
        self.condition_reason = reason


@dataclasses.dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str
    field: str  # where in the spec it came from, for messages

    def describe(self, namespace: str) -> str:
        return f"key {self.key!r} of Secret {namespace}/{self.name} ({self.field})"


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    database: SecretKeyRef
    listen_database: SecretKeyRef | None
    redis: SecretKeyRef
    key_prefix: str
    resync_interval_s: float
    ttl_s: int | None
    suspend: bool
    prune: bool
    deep_interval_s: float = 3600.0

    def secret_refs(self) -> list[SecretKeyRef]:
        return [r for r in (self.database, self.listen_database, self.redis) if r is not None]


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A spec with its Secret values read: everything one watcher needs."""

    spec: CacheSpec
    database_url: pydantic.SecretStr
    listen_database_url: pydantic.SecretStr | None
    redis_url: pydantic.SecretStr

    def fingerprint(self) -> str:
        """Changes whenever the running watcher would have to restart (spec or a Secret value changed)."""
        parts = [repr(dataclasses.replace(self.spec, suspend=False))]
        parts += [u.get_secret_value() if u is not None else "" for u in self._urls()]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def settings(self) -> settings.Settings:
        """The core settings; a bad URL becomes a SpecProblem naming the spec field (never the value)."""
        values = {
            "database_url": self.database_url,
            "listen_database_url": self.listen_database_url,
            "redis_url": self.redis_url,
            "key_prefix": self.spec.key_prefix,
            "resync_interval_s": self.spec.resync_interval_s,
            "deep_interval_s": self.spec.deep_interval_s,
            "ttl_s": self.spec.ttl_s,
        }
        try:  # every value comes from the CR; operator-wide tunables (jitter, batch sizes) from MODCACHE_* env
            return settings.Settings.model_validate(values)
        except pydantic.ValidationError as e:
            problem = settings.config_error(e, env_prefix="")
            field = _SECRET_FIELDS.get(problem.setting.lower(), "spec")
            raise SpecProblem(field, names.Reason.INVALID_URL, problem.reason) from None
        except errors.ConfigError as e:  # the settings as a whole do not fit (a Cluster URL with an untagged prefix)
            raise SpecProblem("spec", names.Reason.INVALID_SPEC, f"{e.setting}: {e.reason}") from None

    def listen_dsn(self) -> str:
        return (self.listen_database_url or self.database_url).get_secret_value()

    def endpoints(self) -> tuple[str, str]:
        """Where the source and the cache live, for status messages: host, port and database only."""
        return endpoint(self.database_url.get_secret_value()), endpoint(self.redis_url.get_secret_value())

    def _urls(self) -> tuple[pydantic.SecretStr | None, ...]:
        return (self.database_url, self.listen_database_url, self.redis_url)


#: The CRD's CEL bounds (crds/), as (lowest, highest, how to say it) in seconds.
RESYNC_INTERVAL_S = (10.0, 24 * 3600.0, "10s and 24h")
DEEP_INTERVAL_S = (60.0, 168 * 3600.0, "1m and 168h")
TTL_S = (60.0, 8760 * 3600.0, "1m and 8760h")


def parse(spec: Mapping[str, Any]) -> CacheSpec:
    """The typed spec, or a SpecProblem naming the first field that cannot be used."""
    source = _mapping(spec, "source", "spec.source")
    cache = _mapping(spec, "cache", "spec.cache")
    listen = source.get("listenDatabaseUrlSecretRef")
    return CacheSpec(
        database=_secret_ref(source.get("databaseUrlSecretRef"), "spec.source.databaseUrlSecretRef"),
        listen_database=(_secret_ref(listen, "spec.source.listenDatabaseUrlSecretRef") if listen is not None else None),
        redis=_secret_ref(cache.get("redisUrlSecretRef"), "spec.cache.redisUrlSecretRef"),
        key_prefix=_prefix(spec.get("keyPrefix", keys.DEFAULT_PREFIX)),
        resync_interval_s=_within(spec.get("resyncInterval", "5m"), "spec.resyncInterval", RESYNC_INTERVAL_S),
        ttl_s=_ttl(spec.get("ttl"), spec.get("resyncInterval", "5m")),
        deep_interval_s=_within(spec.get("deepInterval", "1h"), "spec.deepInterval", DEEP_INTERVAL_S),
        suspend=_flag(spec.get("suspend", False), "spec.suspend"),
        prune=_flag(spec.get("prune", True), "spec.prune"),
    )


def secret_value(ref: SecretKeyRef, namespace: str, data: Mapping[str, str]) -> pydantic.SecretStr:
    """The value under ``ref.key`` of a Secret's (base64) ``data``, as text with surrounding whitespace removed."""
    if ref.key not in data:
        raise SpecProblem(
            ref.field, names.Reason.SECRET_KEY_NOT_FOUND, f"Secret {namespace}/{ref.name} has no key {ref.key!r}"
        )
    try:
        return pydantic.SecretStr(base64.b64decode(data[ref.key], validate=True).decode().strip())
    except (binascii.Error, UnicodeDecodeError):
        raise SpecProblem(ref.field, names.Reason.INVALID_URL, f"{ref.describe(namespace)} is not UTF-8 text") from None


def parse_duration_s(text: object, field: str) -> float:
    """A Go-style duration of ms/s/m/h parts ("90s", "1h30m") in seconds."""
    if not isinstance(text, str) or not text or _DURATION.sub("", text):
        raise SpecProblem(field, names.Reason.INVALID_SPEC, "not a duration like 30s, 5m or 1h30m")
    seconds = sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION.findall(text))
    if seconds <= 0:
        raise SpecProblem(field, names.Reason.INVALID_SPEC, "must be longer than zero")
    return seconds


def endpoint(url: str) -> str:
    """``host:port/database`` of a URL (several hosts comma-separated); no scheme, user or password."""
    _, _, rest = url.partition("://")
    rest = rest.rpartition("@")[2]  # credentials end at the last "@", whatever the password holds
    netloc, slash, path = rest.partition("/")
    try:
        hosts = endpoints.split_netloc(netloc.split("?", 1)[0], default_port=0)[2]
    except ValueError:
        return "<unparseable url>"
    where = ",".join(f"{host}:{port}" if port else host for host, port in hosts) or "localhost"
    return f"{where}{slash}{path.split('?', 1)[0]}"


def _mapping(spec: Mapping[str, Any], key: str, field: str) -> Mapping[str, Any]:
    value = spec.get(key)
    if not isinstance(value, Mapping):
        raise SpecProblem(field, names.Reason.INVALID_SPEC, "required")
    return value


def _secret_ref(value: object, field: str) -> SecretKeyRef:
    if not isinstance(value, Mapping):
        raise SpecProblem(field, names.Reason.INVALID_SPEC, "required")
    name, key = value.get("name"), value.get("key")
    if not isinstance(name, str) or not name or not isinstance(key, str) or not key:
        raise SpecProblem(field, names.Reason.INVALID_SPEC, "needs a Secret name and key")
    return SecretKeyRef(name=name, key=key, field=field)


def _prefix(value: object) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise SpecProblem("spec.keyPrefix", names.Reason.INVALID_SPEC, "a non-empty string without spaces")
    return value


def _within(value: object, field: str, bounds: tuple[float, float, str]) -> float:
    """A duration within the CRD's CEL bounds, checked here too: API servers before 1.25 drop CEL rules, and an
    object stored before a rule existed was never checked (``resyncInterval: 1ms`` spun at 30% of a core)."""
    seconds = parse_duration_s(value, field)
    low, high, text = bounds
    if not low <= seconds <= high:
        raise SpecProblem(field, names.Reason.INVALID_SPEC, f"must be between {text}")
    return seconds


def _ttl(value: object, resync_interval: object) -> int | None:
    if value is None:
        return None
    seconds = _within(value, "spec.ttl", TTL_S)
    if seconds <= parse_duration_s(resync_interval, "spec.resyncInterval"):
        raise SpecProblem("spec.ttl", names.Reason.INVALID_SPEC, "must be longer than resyncInterval")
    return round(seconds)


def _flag(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise SpecProblem(field, names.Reason.INVALID_SPEC, "true or false")
    return value
