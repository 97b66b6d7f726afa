"""Cache readiness on the hot path: an O(1) check per message, and repairs that never run twice at once.

The original plan's ``_sync_module_cache`` listed every module with content and checked each key, on every message:
O(modules) work and PostgreSQL traffic per execution (bifrost-contract.md, defect 2). Here an execution trusts
the converged cache (the operator's watcher keeps it so) and checks only its markers, in one round trip:

* the generation key exists (a flushed or lost cache has none) and the status hash exists (some full sync
  completed): then the generation is handed to the worker, which pins its module view to it;
* otherwise the cache is converged once, here, by a full resync through the core engine (single-flight: a
  burst of messages waits for one sync).

A module the worker finds missing anyway (a key expired or was evicted with no operator running) is repaired
by ``repair``: ``Engine.apply_paths`` re-reads the rows, single-flight per path, so twenty executions importing
the same expired module cause one repair. For a package path (``a/__init__.py``) the repair also writes one
live module under ``a/`` if there is one, so a directory the cache never saw becomes a namespace package.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

import redis.asyncio.cluster as aiocluster
import redis.exceptions
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from modcache import engine, errors, keys, modules, plan, rediscache
from modcache_consumer import database

log = logging.getLogger(__name__)

T = TypeVar("T")
#: A repair on an execution's import path gives up after this (its import then fails as "cache unavailable").
REPAIR_TIMEOUT_S = 10.0


class Observer(Protocol):
    """What this module reports (``metrics.Metrics`` implements it)."""

    def on_repair(self, kind: str, count: int) -> None: ...


class Unobserved:
    def on_repair(self, kind: str, count: int) -> None: ...


SAMPLE_SQL = """
SELECT w.path FROM unnest(CAST(:dirs AS text[])) AS d(dir)
CROSS JOIN LATERAL (
    SELECT path FROM workspace_files
    WHERE entity_type = 'module' AND NOT is_deleted AND starts_with(path, d.dir || '/') LIMIT 1
) AS w
"""


#: KEYS: the generation, the status, then any keys read along (``check_with``). Returns {the generation or false,
#: whether the status exists, server clock seconds, microseconds, then each other key's value or false}: one command
#: per message instead of a pipeline of four or more (half the client's CPU). Not on a Cluster, where the keys read
#: along live in other slots than the markers: a pipeline there.
MARKERS = """
local t = redis.call('TIME')
local out = {redis.call('GET', KEYS[1]) or false, redis.call('EXISTS', KEYS[2]), t[1], t[2]}
for i = 3, #KEYS do out[#out + 1] = redis.call('GET', KEYS[i]) or false end
return out
"""


class CacheGuard:
    def __init__(
        self,
        *,
        engine: engine.Engine,
        cache: rediscache.RedisCache,
        database: database.Database | None = None,
        observer: Observer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._cache = cache
        self._database = database
        self._observer = observer or Unobserved()
        self._clock = clock
        self._converging: asyncio.Task[plan.Report] | None = None
        self._completed = 0  # full syncs finished
        self._repairs: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        client = cache.client
        self._script = None if isinstance(client, aiocluster.RedisCluster) else client.register_script(MARKERS)

    async def check(self) -> int:
        """The generation this execution pins; converges the cache first if it was lost or never synced."""
        generation, _ = await self.check_with(())
        return generation

    async def check_with(self, also: Sequence[str]) -> tuple[int, list[Any]]:
        """``check``, reading the keys ``also`` in the same round trip (the execution's config and organization
        entries: one Redis round trip per message, not two); their values as Redis returned them."""
        completed = self._completed
        generation, synced, values = await self._markers(also)
        if generation is None or not synced:
            if self._completed == completed:  # else a sync finished since we looked: just look again
                state = "has no generation (new or flushed)" if generation is None else "was never fully synced"
                log.warning("the module cache %s; converging it before running", state)
                await self.converge()
            generation, _, values = await self._markers(also)
        if generation is None:
            raise errors.CacheUnavailable("the module cache has no generation even after a full sync")
        return generation, values

    async def converge(self) -> plan.Report:
        """One full resync at a time; concurrent callers share it."""
        if self._converging is None or self._converging.done():
            self._converging = self._track(asyncio.create_task(self._full_resync()))
        return await asyncio.shield(self._converging)

    async def repair(self, paths: Iterable[str]) -> None:
        """Converge ``paths`` from the source now; a path already being repaired is waited for, not redone."""
        wanted = sorted({p for p in paths if modules.path_problem(p) is None})
        fresh = [p for p in wanted if p not in self._repairs]
        if fresh:
            task = self._track(asyncio.create_task(self._apply(fresh)))
            for path in fresh:
                self._repairs[path] = task
            task.add_done_callback(lambda t: self._forget(fresh, t))
        pending = {self._repairs[p] for p in wanted if p in self._repairs}
        if pending:
            await asyncio.shield(asyncio.gather(*pending))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- internals ------------------------------------------------------------------------------------------

    async def _markers(self, also: Sequence[str] = ()) -> tuple[int | None, bool, list[Any]]:
        ks = self._cache.keyspace
        try:
            if self._script is not None:
                generation, synced, seconds, micros, *values = await self._script(
                    keys=[ks.generation, ks.status, *also]
                )
            else:
                async with self._cache.client.pipeline(transaction=False) as pipe:
                    pipe.get(ks.generation)
                    pipe.exists(ks.status)
                    pipe.time()
                    for key in also:
                        pipe.get(key)
                    generation, synced, (seconds, micros), *values = await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as e:
            raise errors.CacheUnavailable(f"Redis failed: {errors.describe(e)}") from e
        if keys.generation_problem(generation, clock_us=int(seconds) * 1_000_000 + int(micros)) is not None:
            return None, bool(synced), values  # missing or not believable (another writer's garbage): converge first
        return keys.parse_generation(generation), bool(synced), values

    async def _full_resync(self) -> plan.Report:
        report = await self._engine.full_resync()  # writes the one sync-status record (keys.SyncStatus)
        self._completed += 1
        log.info("module cache converged by the consumer: %s", report.plan.describe())
        self._observer.on_repair("full", 1)
        return report

    async def _apply(self, paths: list[str]) -> None:
        """Bounded (attack-10b N8: after a terminated backend, ``apply_paths`` once never returned, and every
        execution waiting for that path hung with it, its lease renewed): the waiters get CacheUnavailable."""
        try:
            async with asyncio.timeout(REPAIR_TIMEOUT_S):
                report = await self._engine.apply_paths([*paths, *await self._samples_under(paths)])
        except TimeoutError:
            log.warning("a hot-path repair of %d path(s) took over %g s; given up", len(paths), REPAIR_TIMEOUT_S)
            raise errors.CacheUnavailable(f"the repair took over {REPAIR_TIMEOUT_S:g} s") from None
        if report.repaired:
            log.info("repaired %d module(s) on the hot path: %s", report.repaired, report.plan.describe())
            self._observer.on_repair("path", report.repaired)

    async def _samples_under(self, paths: list[str]) -> list[str]:
        """One live module under each requested package's directory (makes unseen namespace dirs visible)."""
        dirs = [p.removesuffix("/__init__.py") for p in paths if p.endswith("/__init__.py")]
        if not dirs or self._database is None:
            return []

        async def sample(db: AsyncSession) -> list[str]:
            return list((await db.execute(sa.text(SAMPLE_SQL), {"dirs": dirs})).scalars())

        return await self._database.run(sample)

    def _forget(self, paths: list[str], task: asyncio.Task[None]) -> None:
        for path in paths:
            if self._repairs.get(path) is task:
                del self._repairs[path]

    def _track(self, task: asyncio.Task[T]) -> asyncio.Task[T]:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve)
        return task


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a shared task's failure as seen: its waiters got it; nobody else should be warned."""
    if not task.cancelled():
        task.exception()
