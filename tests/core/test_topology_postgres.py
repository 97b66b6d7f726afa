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

from modcache import db, endpoints, errors, keys, lineage, settings, watcher, wiring
from testkit import convergence, topologies
from testkit.observers import Recorder
from testkit.watching import upsert, watch_settings, watching


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[topologies.PostgresNode]:
    with topologies.postgres_pair(ssl=True, replica=False) as pair:
        yield pair.primary


@pytest.fixture(scope="module")
def plain_postgres() -> Iterator[topologies.PostgresNode]:
    with topologies.postgres_pair(replica=False) as pair:
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


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("sslmode=verify_ca", "sslmode=verify-ca in the URL is weaker than MODCACHE_DATABASE_SSL_MODE=verify-full"),
        ("sslmode=dis_able", "sslmode='dis_able' is not one of"),
        ("sslmode=VERIFY-FULL", "sslmode='VERIFY-FULL' is not one of"),
        ("sslmode=parse", "sslmode='parse' is not one of"),
    ],
)
def test_sslmode_is_judged_as_asyncpg_spells_it(query: str, reason: str) -> None:
    """attack-11c U4: asyncpg reads ``verify_ca`` as ``verify-ca`` (``SSLMode.parse``), but the check compared the
    raw text: ``?sslmode=verify_ca`` got past MODCACHE_DATABASE_SSL_MODE=verify-full, and the host name was not
    checked. Spellings are normalised the way asyncpg does before judging, and anything else is refused."""
    with pytest.raises(errors.ConfigError) as caught:
        settings.Settings.from_env(database_url=f"postgresql://u@h1:5432/db?{query}", database_ssl_mode="verify-full")
    assert reason in caught.value.reason
    url = "postgresql://u@h1/db?sslmode=verify_full"
    fine = settings.Settings.from_env(database_url=url, database_ssl_mode="verify-full")
    assert endpoints.url_query(wiring.database_dsn(fine))["sslmode"] == "verify_full"  # the URL's own, as strong


