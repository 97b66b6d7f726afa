"""The spec as typed values; Secret values into core settings without ever echoing a secret."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from modcache_operator import names, spec

SPEC: dict[str, Any] = {
    "source": {"databaseUrlSecretRef": {"name": "db", "key": "url"}},
    "cache": {"redisUrlSecretRef": {"name": "redis", "key": "url"}},
}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("1.5h", 5400), ("250ms", 0.25), ("2m30s", 150)],
)
def test_durations(text: str, seconds: float) -> None:
    assert spec.parse_duration_s(text, "spec.resyncInterval") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5 m", "five minutes", "5d", "0s", "-5m", 5])
def test_bad_durations_name_the_field(text: object) -> None:
    with pytest.raises(spec.SpecProblem) as caught:
        spec.parse_duration_s(text, "spec.resyncInterval")
    assert caught.value.condition_reason is names.Reason.INVALID_SPEC
    assert str(caught.value).startswith("spec.resyncInterval: ")


def test_defaults() -> None:
    parsed = spec.parse(SPEC)
    assert parsed.key_prefix == "bifrost:module:"
    assert parsed.resync_interval_s == 300
    assert parsed.deep_interval_s == 3600
    assert parsed.ttl_s is None
    assert (parsed.suspend, parsed.prune) == (False, True)
    assert parsed.listen_database is None
    assert {ref.name for ref in parsed.secret_refs()} == {"db", "redis"}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"source": None}, "spec.source"),
        ({"cache": {"redisUrlSecretRef": {"name": "r"}}}, "spec.cache.redisUrlSecretRef"),
        ({"keyPrefix": "a b"}, "spec.keyPrefix"),
        ({"ttl": "soon"}, "spec.ttl"),
        # the CRD's CEL bounds, enforced again where CEL is not (API servers before 1.25, objects stored before)
        ({"resyncInterval": "1ms"}, "spec.resyncInterval"),
        ({"resyncInterval": "9s"}, "spec.resyncInterval"),
        ({"resyncInterval": "25h"}, "spec.resyncInterval"),
        ({"ttl": "30s"}, "spec.ttl"),
        ({"ttl": "9000h"}, "spec.ttl"),
        ({"resyncInterval": "2h", "ttl": "1h"}, "spec.ttl"),
        ({"suspend": "yes"}, "spec.suspend"),
        ({"deepInterval": "30s"}, "spec.deepInterval"),
        ({"deepInterval": "200h"}, "spec.deepInterval"),
    ],
)
def test_unusable_specs_name_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(spec.SpecProblem) as caught:
        spec.parse(SPEC | changes)
    assert caught.value.setting == field


def _resolved(database: str, redis: str, listen: str | None = None) -> spec.Resolved:
    return spec.Resolved(
        spec=spec.parse(SPEC | {"ttl": "1h"}),
        database_url=pydantic.SecretStr(database),
        listen_database_url=pydantic.SecretStr(listen) if listen else None,
        redis_url=pydantic.SecretStr(redis),
    )


def test_settings_take_every_value_from_the_cr() -> None:
    resolved = _resolved("postgresql://u:pw@db:5432/app", "redis://:pw@cache:6379/2", "postgresql://u:pw@direct/app")
    settings = resolved.settings()
    assert settings.ttl_s == 3600
    assert settings.deep_interval_s == 3600
    assert settings.key_prefix == "bifrost:module:"
    assert resolved.listen_dsn() == "postgresql://u:pw@direct/app"
    assert resolved.endpoints() == ("db:5432/app", "cache:6379/2")


@pytest.mark.parametrize(
    ("database", "redis", "field"),
    [
        ("mysql://u:hunter2@db/app", "redis://cache", "spec.source.databaseUrlSecretRef"),
        ("postgresql://u:hunter2@db/app", "http://:hunter2@cache", "spec.cache.redisUrlSecretRef"),
        ("postgresql://u:hunter2@db:99999999/app", "redis://cache", "spec.source.databaseUrlSecretRef"),
    ],
)
def test_bad_urls_name_the_ref_never_the_secret(database: str, redis: str, field: str) -> None:
    with pytest.raises(spec.SpecProblem) as caught:
        _resolved(database, redis).settings()
    assert caught.value.condition_reason is names.Reason.INVALID_URL
    assert caught.value.setting == field
    assert "hunter2" not in str(caught.value)


def test_fingerprint_follows_spec_and_secret_values_but_not_suspend() -> None:
    base = _resolved("postgresql://db/app", "redis://cache/0")
    rotated = _resolved("postgresql://db/app", "redis://cache/1")
    suspended = spec.Resolved(
        spec=spec.parse(SPEC | {"ttl": "1h", "suspend": True}),
        database_url=base.database_url,
        listen_database_url=None,
        redis_url=base.redis_url,
    )
    assert base.fingerprint() != rotated.fingerprint()
    assert base.fingerprint() == suspended.fingerprint()
    assert "cache" not in base.fingerprint()
