"""Passwords that break URL parsers must still never reach a status message, an event or a log line.

A password written into a Secret without percent-encoding may hold ``/``, ``?``, ``#`` or ``@``. ``urlsplit``
then ends the authority early and finds no password at all, while asyncpg (last ``@`` wins) connects anyway and
puts the user, host and database into its errors: the attack was a status condition reading
``app:12/S3cretPart@127.0.0.1:5432/db: PostgreSQL unreachable``.
"""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from modcache import errors
from modcache_operator import metrics, reporter, spec, statuswriter

SECRET = "S3cretPart"
PASSWORDS = [f"12/{SECRET}", f"x?{SECRET}", f"x#{SECRET}", f"x@{SECRET}", f"%2F{SECRET}", f"a:{SECRET}", SECRET]


class Body:
    def __init__(self) -> None:
        self.metadata: dict[str, Any] = {"generation": 1}
        self.spec: dict[str, Any] = {}
        self.status: dict[str, Any] = {}


def _urls(password: str) -> list[str]:
    return [
        f"postgresql://app:{password}@db.example:5432/bifrost",
        f"redis://:{password}@cache.example:6379/0",
        f"rediss://worker:{password}@cache.example:6380/2",
    ]


@pytest.mark.parametrize("password", PASSWORDS)
def test_redacted_urls_and_endpoints_hold_no_part_of_the_password(password: str) -> None:
    for url in _urls(password):
        assert SECRET not in errors.redact_url(url), url
        assert SECRET not in spec.endpoint(url), url
    assert spec.endpoint(_urls(password)[0]) == "db.example:5432/bifrost"


@pytest.mark.parametrize("password", PASSWORDS)
def test_the_reporter_scrubs_a_library_message_that_quotes_the_url_or_the_password(password: str) -> None:
    outlets = statuswriter.Outlets(api=None, metrics=metrics.Metrics(), post_event=lambda _: None)  # type: ignore[arg-type]
    the_reporter = reporter.Reporter(namespace="ns", name="main", body=Body(), outlets=outlets)
    database, redis_url = _urls(password)[0], _urls(password)[1]
    parsed = spec.parse(
        {
            "source": {"databaseUrlSecretRef": {"name": "db", "key": "url"}},
            "cache": {"redisUrlSecretRef": {"name": "redis", "key": "url"}},
        }
    )
    the_reporter.watching(1, spec.Resolved(parsed, pydantic.SecretStr(database), None, pydantic.SecretStr(redis_url)))
    decoded = password.replace("%2F", "/")
    messages = [
        f"connection to {database} failed",
        f"invalid DSN: {redis_url}",
        f'password authentication failed for user "app" (password {password!r})',
        f"AUTH failed: {decoded}",
    ]
    for message in messages:
        assert SECRET not in the_reporter.scrub(message), message
