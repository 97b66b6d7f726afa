"""PostgreSQL topologies (issue 11), on private clusters of the test's own (``testkit.topologies.postgres_pair``):

* TLS: ``ssl = on``, and modcache connecting with ``sslmode=verify-full`` against the test's CA and with a client
  certificate, on both paths (the SQLAlchemy engine of ``PgSource``, the bare asyncpg listener);
* failover: a primary and a streaming replica behind one multi-host URL with ``target_session_attrs=read-write``;
  the primary dies, the replica is promoted, the listener reconnects to it by itself, a full resync runs, the
  watcher's state says which server it reached, and a change committed on the new primary reaches the cache.

Redis is the shared server, under a prefix of the test's own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from modcache import db, errors, keys, lineage, settings, watcher, wiring
from testkit import convergence, topologies
from testkit.observers import Recorder
from testkit.watching import upsert, watch_settings, watching


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[topologies.PostgresNode]:
    with topologies.postgres_pair(ssl=True, replica=False) as pair:
        yield pair.primary


@pytest.fixture(scope="module")
def pair() -> Iterator[topologies.PostgresPair]:
    with topologies.postgres_pair() as nodes:
        yield nodes


def verify_full(node: topologies.PostgresNode, **fields: object) -> dict[str, object]:
    certs = node.data / "certs"
    return {
        "database_url": node.url(),
        "database_ssl_mode": "verify-full",
        "database_ssl_root_cert_file": certs / "ca.crt",
        "database_ssl_cert_file": certs / "client.crt",
        "database_ssl_key_file": certs / "client.key",
    } | fields


@pytest.fixture
async def tls_source(tls_postgres: topologies.PostgresNode) -> AsyncIterator[settings.Settings]:
    config = settings.Settings(**verify_full(tls_postgres))  # type: ignore[arg-type]
    await db.upgrade(wiring.database_dsn(config))  # Alembic's engine is built the same way
    yield config
    conn = await asyncpg.connect(wiring.database_dsn(config))
    try:
        await conn.execute("TRUNCATE workspace_files")
    finally:
        await conn.close()


async def test_verify_full_with_a_client_certificate_on_both_drivers(
    tls_postgres: topologies.PostgresNode, tls_source: settings.Settings, redis_url: str, keyspace: keys.KeySpace
) -> None:
    dsn = wiring.database_dsn(tls_source)
    assert "sslmode=verify-full" in dsn
    config = watch_settings(**verify_full(tls_postgres), redis_url=redis_url, key_prefix=keyspace.prefix)
    recorder = Recorder()
    await upsert(dsn, {"tls/a.py": "A = 1\n"})
    async with watching(config, recorder) as (wired, _):
        client = wired.cache.client
        assert await convergence.converged(dsn, client, keyspace.prefix, within_s=10) == []
        await upsert(dsn, {"tls/a.py": "A = 2\n"})  # reaches the cache through the listener's NOTIFY
        assert await convergence.converged(dsn, client, keyspace.prefix, within_s=10) == []
        conn = await asyncpg.connect(dsn)
        try:
            sessions = await conn.fetch(
                "SELECT a.application_name, s.ssl, s.client_dn FROM pg_stat_ssl s JOIN pg_stat_activity a "
                "USING (pid) WHERE a.application_name LIKE 'modcache%'"
            )
        finally:
            await conn.close()
    by_name = {row["application_name"]: (row["ssl"], row["client_dn"]) for row in sessions}
    assert by_name["modcache-listener"] == (True, "/CN=modcache")  # asyncpg, directly
    assert by_name["modcache-test"] == (True, "/CN=modcache")  # SQLAlchemy's pool (PgSource)


async def test_a_server_certificate_from_another_ca_is_refused(
    tls_postgres: topologies.PostgresNode, tmp_path: Path
) -> None:
    other = topologies.certificates(tmp_path)
    config = settings.Settings(**verify_full(tls_postgres, database_ssl_root_cert_file=other.ca))  # type: ignore[arg-type]
    source = wiring.make_source(config)
    try:
        with pytest.raises(errors.SourceUnavailable):
            await source.list_modules()
    finally:
        await source.close()


def test_the_url_s_own_stricter_ssl_parameters_win_over_the_settings() -> None:
    config = settings.Settings(
        database_url="postgresql://u@h1:5432,h2:5433/db?sslmode=verify-full",  # type: ignore[arg-type]
        database_ssl_mode="require",
        database_ssl_root_cert_file=Path("/etc/ca.crt"),
    )
    assert wiring.database_dsn(config) == (
        "postgresql://u@h1:5432,h2:5433/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.crt"
    )


@pytest.mark.parametrize(
    ("query", "fields", "named"),
    [
        ("sslmode=disable", {"database_ssl_mode": "verify-full"}, "MODCACHE_DATABASE_SSL_MODE=verify-full"),
        ("sslmode=require", {"database_ssl_mode": "verify-full"}, "MODCACHE_DATABASE_SSL_MODE=verify-full"),
        ("sslmode=prefer", {"database_ssl_root_cert_file": "/etc/ca.crt"}, "MODCACHE_DATABASE_SSL_ROOT_CERT_FILE"),
        ("sslmode=allow", {"database_ssl_cert_file": "/c", "database_ssl_key_file": "/k"}, "MODCACHE_DATABASE_SSL_"),
        ("sslrootcert=/tmp/mine.crt", {"database_ssl_root_cert_file": "/etc/ca.crt"}, "DATABASE_SSL_ROOT_CERT_FILE"),
    ],
)
def test_a_url_parameter_that_weakens_the_tls_settings_is_refused(
    query: str, fields: dict[str, str], named: str
) -> None:
    for field in ("database_url", "listen_database_url"):
        with pytest.raises(errors.ConfigError) as caught:
            settings.Settings.from_env(**{field: f"postgresql://u@h1:5432/db?{query}"}, **fields)
        assert caught.value.setting == f"MODCACHE_{field.upper()}"
        assert query.split("=")[0] in caught.value.reason
        assert named in caught.value.reason


async def test_an_unverified_plaintext_fallback_by_url_alone_is_warned_about_once(
    tls_postgres: topologies.PostgresNode, caplog: pytest.LogCaptureFixture
) -> None:
    """The attack: ``sslmode=disable`` beside ``verify-full`` settings connected in plaintext, silently (the
    server accepts both). Now refused; the URL alone (no TLS settings) may, with one warning."""
    with pytest.raises(errors.ConfigError, match="sslmode=disable in the URL is weaker than"):
        settings.Settings.from_env(**verify_full(tls_postgres, database_url=tls_postgres.url(sslmode="disable")))
    wiring._warn_once.cache_clear()  # once per process: this test's own process-wide state, reset
    config = settings.Settings(database_url=tls_postgres.url(sslmode="disable"))  # type: ignore[arg-type]
    for _ in range(2):
        source = wiring.make_source(config)
        await source.close()
    conn = await asyncpg.connect(wiring.database_dsn(config))
    try:
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is False  # plaintext
    finally:
        await conn.close()
    warned = [r.getMessage() for r in caplog.records if "TLS is weakened" in r.getMessage()]
    assert warned == [
        "TLS is weakened by a URL parameter: MODCACHE_DATABASE_URL: sslmode=disable in the URL: the "
        "connection may be unencrypted"
    ]


async def test_after_a_promote_the_listener_follows_and_a_change_reaches_the_cache(
    pair: topologies.PostgresPair, redis_url: str, keyspace: keys.KeySpace
) -> None:
    url = pair.url()
    await db.upgrade(url)  # through the multi-host URL: it reaches the primary
    config = watch_settings(database_url=url, redis_url=redis_url, key_prefix=keyspace.prefix)
    recorder = Recorder()
    await upsert(url, {f"ha/m{n}.py": f"V = {n}\n" for n in range(10)})
    async with watching(config, recorder) as (wired, w):
        client = wired.cache.client
        assert await convergence.converged(url, client, keyspace.prefix, within_s=10) == []
        assert w.state.listener_server == f"127.0.0.1:{pair.primary.port}"
        resyncs = recorder.full_syncs(watcher.RECONNECT)
        await asyncio.to_thread(pair.primary.stop, "immediate")
        await asyncio.to_thread(pair.replica.promote)
        await upsert(url, {"ha/m0.py": "V = 'on the new primary'\n", "ha/new.py": "NEW = 1\n"})
        assert await convergence.converged(url, client, keyspace.prefix, within_s=15) == []
        await recorder.wait_for(lambda: recorder.full_syncs(watcher.RECONNECT) > resyncs, 15)
    assert w.state.listener_server == f"127.0.0.1:{pair.replica.port}"
    assert w.state.listener_server_changes == 1


async def test_an_old_primary_that_comes_back_does_not_roll_the_cache_back(
    redis_url: str, keyspace: keys.KeySpace, database_url: str
) -> None:
    """The attack: after a failover the old primary comes back writable (split brain, a stale node), first in the
    multi-host URL, so every new connection reaches it; a restarted modcache would sync its older rows and roll the
    cache back. The cache's status records the cluster and the timeline it was filled from: the old primary is on
    an older timeline and is refused, the promoted one is read instead; another cluster is refused outright."""
    with topologies.postgres_pair() as fresh:
        url = fresh.url()
        await db.upgrade(url)
        config = settings.Settings(database_url=url, redis_url=redis_url, key_prefix=keyspace.prefix)  # type: ignore[arg-type]
        await upsert(url, {"ha/m0.py": "V = 'before'\n"})
        async with wiring.connect(config) as wired:
            await wired.engine.full_resync()  # filled from the primary, timeline 1
        await asyncio.to_thread(fresh.primary.stop, "immediate")
        await asyncio.to_thread(fresh.replica.promote)
        await upsert(url, {"ha/m0.py": "V = 'after'\n", "ha/new.py": "NEW = 1\n"})
        async with wiring.connect(config) as wired:
            await wired.engine.full_resync()  # from the promoted replica, timeline 2
        await asyncio.to_thread(fresh.primary.start)  # the old primary is back, writable, with the old rows
        async with wiring.connect(config) as wired:  # a restarted modcache: nothing in memory
            await wired.engine.full_resync()
            truth = fresh.replica.url()  # the judge reads the promoted primary itself (the URL reaches the stale one)
            assert await convergence.converged(truth, wired.cache.client, keyspace.prefix, within_s=5) == []
            assert wired.source.lineage is not None
            assert wired.source.lineage.refusals >= 1
            assert await wired.cache.read_module("ha/new.py") is not None  # not pruned by the old primary's rows
            status = await wired.cache.read_status()
        stale = settings.Settings(database_url=fresh.primary.url(), redis_url=redis_url, key_prefix=keyspace.prefix)  # type: ignore[arg-type]
        async with wiring.connect(stale) as wired:  # the old primary alone: nothing else to read from
            with pytest.raises(lineage.StaleSource, match=r"timeline 1, older than timeline 2") as caught:
                await wired.engine.full_resync()
        assert f"127.0.0.1:{fresh.primary.port}" in str(caught.value)
    assert status["source_timeline"] == "2"
    other = settings.Settings(database_url=database_url, redis_url=redis_url, key_prefix=keyspace.prefix)  # type: ignore[arg-type]
    async with wiring.connect(other) as wired:  # the shared server: another initdb, another system identifier
        with pytest.raises(lineage.StaleSource, match="another cluster"):
            await wired.engine.full_resync()
        assert json.loads(await wired.cache.read_module("ha/m0.py") or "{}")["content"] == "V = 'after'\n"
