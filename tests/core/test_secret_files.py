"""Secret settings from files (``MODCACHE_<NAME>_FILE``, the Kubernetes Secret-volume convention): every secret
field can be read from one, both set is an error, and every bad file is one line naming the ``_FILE`` variable
and never the content."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modcache import errors, settings

SECRET = "hunter2-Secret"
VALUES = {
    "database_url": f"postgresql://app:{SECRET}@db:5432/app",
    "listen_database_url": f"postgresql://listen:{SECRET}@db-direct:5432/app",
    "redis_url": f"redis://:{SECRET}@cache:6379/0",
    "redis_sentinel_password": SECRET,
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith(settings.ENV_PREFIX):
            monkeypatch.delenv(name)


def test_the_secret_fields_are_the_urls_and_the_sentinel_password() -> None:
    assert settings.secret_fields(settings.Settings) == list(VALUES)


@pytest.mark.parametrize("field", list(VALUES))
def test_each_secret_setting_is_read_from_its_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, field: str) -> None:
    path = tmp_path / field
    path.write_text(VALUES[field] + "\n")  # `echo` and most editors end the file with a newline
    monkeypatch.setenv(f"MODCACHE_{field.upper()}_FILE", str(path))
    value = getattr(settings.Settings.from_env(), field)
    assert value.get_secret_value() == VALUES[field]


def test_a_flag_still_wins_over_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "url").write_text(VALUES["redis_url"])
    monkeypatch.setenv("MODCACHE_REDIS_URL_FILE", str(tmp_path / "url"))
    config = settings.Settings.from_env(redis_url="redis://flag:6379/1")
    assert config.redis_url is not None
    assert config.redis_url.get_secret_value() == "redis://flag:6379/1"


def test_setting_both_the_variable_and_its_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "url").write_text(VALUES["database_url"])
    monkeypatch.setenv("MODCACHE_DATABASE_URL", VALUES["database_url"])
    monkeypatch.setenv("MODCACHE_DATABASE_URL_FILE", str(tmp_path / "url"))
    with pytest.raises(errors.ConfigError) as caught:
        settings.Settings.from_env()
    assert str(caught.value) == ("MODCACHE_DATABASE_URL_FILE: MODCACHE_DATABASE_URL is set too; set only one of them")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "cannot read the file (No such file or directory)"),
        (b"", "the file is empty"),
        (b" \n\n", "the file is empty"),
        (b"\xff" + SECRET.encode(), "the file is not UTF-8 text"),
        (SECRET.encode() * 10_000, f"the file is larger than {settings.MAX_SECRET_FILE_BYTES} bytes"),
        (f"mysql://app:{SECRET}@db/x".encode(), "URL scheme must be one of postgresql, postgres, postgresql+asyncpg"),
    ],
    ids=["missing", "empty", "blank", "not UTF-8", "too large", "a bad value inside"],
)
def test_a_bad_file_is_one_line_naming_the_file_variable_never_the_content(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: bytes | None, reason: str
) -> None:
    path = tmp_path / "database-url"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setenv("MODCACHE_DATABASE_URL_FILE", str(path))
    with pytest.raises(errors.ConfigError) as caught:
        settings.Settings.from_env()
    assert str(caught.value) == f"MODCACHE_DATABASE_URL_FILE: {reason}"
    assert SECRET not in str(caught.value)


def test_a_directory_is_not_a_secret_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODCACHE_REDIS_URL_FILE", str(tmp_path))
    with pytest.raises(errors.ConfigError, match=r"^MODCACHE_REDIS_URL_FILE: cannot read the file \(Is a directory\)$"):
        settings.Settings.from_env()
