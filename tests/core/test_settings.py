"""Settings: read from ``MODCACHE_*``, overridden by flags, units in names, and errors that name the setting
without echoing its value (URLs hold passwords)."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from modcache import errors, settings
from modcache.cli import runtime

SECRET = "hunter2-Secret"


def test_environment_is_read_and_flags_win(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODCACHE_DATABASE_URL", "postgresql://env@db/env")
    monkeypatch.setenv("MODCACHE_KEY_PREFIX", "env:module:")
    monkeypatch.setenv("MODCACHE_RESYNC_INTERVAL_S", "42.5")
    monkeypatch.setenv("MODCACHE_STATE_DIR", str(tmp_path))
    config = settings.Settings.from_env(key_prefix="flag:module:", redis_url=None)
    assert config.database_url is not None
    assert config.database_url.get_secret_value() == "postgresql://env@db/env"
    assert config.key_prefix == "flag:module:"  # the flag
    assert config.redis_url is None  # a flag left out (None) does not erase anything
    assert config.resync_interval_s == 42.5
    assert config.state_dir == tmp_path
    assert config.keyspace().index == "flag:module:index"


def test_defaults_match_the_bifrost_layout_and_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in settings.Settings.model_fields:
        monkeypatch.delenv(f"MODCACHE_{name.upper()}", raising=False)
    config = settings.Settings.from_env()
    assert config.key_prefix == "bifrost:module:"
    assert config.max_module_bytes == 8 * 1024 * 1024
    assert config.ttl_s is None  # no TTL unless asked for
    assert (config.database_url, config.redis_url) == (None, None)


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("MODCACHE_DATABASE_URL", f"mysql://app:{SECRET}@db/x", "URL scheme must be one of"),
        ("MODCACHE_DATABASE_URL", f"postgresql://app:{SECRET}@db:port/x", "the port of 'db' must be a number"),
        ("MODCACHE_LISTEN_DATABASE_URL", f"redis://app:{SECRET}@db/x", "URL scheme must be one of"),
        ("MODCACHE_REDIS_URL", f"http://app:{SECRET}@cache/0", "URL scheme must be one of"),
        ("MODCACHE_RESYNC_INTERVAL_S", "-1", "greater than 0"),
        ("MODCACHE_RESYNC_JITTER_RATIO", "2", "less than or equal to 1"),
        ("MODCACHE_TTL_S", f"{SECRET}", "valid integer"),
        ("MODCACHE_MAX_MODULE_BYTES", "0", "greater than 0"),
        ("MODCACHE_KEY_PREFIX", "", "at least 1 character"),
    ],
)
def test_a_bad_value_names_its_variable_and_hides_the_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, reason: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(errors.ConfigError) as caught:
        settings.Settings.from_env()
    assert caught.value.setting == variable
    assert reason in caught.value.reason
    assert SECRET not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_bad_flag_is_named_as_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODCACHE_DATABASE_URL", raising=False)
    with pytest.raises(errors.ConfigError) as caught:
        runtime.load_settings(database_url=f"sqlite:///{SECRET}")
    assert caught.value.setting == "--database-url (MODCACHE_DATABASE_URL)"
    assert SECRET not in str(caught.value)


def test_a_bad_variable_is_named_as_the_variable_even_when_other_flags_are_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODCACHE_TTL_S", "soon")
    with pytest.raises(errors.ConfigError) as caught:
        runtime.load_settings(key_prefix="p:", database_url=None)
    assert caught.value.setting == "MODCACHE_TTL_S"


def test_urls_never_show_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODCACHE_DATABASE_URL", f"postgresql://app:{SECRET}@db/x")
    monkeypatch.setenv("MODCACHE_REDIS_URL", f"redis://:{SECRET}@cache/0")
    config = settings.Settings.from_env()
    assert SECRET not in repr(config)
    assert SECRET not in str(config.model_dump())


def test_every_numeric_setting_carries_its_unit_in_its_name() -> None:
    units = ("_s", "_ms", "_bytes", "_ratio", "_size")
    for name, field in settings.Settings.model_fields.items():
        numeric = any(t in str(field.annotation) for t in ("int", "float"))
        assert not numeric or name.endswith(units), f"{name} has no unit suffix"
        assert field.description, f"{name} has no one-line reason"


@pytest.mark.parametrize(
    ("url", "dsn", "sqlalchemy"),
    [
        ("postgresql://u@h/db", "postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgres://u@h/db", "postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql+asyncpg://u@h/db", "postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
    ],
)
def test_postgres_urls_convert_for_each_driver(url: str, dsn: str, sqlalchemy: str) -> None:
    assert settings.asyncpg_dsn(url) == dsn
    assert settings.sqlalchemy_url(url) == sqlalchemy


def test_the_demo_points_settings_at_its_embedded_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODCACHE_DATABASE_URL", raising=False)
    monkeypatch.setenv("MODCACHE_REDIS_URL", "redis://configured:6379/0")
    config = runtime.with_urls(settings.Settings.from_env(), {"postgres": "postgresql://postgres@127.0.0.1:5999/x"})
    assert isinstance(config.database_url, pydantic.SecretStr)
    assert config.database_url.get_secret_value() == "postgresql://postgres@127.0.0.1:5999/x"
    assert config.redis_url is not None
    assert config.redis_url.get_secret_value() == "redis://configured:6379/0"  # configured: left alone


def test_the_readme_documents_every_setting() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = {line.split("|")[1].strip(" `") for line in readme.splitlines() if line.startswith("| `MODCACHE_")}
    assert table == {f"MODCACHE_{name.upper()}" for name in settings.Settings.model_fields}
