"""Consumer settings from MODCACHE_* variables: units in names, bad values named without echoing them."""

from __future__ import annotations

import re
from pathlib import Path

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
    with pytest.raises(errors.ConfigError, match=r"^MODCACHE_AMQP_URL: required by the consumer$"):
        settings.ConsumerSettings.from_env().required("amqp_url")


def test_docs_list_every_consumer_setting() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "consumer.md").read_text()
    documented = set(re.findall(r"^\| `(MODCACHE_\w+)` \|", doc, flags=re.MULTILINE))
    own = {
        f"MODCACHE_{n.upper()}" for n in settings.ConsumerSettings.model_fields if n not in core.Settings.model_fields
    }
    assert documented == own
