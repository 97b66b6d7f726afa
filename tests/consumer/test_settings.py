"""Consumer settings from MODCACHE_* variables: units in names, bad values named without echoing them."""

from __future__ import annotations

import re
from pathlib import Path

import pydantic
import pytest

from modcache import errors
from modcache import settings as core
from modcache_consumer import settings


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("MODCACHE_CONSUMER_CONCURRENCY", "0", "Input should be greater than 0"),
        ("MODCACHE_EXECUTION_TIMEOUT_S", "soon", "Input should be a valid number, unable to parse string as a number"),
        ("MODCACHE_AMQP_URL", "http://user:hunter2@broker/", "URL scheme must be one of amqp, amqps"),
        ("MODCACHE_SECRETS_KEY", "hunter2", "not a Fernet key (32 url-safe base64-encoded bytes)"),
        ("MODCACHE_WORKER_MEMORY_LIMIT_BYTES", "1000", "Input should be greater than or equal to 67108864"),
    ],
)
def test_a_bad_variable_is_named_and_its_value_never_shown(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, reason: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(errors.ConfigError) as caught:
        settings.ConsumerSettings.from_env()
    assert str(caught.value) == f"{variable}: {reason}"
    assert "hunter2" not in str(caught.value)


def test_derived_values_follow_concurrency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODCACHE_CONSUMER_CONCURRENCY", "6")
    s = settings.ConsumerSettings.from_env()
    assert (s.pool_size, s.queue_name, s.executor_socket) == (7, "workflow-executions", None)


def test_a_missing_url_is_a_config_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODCACHE_AMQP_URL", raising=False)
    reason = r"^MODCACHE_AMQP_URL: required by the consumer \(or MODCACHE_AMQP_URL_FILE\)$"
    with pytest.raises(errors.ConfigError, match=reason):
        settings.ConsumerSettings.from_env().required("amqp_url")


def test_docs_list_every_consumer_setting() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "consumer.md").read_text()
    documented = set(re.findall(r"^\| `(MODCACHE_\w+)` \|", doc, flags=re.MULTILINE))
    own = {
        f"MODCACHE_{n.upper()}" for n in settings.ConsumerSettings.model_fields if n not in core.Settings.model_fields
    }
    assert documented == own


def test_the_consumer_reads_every_secret_from_a_file_too(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    values = {
        "database_url": "postgresql://app:hunter2@db/app",
        "listen_database_url": "postgresql://app:hunter2@db-direct/app",
        "redis_url": "redis://:hunter2@cache/0",
        "redis_sentinel_password": "hunter2",
        "amqp_url": "amqp://app:hunter2@broker/",
        "secrets_key": "jXf5t0ZAmBKtAMlY0n0C4bqOpTq8bQ2kz9f8sJfQy3A=",
    }
    assert core.secret_fields(settings.ConsumerSettings) == list(values)
    for name, value in values.items():
        monkeypatch.delenv(f"MODCACHE_{name.upper()}", raising=False)
        (tmp_path / name).write_text(value + "\n")
        monkeypatch.setenv(f"MODCACHE_{name.upper()}_FILE", str(tmp_path / name))
    s = settings.ConsumerSettings.from_env()
    assert {name: getattr(s, name).get_secret_value() for name in values} == values
    assert s.encryption_keys() == [values["secrets_key"]]


def test_a_bad_secret_file_names_the_file_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MODCACHE_SECRETS_KEY", raising=False)
    (tmp_path / "key").write_text("hunter2")
    monkeypatch.setenv("MODCACHE_SECRETS_KEY_FILE", str(tmp_path / "key"))
    with pytest.raises(errors.ConfigError) as caught:
        settings.ConsumerSettings.from_env()
    assert str(caught.value) == "MODCACHE_SECRETS_KEY_FILE: not a Fernet key (32 url-safe base64-encoded bytes)"


def test_a_lease_ttl_postgresql_cannot_represent_is_refused_at_start() -> None:
    """MODCACHE_LEASE_TTL_S=1e13 started, then poisoned every message ('timestamp out of range', attack-10b N5)."""
    with pytest.raises(pydantic.ValidationError, match="lease_ttl_s"):
        settings.ConsumerSettings(lease_ttl_s=1e13)
