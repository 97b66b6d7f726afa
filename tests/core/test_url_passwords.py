"""Passwords written into a URL without percent-encoding (attack-11b T4, T5): never a traceback, never a part of
the password in an error, a log line or the status.

A ``#`` in the password cut the URL short for asyncpg and urllib, which then took the part before it for the port:
``ValueError: invalid literal for int() with base 10: 'Hunter2'`` (an uncaught traceback on ``sync``, ``status``,
``db upgrade``) and ``bad setting MODCACHE_REDIS_URL: Port could not be cast to integer value as 'Hunter2'``. Now
the URL is checked before any driver sees it: a user or password holding an unencoded ``/``, ``?``, ``#`` or ``@``
is a ConfigError saying to percent-encode it; every other password works.
"""

from __future__ import annotations

import logging
import urllib.parse

import pytest
import redis.asyncio as aioredis

from modcache import errors, keys, settings
from testkit import cli

SECRET = "S3cretPart"
AMBIGUOUS = [  # the delimiter after the secret, or before it: either part may be taken for a port or a host
    f"{SECRET}#x", f"x#{SECRET}", f"{SECRET}?x", f"x?{SECRET}", f"{SECRET}/x", f"12/{SECRET}", f"{SECRET}@x",
    f"x@{SECRET}", f"{SECRET}#", f"#{SECRET}", f"{SECRET}?sslmode=disable#",
]  # fmt: skip
PLAIN = [SECRET, f"{SECRET} x", f"{SECRET}%zz", f"%{SECRET}", f"a:{SECRET}", f"{SECRET}!$&'()*+,;=", f"{SECRET}:"]


def _forms(password: str) -> dict[str, str]:
    return {
        "database_url": f"postgresql://app:{password}@127.0.0.1:5432/bifrost",
        "listen_database_url": f"postgresql://app:{password}@127.0.0.1:5432,127.0.0.1:5433/bifrost",
        "redis_url": f"redis://:{password}@127.0.0.1:6379/4",
    } | {
        f"redis_url {scheme}": f"{scheme}://:{password}@127.0.0.1:26379/{'cache' if 'sentinel' in scheme else '0'}"
        for scheme in ("rediss", "redis+sentinel", "rediss+cluster")
    }


def _texts(e: BaseException) -> str:
    """What a traceback or a log of ``e`` shows (a suppressed context is not shown)."""
    shown = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return f"{e} {e!r} {errors.describe(e)} {shown!r}"


@pytest.mark.parametrize("password", AMBIGUOUS)
def test_an_unencoded_delimiter_in_a_password_is_a_config_error_that_names_no_part_of_it(password: str) -> None:
    for field, url in _forms(password).items():
        with pytest.raises(errors.ConfigError) as caught:
            settings.Settings.from_env(**{field.split()[0]: url, "key_prefix": "{t}:module:"})
        assert caught.value.setting == f"MODCACHE_{field.split()[0].upper()}", url
        assert "percent-encode" in caught.value.reason, (url, caught.value.reason)
        assert SECRET not in _texts(caught.value), url


@pytest.mark.parametrize("password", PLAIN + [urllib.parse.quote(p, safe="") for p in AMBIGUOUS])
def test_any_other_password_is_read_whole_and_never_shown(password: str) -> None:
    for field, url in _forms(password).items():
        config = settings.Settings.from_env(**{field.split()[0]: url, "key_prefix": "{t}:module:"})
        assert SECRET not in repr(config) + errors.redact_url(url), url
        endpoint = config.redis_endpoint()
        if endpoint is not None:
            assert endpoint.password == urllib.parse.unquote(password), url
            assert SECRET not in endpoint.describe() + repr(endpoint), url