async def test_a_tls_file_setting_without_a_mode_means_verify_full_not_prefer(
    plain_postgres: topologies.PostgresNode, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """attack-11c U5: MODCACHE_DATABASE_SSL_ROOT_CERT_FILE set but no SSL_MODE left asyncpg's default, ``prefer``
    (or PGSSLMODE=disable): a sync ran in plaintext against a server without TLS. A TLS file setting alone now
    means verify-full: the server without TLS is refused."""
    monkeypatch.setenv("PGSSLMODE", "disable")
    ca = topologies.certificates(tmp_path).ca  # any CA: the server has no TLS at all
    for field in ("database_ssl_root_cert_file", "database_ssl_cert_file"):
        config = settings.Settings(**{"database_url": plain_postgres.url(), field: ca})  # type: ignore[arg-type]
        assert endpoints.url_query(wiring.database_dsn(config))["sslmode"] == "verify-full"
    config = settings.Settings(database_url=plain_postgres.url(), database_ssl_root_cert_file=ca)  # type: ignore[arg-type]
    source = wiring.make_source(config)
    try:
        with pytest.raises(errors.SourceUnavailable):
            await source.list_modules()
    finally:
        await source.close()


@pytest.mark.parametrize(
    "query",
    [
        "sslmode=",
        "sslmode=disable&sslmode=",
        "target_session_attrs=read-write&sslmode=",
        "sslmode=verify-full&sslmode=disable",
        "sslmode",
    ],
)
async def test_a_blank_or_repeated_sslmode_is_refused(
    plain_postgres: topologies.PostgresNode, monkeypatch: pytest.MonkeyPatch, query: str
) -> None:
    """attack-11b T2: a blank ``?sslmode=`` counted as "the URL sets it", so MODCACHE_DATABASE_SSL_MODE=verify-full
    was not added, and asyncpg, dropping the blank value, fell back to ``prefer``: the sync ran over plaintext to
    a server without TLS. Now a blank or repeated parameter is a ConfigError naming it, and the DSN modcache
    builds carries exactly the sslmode it checked."""
    monkeypatch.delenv("PGSSLMODE", raising=False)
    url = f"{plain_postgres.url()}?{query}"
    for field in ("database_url", "listen_database_url"):
        with pytest.raises(errors.ConfigError) as caught:
            settings.Settings.from_env(**{field: url}, database_ssl_mode="verify-full")
        assert caught.value.setting == f"MODCACHE_{field.upper()}"
        assert "'sslmode'" in caught.value.reason
    if query == "sslmode=":  # what was at stake: asyncpg drops the blank value and talks plaintext
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is False
        finally:
            await conn.close()
    plain = settings.Settings(database_url=plain_postgres.url(), database_ssl_mode="verify-full")  # type: ignore[arg-type]
    assert endpoints.url_query(wiring.database_dsn(plain)) == {"sslmode": "verify-full"}
    with pytest.raises(errors.ConfigError, match="'sslmode' has no value"):
        wiring.database_dsn(plain, f"{plain_postgres.url()}?sslmode=")


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
        # attack-11c U7: libpq's other form, the hosts in the query: after the refusal the other host is tried too
        ports = f"{fresh.primary.port},{fresh.replica.port}"
        query_form = f"postgresql://postgres@/postgres?host=127.0.0.1,127.0.0.1&port={ports}&target_session_attrs=read-write"
        in_query = settings.Settings(database_url=query_form, redis_url=redis_url, key_prefix=keyspace.prefix)  # type: ignore[arg-type]
        async with wiring.connect(in_query) as wired:
            await wired.engine.full_resync()
            assert await convergence.converged(truth, wired.cache.client, keyspace.prefix, within_s=5) == []
    assert status["source_timeline"] == "2"
    other = settings.Settings(database_url=database_url, redis_url=redis_url, key_prefix=keyspace.prefix)  # type: ignore[arg-type]
    async with wiring.connect(other) as wired:  # the shared server: another initdb, another system identifier
        with pytest.raises(lineage.StaleSource, match="another cluster"):
            await wired.engine.full_resync()
        assert json.loads(await wired.cache.read_module("ha/m0.py") or "{}")["content"] == "V = 'after'\n"


async def test_an_old_primary_promoted_again_onto_the_same_timeline_does_not_roll_the_cache_back(
    redis_url: str, keyspace: keys.KeySpace
) -> None:
    """attack-11b T3: the old primary, promoted again after the failover (a second failover manager, an operator
    promoting a stale node), moves from timeline 1 to a timeline 2 of its own: the same number as the true
    primary's. The check compared numbers only: it synced from the stale branch (pruning what was written on the
    true primary) and, once the stale node reached timeline 3, refused the true primary for good. Now a server
    whose WAL position is behind the one the cache was filled from is refused too, and a refused server never
    raises what is recorded."""
    with topologies.postgres_pair() as fresh:
        url = fresh.url()
        await db.upgrade(url)
        config = settings.Settings(database_url=url, redis_url=redis_url, key_prefix=keyspace.prefix)  # type: ignore[arg-type]
        stale = settings.Settings(database_url=fresh.primary.url(), redis_url=redis_url, key_prefix=keyspace.prefix)  # type: ignore[arg-type]
        truth = fresh.replica.url()
        await upsert(url, {"ha/a.py": "A = 1\n"})
        async with wiring.connect(config) as wired:
            await wired.engine.full_resync()  # timeline 1
        await asyncio.to_thread(fresh.primary.stop, "immediate")
        await asyncio.to_thread(fresh.replica.promote)
        await upsert(url, {f"ha/b{n}.py": f"B = {n}\n" for n in range(20)})  # the true primary carries on
        async with wiring.connect(config) as wired:
            await wired.engine.full_resync()  # timeline 2, on the promoted replica
        for timeline in (2, 3):
            await asyncio.to_thread(fresh.primary.promote_on_its_own)
            assert await _timeline(fresh.primary.url()) == timeline  # the attack's premise: 2 is the true one's too
            if timeline == 2:
                async with wiring.connect(stale) as wired:  # the stale branch alone: refused, nothing written
                    with pytest.raises(lineage.StaleSource, match=r"\(timeline 2\), behind .* already filled"):
                        await wired.engine.full_resync()
            async with wiring.connect(config) as wired:  # a restarted modcache, the stale node first in the URL
                await wired.engine.full_resync()
                assert await convergence.converged(truth, wired.cache.client, keyspace.prefix, within_s=5) == []
                assert await wired.cache.read_module("ha/b7.py") is not None  # not pruned by the stale branch
                status = await wired.cache.read_status()
            assert status["source_timeline"] == "2"  # timeline 3 behind the position: the true primary is read
            assert lineage.parse_lsn(status["source_lsn"]) > 0


async def test_a_failover_that_lost_the_last_transactions_is_still_followed(
    redis_url: str, keyspace: keys.KeySpace
) -> None:
    """The other side of the position check: the replica is promoted without the primary's last transactions
    (asynchronous replication; here it was down while they were written), so the new primary, on a newer
    timeline, starts behind the position the cache was filled at. No host of the URL is ahead of it: it is the
    truth now, and it is synced from (what was lost is pruned), not refused until its WAL catches up."""
    with topologies.postgres_pair() as fresh:
        url = fresh.url()
        await db.upgrade(url)
        config = settings.Settings(database_url=url, redis_url=redis_url, key_prefix=keyspace.prefix)  # type: ignore[arg-type]
        await upsert(url, {"ha/kept.py": "K = 1\n"})
        await _replayed(fresh)
        await asyncio.to_thread(fresh.replica.stop)
        await upsert(url, {f"ha/lost{n}.py": f"L = {n}\n" for n in range(50)})  # never reaches the replica
        async with wiring.connect(config) as wired:
            await wired.engine.full_resync()  # timeline 1, with the 50 modules the failover is about to lose
            recorded = lineage.parse_lsn((await wired.cache.read_status())["source_lsn"])
        await asyncio.to_thread(fresh.primary.stop, "immediate")
        await asyncio.to_thread(fresh.replica.start)
        await asyncio.to_thread(fresh.replica.promote)
        assert await _lsn(fresh.replica.url()) < recorded  # the premise: the new primary is behind
        async with wiring.connect(config) as wired:
            await wired.engine.full_resync()
            truth = fresh.replica.url()
            assert await convergence.converged(truth, wired.cache.client, keyspace.prefix, within_s=5) == []
            assert await wired.cache.read_module("ha/lost0.py") is None
            status = await wired.cache.read_status()
        assert status["source_timeline"] == "2"


async def test_the_consumer_s_own_resync_refuses_the_old_primary_and_keeps_the_record(
    redis_url: str, keyspace: keys.KeySpace
) -> None:
    """attack-11c U3: the consumer's full resync (the generation key is gone: eviction, a lossy failover) read the
    source through its own ``Database`` engine, with no lineage check: it synced from the old primary that came back
    writable (pruning what the true primary had written since) and wrote an empty lineage record, so the next
    restarted modcache took the old primary too. The consumer is built here as ``consumer._start_storage`` builds it;
    its engine now passes the same check, and the record is never lowered."""
    from modcache import engine, pgsource, rediscache
    from modcache_consumer import database, readiness

    with topologies.postgres_pair() as fresh:
        url = fresh.url()
        await db.upgrade(url)
        config = settings.Settings(database_url=url, redis_url=redis_url, key_prefix=keyspace.prefix)  # type: ignore[arg-type]
        await upsert(url, {"ha/a.py": "A = 1\n"})
        async with wiring.connect(config) as wired:
            await wired.engine.full_resync()  # timeline 1
        await asyncio.to_thread(fresh.primary.stop, "immediate")
        await asyncio.to_thread(fresh.replica.promote)
        await upsert(url, {"ha/b.py": "B = 1\n"})
        async with wiring.connect(config) as wired:
            await wired.engine.full_resync()  # timeline 2
            recorded = await wired.cache.read_status()
            await wired.cache.client.delete(keyspace.generation)  # the consumer will converge on its own
        await asyncio.to_thread(fresh.primary.start)  # the old primary is back, writable, first in the URL
        the_db = database.Database(url=wiring.database_dsn(config, url))
        await the_db.start()  # its first connection reaches the old primary, before the record is known
        client, close = wiring.make_redis(config)
        cache = rediscache.RedisCache(client=client, keyspace=config.keyspace(), ttl_s=None)
        source = pgsource.PgSource(engine=the_db.engine, max_module_bytes=config.max_module_bytes)
        guard = readiness.CacheGuard(engine=engine.Engine(source=source, cache=cache), cache=cache, database=the_db)
        try:
            await guard.converge()
            assert await cache.read_module("ha/b.py") is not None  # not pruned by the old primary's rows
            assert source.lineage is not None
            assert source.lineage.refusals >= 1
            await guard.repair(["ha/b.py"])  # a repair reads through the same check
            assert await cache.read_module("ha/b.py") is not None
            status = await cache.read_status()
            assert await convergence.converged(fresh.replica.url(), client, keyspace.prefix, within_s=5) == []
        finally:
            await guard.close()
            await close()
            await the_db.close()
    assert recorded["source_timeline"] == "2"
    assert (status["source_system"], status["source_timeline"]) == (recorded["source_system"], "2")
    assert lineage.parse_lsn(status["source_lsn"]) >= lineage.parse_lsn(recorded["source_lsn"])


async def test_a_resync_through_an_unchecked_engine_never_lowers_the_lineage_record(
    plain_postgres: topologies.PostgresNode, redis_url: str, keyspace: keys.KeySpace
) -> None:
    """A source whose engine was made elsewhere (no lineage) still syncs, but keeps the stored record: the next
    modcache is held to what the cache was filled from, not to nothing."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from modcache import engine, pgsource

    url = plain_postgres.url()
    await db.upgrade(url)
    config = settings.Settings(database_url=url, redis_url=redis_url, key_prefix=keyspace.prefix)  # type: ignore[arg-type]
    await upsert(url, {"ha/u.py": "U = 1\n"})
    async with wiring.connect(config) as wired:
        await wired.engine.full_resync()
        recorded = await wired.cache.read_status()
        raw = create_async_engine(settings.sqlalchemy_url(url))
        source = pgsource.PgSource(engine=raw)
        assert source.lineage is None
        try:
            await wired.cache.client.delete(keyspace.status)
            key = await wired.source.lineage_key()  # a higher bar a true modcache recorded: sealed
            assert key is not None
            lsn = lineage.parse_lsn(recorded["source_lsn"])
            seal = lineage.seal(key, keyspace.prefix, recorded["source_system"], 7, lsn)
            higher = recorded | {"source_timeline": "7", "last_success_at": "2000-01-01T00:00:00+00:00"}
            higher["source_seal"] = seal
            await wired.cache.write_status(higher)  # type: ignore[arg-type]
            await engine.Engine(source=source, cache=wired.cache).full_resync()
        finally:
            await raw.dispose()
        status = await wired.cache.read_status()
    assert recorded["source_system"] != ""
    assert (status["source_system"], status["source_timeline"]) == (recorded["source_system"], "7")


async def _replayed(pair: topologies.PostgresPair) -> None:
    """Until the replica has replayed everything the primary has written (an event the servers expose: poll)."""
    target = await _lsn(pair.primary.url())
    for _ in range(200):
        if await _lsn(pair.replica.url()) >= target:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the replica never caught up")


async def _lsn(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        sql = """SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END
                        - '0/0'::pg_lsn)::bigint"""
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def _timeline(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"), 16)
    finally:
        await conn.close()


async def test_a_tls_setting_asyncpg_cannot_use_is_named_for_what_it_is(
    plain_postgres: topologies.PostgresNode, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """attack-11c U9: asyncpg's ClientConfigurationError (verify-full with no root.crt to verify against) is a
    ValueError, and was reported as "asyncpg cannot read the URL: check its shape", sending the operator to the
    wrong thing. It is now a ConfigError carrying asyncpg's own message (it names files and modes, not secrets)."""
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.postgresql/root.crt
    monkeypatch.delenv("PGSSLROOTCERT", raising=False)
    with pytest.raises(errors.ConfigError) as caught:
        await lineage.connect(plain_postgres.url(sslmode="verify-full"), lineage=None)
    assert "asyncpg refuses the connection settings" in caught.value.reason
    assert "root.crt" in caught.value.reason
    assert "check its shape" not in caught.value.reason
