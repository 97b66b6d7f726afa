"""Fixtures for the core: a running watcher and an observer that tests can await."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from modcache import engine, settings, watcher
from testkit.observers import Recorder, running


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def watch_settings(database_url: str, redis_url: str) -> settings.Settings:
    return settings.Settings(
        database_url=database_url,  # type: ignore[arg-type]
        redis_url=redis_url,  # type: ignore[arg-type]
        resync_interval_s=3600,
        listener_backoff_max_s=0.5,
        listener_keepalive_s=1.0,
    )


@pytest.fixture
async def live_watcher(
    sync_engine: engine.Engine,
    watch_settings: settings.Settings,
    database_url: str,
    redis_client: aioredis.Redis,
    recorder: Recorder,
) -> AsyncIterator[watcher.Watcher]:
    """A watcher running on the test's database and key prefix, after its first full resync."""
    w = watcher.Watcher(
        engine=sync_engine,
        settings=watch_settings,
        listen_dsn=database_url,
        redis_client=redis_client,
        observer=recorder,
    )
    async with running(w):
        await recorder.wait_for(lambda: recorder.full_syncs() and w.state.keyspace_active)
        yield w