@pytest.mark.parametrize("command", [["sync", "--once"], ["status"], ["db", "upgrade"], ["-vv", "sync", "--once"]])
@pytest.mark.parametrize("password", [f"Hunter2#{SECRET}", f"{SECRET}#x", f"{SECRET}?x", f"{SECRET}/x"])
async def test_the_cli_says_what_is_wrong_and_never_shows_the_password(
    command: list[str],
    password: str,
    database_url: str,
    redis_url: str,
    keyspace: keys.KeySpace,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The attack's own commands, against real servers (trust auth: a password is accepted whatever it is)."""
    caplog.set_level(logging.DEBUG)
    host = database_url.split("@", 1)[1]
    with_password = f"postgresql://postgres:{password}@{host}"
    for env in (
        cli.service_env(with_password, redis_url, keyspace),
        cli.service_env(database_url, f"redis://:{password}@{redis_url.split('://', 1)[1]}", keyspace),
    ):
        result = await cli.invoke(*command, env=env)
        assert result.code == 2, result.output
        assert "percent-encode" in result.err, result.output
        assert SECRET not in result.output + caplog.text
        assert "Hunter2" not in result.output + caplog.text
        assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "query",
    [
        f"password={SECRET}",
        f"sslmode=require&sslpassword={SECRET}",
        f"target_session_attrs=read-write&password={SECRET}&sslmode=require",
        f"pass%77ord={SECRET}",  # percent-encoded name: the drivers decode it
        f"PASSWORD={SECRET}#frag",
        f"sentinel_password={SECRET}",
    ],
)
def test_a_password_in_the_query_is_redacted(query: str) -> None:
    """attack-11b T6: ``modcache db upgrade`` printed ``migrated postgresql://postgres@.../postgres?password=...``."""
    for url in (f"postgresql://postgres@127.0.0.1:5432/db?{query}", f"redis://u:pw@127.0.0.1:6379/0?{query}"):
        redacted = errors.redact_url(url)
        assert SECRET not in redacted, redacted
        assert "127.0.0.1" in redacted, redacted
        assert "=***" in redacted, redacted
    assert errors.redact_url("postgresql://u@h/db?passfile=/p&sslmode=require") == (
        "postgresql://u@h/db?passfile=/p&sslmode=require"  # a path, not a secret
    )


async def test_db_upgrade_does_not_print_a_password_given_in_the_query(
    database_url: str, redis_url: str, keyspace: keys.KeySpace
) -> None:
    result = await cli.invoke(
        "db", "upgrade", env=cli.service_env(f"{database_url}?password={SECRET}", redis_url, keyspace)
    )
    assert result.code == 0, result.output
    assert "migrated" in result.out
    assert "password=***" in result.out
    assert SECRET not in result.output


@pytest.mark.parametrize("password", [f"{SECRET} x", f"{SECRET}%zz", urllib.parse.quote(f"{SECRET}#/?@x", safe="")])
async def test_a_working_password_shows_nowhere(
    password: str, database_url: str, redis_url: str, keyspace: keys.KeySpace, caplog: pytest.LogCaptureFixture
) -> None:
    """Accepted shapes, against the real servers: not in the output, the log or the status hash."""
    caplog.set_level(logging.DEBUG)
    env = cli.service_env(f"postgresql://postgres:{password}@{database_url.split('@', 1)[1]}", redis_url, keyspace)
    outputs = [await cli.invoke(*command, env=env) for command in (["-vv", "sync", "--once"], ["status"])]
    assert [r.code for r in outputs] == [0, 0], [r.output for r in outputs]
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        status = await client.hgetall(keyspace.status)
    finally:
        await client.aclose()
    assert status
    assert SECRET not in "".join(r.output for r in outputs) + caplog.text + repr(status)


@pytest.mark.parametrize(
    "url", [f"redis://:{SECRET}/0", f"rediss://:{SECRET}", f"redis://u:{SECRET}/0", f"postgresql://u:{SECRET}/db"]
)
def test_a_url_missing_its_at_sign_does_not_show_the_password_as_a_port(url: str) -> None:
    """attack-11b T5: urllib's ``Port could not be cast to integer value as '...'`` quoted the password."""
    field = "redis_url" if url.startswith("redis") else "database_url"
    with pytest.raises(errors.ConfigError) as caught:
        settings.Settings.from_env(**{field: url})
    assert "port" in caught.value.reason
    assert SECRET not in _texts(caught.value)
