"""TLS (issue 11): a redis-server that speaks only TLS and requires client certificates, signed by a CA the test
makes; the watcher built by ``wiring`` from ``rediss://`` plus the ``MODCACHE_REDIS_SSL_*`` files converges and
follows changes (key events over TLS too). A client without the certificate, or trusting another CA, is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from modcache import errors, keys, settings, wiring
from testkit import convergence, topologies
from testkit.observers import Recorder
from testkit.watching import upsert, watch_settings, watching


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> topologies.Certificates:
    return topologies.certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_redis(certs: topologies.Certificates) -> Iterator[topologies.TlsRedis]:
    with topologies.tls_redis(certs, client_certificates="yes") as server:
        yield server


def tls_settings(server: topologies.TlsRedis, **fields: object) -> dict[str, object]:
    return {
        "redis_url": server.url,
        "redis_ssl_ca_file": server.certs.ca,
        "redis_ssl_cert_file": server.certs.client_cert,
        "redis_ssl_key_file": server.certs.client_key,
    } | fields


async def test_watch_mode_over_tls_with_a_client_certificate(tls_redis: topologies.TlsRedis, database_url: str) -> None:
    config = watch_settings(database_url=database_url, **tls_settings(tls_redis))
    recorder = Recorder()
    await upsert(database_url, {"tls/a.py": "A = 1\n"})
    async with watching(config, recorder) as (wired, _):
        client = wired.cache.client
        assert await convergence.converged(database_url, client, keys.DEFAULT_PREFIX, within_s=10) == []
        await upsert(database_url, {"tls/a.py": "A = 2\n", "tls/b.py": "B = 1\n"})
        assert await convergence.converged(database_url, client, keys.DEFAULT_PREFIX, within_s=10) == []
        await client.set(keys.DEFAULT_PREFIX + "tls/b.py", "forged")  # a key event, over TLS
        assert await convergence.converged(database_url, client, keys.DEFAULT_PREFIX, within_s=10) == []


@pytest.mark.parametrize(
    "change",
    [
        {"redis_ssl_cert_file": None, "redis_ssl_key_file": None},  # no client certificate
        {"redis_ssl_ca_file": "other-ca"},  # the server's certificate does not verify
    ],
    ids=["no-client-certificate", "untrusted-server"],
)
async def test_a_client_the_server_or_its_ca_does_not_accept_is_refused(
    tls_redis: topologies.TlsRedis, tmp_path: Path, change: dict[str, object]
) -> None:
    if change.get("redis_ssl_ca_file") == "other-ca":
        change = {"redis_ssl_ca_file": topologies.certificates(tmp_path).ca}
    config = settings.Settings(**tls_settings(tls_redis, **change))  # type: ignore[arg-type]
    cache = wiring.make_cache(config)
    try:
        with pytest.raises(errors.CacheUnavailable):
            await cache.ping()
    finally:
        await cache.close()


def test_tls_files_with_a_plain_url_are_a_config_error(certs: topologies.Certificates) -> None:
    with pytest.raises(errors.ConfigError, match="MODCACHE_REDIS_SSL_CA_FILE: set, but MODCACHE_REDIS_URL"):
        settings.Settings.from_env(redis_url="redis://127.0.0.1:6379/0", redis_ssl_ca_file=certs.ca)
    with pytest.raises(errors.ConfigError, match="MODCACHE_REDIS_SSL_KEY_FILE: the client certificate and its key"):
        settings.Settings.from_env(redis_url="rediss://127.0.0.1:6379/0", redis_ssl_cert_file=certs.client_cert)


def test_the_tls_settings_become_redis_py_options(certs: topologies.Certificates) -> None:
    config = settings.Settings(
        redis_url="rediss+sentinel://h:26379/cache",  # type: ignore[arg-type]
        redis_ssl_ca_file=certs.ca,
        redis_ssl_cert_reqs="none",
    )
    options = wiring.redis_tls_options(config)
    assert options == {"ssl_ca_certs": str(certs.ca), "ssl_cert_reqs": "none", "ssl_check_hostname": False}


@pytest.mark.parametrize(
    "query",
    ["ssl_cert_reqs=none", "ssl_cert_reqs=optional", "ssl_check_hostname=false", "ssl_ca_certs=/tmp/other.pem"],
)
async def test_a_url_parameter_that_turns_off_the_certificate_check_is_refused(
    tls_redis: topologies.TlsRedis, tmp_path: Path, query: str
) -> None:
    """The attack: the settings trust only the test's CA, the server presents a certificate of another CA (a
    man in the middle), and ``?ssl_cert_reqs=none`` in the URL, which redis-py lets override the settings, turned
    the check off silently: modcache talked to it. Now the contradiction is a ConfigError naming both."""
    other_ca = topologies.certificates(tmp_path).ca
    fields = tls_settings(tls_redis, redis_url=f"{tls_redis.url}?{query}", redis_ssl_ca_file=other_ca)
    with pytest.raises(errors.ConfigError) as caught:
        settings.Settings.from_env(**fields)
    assert caught.value.setting == "MODCACHE_REDIS_URL"
    assert f"?{query.split('=')[0]}" in caught.value.reason
    assert "MODCACHE_REDIS_SSL_" in caught.value.reason
    if query == "ssl_cert_reqs=none":  # what it was refused for: redis-py lets the URL win, and the MITM is reached
        client = aioredis.Redis.from_url(
            f"{tls_redis.url}?{query}",
            **wiring.redis_tls_options(settings.Settings(**tls_settings(tls_redis, redis_ssl_ca_file=other_ca))),  # type: ignore[arg-type]
        )
        try:
            assert await client.ping()
        finally:
            await client.aclose()


@pytest.mark.parametrize(
    "query",
    [
        "ssl_cert_reqs=none&ssl_cert_reqs=required",  # redis-py reads the first, the check read the last
        "ssl_cert_reqs=none&ssl_cert_reqs=",  # redis-py drops the blank one
        "ssl_check_hostname=false&ssl_check_hostname=true",
        "ssl_cert_reqs=none&ssl_cert_reqs",
        "ssl_cert_reqs=",
        "db=1&db=2",
    ],
)
async def test_a_repeated_or_blank_url_parameter_is_refused(
    tls_redis: topologies.TlsRedis, tmp_path: Path, query: str
) -> None:
    """attack-11b T1: a second or a blank ``ssl_cert_reqs`` made the check read ``required`` while redis-py read
    ``none``: the sync talked to a server whose certificate the configured CA did not sign. Now a repeated or
    blank parameter is a ConfigError naming it (and never the URL)."""
    other_ca = topologies.certificates(tmp_path).ca
    url = f"{tls_redis.url}?{query}"
    with pytest.raises(errors.ConfigError) as caught:
        settings.Settings.from_env(**tls_settings(tls_redis, redis_url=url, redis_ssl_ca_file=other_ca))
    assert caught.value.setting == "MODCACHE_REDIS_URL"
    assert repr(query.split("=")[0]) in caught.value.reason
    assert ("twice" if query.count(query.split("=")[0]) > 1 else "no value") in caught.value.reason
    if query.startswith("ssl_cert_reqs=none&"):  # what it was refused for: redis-py reads none, the MITM is reached
        options = wiring.redis_tls_options(settings.Settings(**tls_settings(tls_redis, redis_ssl_ca_file=other_ca)))  # type: ignore[arg-type]
        client = aioredis.Redis.from_url(url, **options)
        try:
            assert await client.ping()
        finally:
            await client.aclose()


@pytest.mark.parametrize(
    ("query", "refused"),
    [
        ("ssl_min_version=769", True),  # TLS 1.0
        ("ssl_min_version=770", True),
        ("ssl_ciphers=ALL:COMPLEMENTOFALL", True),  # NULL and anonymous suites
        ("ssl_ciphers=DEFAULT%3A%40SECLEVEL%3D0", True),
        ("ssl_min_version=771", False),
        ("ssl_min_version=772&ssl_ciphers=ECDHE%2BAESGCM", False),
    ],
)
def test_an_old_tls_version_or_weak_ciphers_in_the_url_are_refused_beside_the_settings(
    tls_redis: topologies.TlsRedis, query: str, refused: bool
) -> None:
    """attack-11c U8: ``?ssl_min_version=769&ssl_ciphers=ALL:COMPLEMENTOFALL`` (TLS 1.0, NULL/anonymous suites) was
    taken silently beside MODCACHE_REDIS_SSL_CA_FILE. Now it is a contradiction, refused; with no TLS setting it is
    taken with a warning, as the other weakening parameters are."""
    url = f"{tls_redis.url}?{query}"
    if refused:
        with pytest.raises(errors.ConfigError) as caught:
            settings.Settings.from_env(**tls_settings(tls_redis, redis_url=url))
        assert f"?{query.split('=')[0]}" in caught.value.reason
        assert "MODCACHE_REDIS_SSL_" in caught.value.reason
        assert settings.Settings.from_env(redis_url=url).tls_relaxed_by_url() != []  # alone: warned about
    else:
        assert settings.Settings.from_env(**tls_settings(tls_redis, redis_url=url)).tls_relaxed_by_url() == []


def test_a_url_parameter_that_says_what_the_settings_say_is_no_contradiction(tls_redis: topologies.TlsRedis) -> None:
    url = f"{tls_redis.url}?ssl_cert_reqs=none&ssl_check_hostname=false"
    config = settings.Settings.from_env(redis_url=url, redis_ssl_cert_reqs="none")  # the chart's certReqs: none
    assert config.tls_relaxed_by_url() == []


async def test_a_url_that_alone_turns_off_the_certificate_check_is_warned_about_once(
    tls_redis: topologies.TlsRedis, caplog: pytest.LogCaptureFixture
) -> None:
    wiring._warn_once.cache_clear()  # once per process: this test's own process-wide state, reset
    config = settings.Settings(redis_url=f"{tls_redis.url}?ssl_cert_reqs=none")  # type: ignore[arg-type]
    for _ in range(2):
        await wiring.make_cache(config).close()
    warned = [r.getMessage() for r in caplog.records if "TLS is weakened" in r.getMessage()]
    assert warned == [
        "TLS is weakened by a URL parameter: MODCACHE_REDIS_URL: ?ssl_cert_reqs=none in the URL: the server's "
        "certificate is not verified"
    ]
