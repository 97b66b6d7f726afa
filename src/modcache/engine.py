"""The convergence engine: observe both sides, plan with the pure core, apply through the cache adapter.

* ``full_resync`` lists the source without content, reads the cache's bookkeeping and verifies content keys in
  a few scripted round trips, plans, then reads content only for what must be written, in batches, while the
  previous batch is being written.
* ``apply_paths`` does the same for a handful of paths (NOTIFY hints, keyspace events, a worker's miss): the
  rows are re-read, so a hint is never taken as data.

Both read the cache generation before the source and hand it to ``RedisCache.apply`` as a fence, so a change
committed while a sync runs is never overwritten by the sync's older read. Items fenced out are re-checked
with fresh reads (``MAX_ROUNDS``), so the cache still converges to the latest commit.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from modcache import modules, pgsource, plan, rediscache

log = logging.getLogger(__name__)

MAX_ROUNDS = 5
FETCH_AHEAD = 2  # content batches read ahead of the one being written

Progress = Callable[[int, int], None]
_Fetched = tuple[dict[str, pgsource.Module], list[modules.Rejected]]


@dataclasses.dataclass
class _Outcome:
    applied: list[plan.Item] = dataclasses.field(default_factory=list)
    conflicted: list[plan.Item] = dataclasses.field(default_factory=list)
    rejected: list[modules.Rejected] = dataclasses.field(default_factory=list)
    vanished: int = 0

    def absorb(self, other: _Outcome) -> None:
        self.applied += other.applied
        self.conflicted += other.conflicted
        self.rejected += other.rejected
        self.vanished += other.vanished


@dataclasses.dataclass(frozen=True)
class _Observation:
    """Both sides as observed, the source digest, and the paths the cache does not already serve exactly
    (every other live path has a verified content key, manifest entry and index entry for its hash)."""

    fence: int
    source: plan.SourceView
    view: plan.CacheView
    digest: str
    unsettled: set[str]

    def narrowed(self) -> tuple[plan.SourceView, plan.CacheView]:
        """Both views restricted to the unsettled paths: the same plan as the full views, found in a fraction of
        the time (a settled path yields no item and, being live, is never an orphan)."""
        paths, live, view = self.unsettled, self.source.live, self.view
        return (
            plan.SourceView(live={p: live[p] for p in paths if p in live}, rejected=self.source.rejected),
            plan.CacheView(
                index=frozenset(p for p in paths if p in view.index),
                manifest={p: view.manifest[p] for p in paths if p in view.manifest},
                content={p: view.content[p] for p in paths if p in view.content},
            ),
        )


class _Settling:
    """Finds, page by page while Redis is still verifying the rest, the manifest paths that are not settled
    (their verified content hash is not the live source hash, or the index lacks them), and counts how many
    manifest entries are live and indexed, so that in the common case no 100,000-path set operation is needed."""

    def __init__(
        self,
        listing: asyncio.Task[tuple[plan.SourceView, str]],
        indexing: asyncio.Task[frozenset[str]],
    ) -> None:
        self._listing = listing
        self._indexing = indexing
        self._backlog: list[Mapping[str, str | None]] = []
        self.unsettled: set[str] = set()
        self.unverified: set[str] = set()  # present, but not with the manifest's hash
        self.entries = 0  # manifest entries seen (HSCAN may repeat one: then the counts below are not exact)
        self.live = 0  # ... of which are live modules
        self.indexed = 0  # ... of which are in the index

    def page(self, verified: Mapping[str, str | None]) -> None:
        self.unverified.update(p for p, h in verified.items() if h == plan.UNVERIFIED)
        self._backlog.append(verified)
        if all(t.done() and not t.cancelled() and t.exception() is None for t in (self._listing, self._indexing)):
            self.drain()

    def drain(self) -> None:
        (source, _), index = self._listing.result(), self._indexing.result()
        live = source.live
        for verified in self._backlog:
            self.entries += len(verified)
            if verified.items() <= live.items() and verified.keys() <= index:  # all settled: C-level checks
                self.live += len(verified)
                self.indexed += len(verified)
                continue
            self.unsettled.update(p for p, h in verified.items() if not h or live.get(p) != h or p not in index)
            self.live += len(verified.keys() & live.keys())
            self.indexed += len(verified.keys() & index)
        self._backlog.clear()


class Engine:
    def __init__(
        self,
        *,
        source: pgsource.PgSource,
        cache: rediscache.RedisCache,
        fetch_batch_size: int = 1000,
        prune: bool = True,
        monotonic: Callable[[], float] = time.perf_counter,
        wall_clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self.source = source
        self.cache = cache
        self.fetch_batch_size = fetch_batch_size
        self.prune = prune  # False: content keys of paths that are no longer live modules are left in place
        self._monotonic = monotonic
        self._wall_clock = wall_clock

    # -- full resync ---------------------------------------------------------------------------------------

    async def observe(self, *, deep: bool = False) -> tuple[int, plan.SourceView, plan.CacheView]:
        """The fence, the source listing and the matching cache view (read after the fence, in parallel).

        Content keys the manifest names are verified against its hashes server-side (no key is sent); then only
        index-only (and, when ``deep``, unindexed) keys and live paths not yet confirmed are checked by path."""
        observed = await self._observe(deep=deep)
        return observed.fence, observed.source, observed.view

    async def _observe(self, *, deep: bool, dry_run: bool = False) -> _Observation:
        """``observe``, plus what the full resync needs to plan quickly (see ``_Observation``)."""
        fence = await self.cache.generation(create=not dry_run)
        listing = asyncio.create_task(self._list_source())
        indexing = asyncio.create_task(self.cache.read_index())
        settling = _Settling(listing, indexing)
        try:
            manifest, content = await self.cache.verify_manifest(on_page=settling.page)  # Redis works, we list
            source, digest = await listing
            index = await indexing
        finally:
            listing.cancel()
            indexing.cancel()
        settling.drain()
        exact = settling.entries == len(manifest)
        unknown = set() if exact and settling.indexed == len(index) else set(index - manifest.keys())
        if deep:
            unknown |= await self.cache.scan_paths() - manifest.keys()
        content.update(await self.cache.check(dict.fromkeys(unknown, "")))
        unlisted = set() if exact and settling.live == len(source.live) else source.live.keys() - manifest.keys()
        doubtful = settling.unverified | {p for p in unknown if content[p] == plan.UNVERIFIED}
        content.update(await self.cache.check({p: source.live[p] for p in unlisted | doubtful if p in source.live}))
        unsettled = settling.unsettled | unlisted | unknown
        view = plan.CacheView(index=index, manifest=manifest, content=content)
        return _Observation(fence, source, view, digest, unsettled)

    async def _list_source(self) -> tuple[plan.SourceView, str]:
        source = await self.source.list_modules()
        return source, plan.source_digest(source.live)

    async def full_resync(
        self, *, dry_run: bool = False, deep: bool = False, progress: Progress | None = None
    ) -> plan.Report:
        started = self._monotonic()
        observed = await self._observe(deep=deep, dry_run=dry_run)
        fence, source, cache_view, digest = observed.fence, observed.source, observed.view, observed.digest
        the_plan = self._compute(*observed.narrowed())
        outcome = _Outcome()
        if not dry_run:
            outcome = await self._execute(the_plan, fence=fence, progress=progress)
            await self._settle(outcome)
            await self.cache.refresh_ttl(source.live)
        report = self._report(the_plan, outcome, source, cache_view, started, dry_run=dry_run, digest=digest)
        if not dry_run:
            await self.cache.write_status(await self._status_fields(report))
        return report

    async def _status_fields(self, report: plan.Report) -> dict[str, str]:
        """The sync-status record (``keys.KeySpace.status``): what the consumer and ``modcache status`` read."""
        return {
            "last_success_at": self._wall_clock().isoformat(timespec="seconds"),
            "generation": str(await self.cache.generation()),
            "source_modules": str(report.source_count),
            "cached_modules": str(report.cached_count),
            "source_digest": report.digest,
            "last_drift": json.dumps({r.value: n for r, n in report.plan.counts().items()}),
            "rejected": str(len(report.plan.rejected)),
            "duration_s": f"{report.duration_s:.4f}",
        }

    # -- incremental -----------------------------------------------------------------------------------------

    async def apply_paths(self, paths: Iterable[str], *, dry_run: bool = False) -> plan.Report:
        """Converge just ``paths`` (re-reading their rows); other cached paths are not looked at."""
        started = self._monotonic()
        wanted = sorted(set(paths))
        the_plan, outcome, source, view = await self._converge_paths(wanted, dry_run=dry_run)
        if not dry_run:
            await self._settle(outcome)
        return self._report(the_plan, outcome, source, view, started, dry_run=dry_run, digest=None)

    async def _converge_paths(
        self, paths: Sequence[str], *, dry_run: bool
    ) -> tuple[plan.Plan, _Outcome, plan.SourceView, plan.CacheView]:
        fence = await self.cache.generation(create=not dry_run)
        found, rejected = await self.source.fetch(paths)
        source = plan.SourceView(live={p: m.hash for p, m in found.items()}, rejected=tuple(rejected))
        manifest = await self.cache.read_manifest(paths)
        index = await self.cache.read_index_members(paths)
        content = await self.cache.check({p: source.live.get(p, "") for p in paths})
        view = plan.CacheView(index=index, manifest=manifest, content=content)
        the_plan = self._compute(source, view)
        outcome = _Outcome(rejected=list(rejected))
        if the_plan and not dry_run:
            outcome.absorb(await self._apply(_writes(the_plan.items, found), fence=fence))
        return the_plan, outcome, source, view

    def _compute(self, source: plan.SourceView, view: plan.CacheView) -> plan.Plan:
        the_plan = plan.compute(source, view)
        return the_plan if self.prune else plan.without_orphans(the_plan)

    async def _settle(self, outcome: _Outcome) -> None:
        """Re-check fenced-out items with fresh reads until none conflict (bounded)."""
        pending = outcome.conflicted
        for _ in range(MAX_ROUNDS):
            if not pending:
                return
            log.debug("re-checking %d paths a concurrent writer changed", len(pending))
            _, again, _, _ = await self._converge_paths(sorted({i.path for i in pending}), dry_run=False)
            outcome.applied += again.applied
            outcome.vanished += again.vanished
            pending = again.conflicted
        if pending:
            log.warning(
                "%d paths still contended after %d rounds; the next sync re-checks them", len(pending), MAX_ROUNDS
            )

    # -- applying a plan -----------------------------------------------------------------------------------

    async def _execute(self, the_plan: plan.Plan, *, fence: int, progress: Progress | None) -> _Outcome:
        outcome = _Outcome()
        total, done = len(the_plan.items), 0
        batches = iter(list(_chunks(the_plan.by_operation(plan.Operation.PUT), self.fetch_batch_size)))
        ahead: collections.deque[tuple[Sequence[plan.Item], asyncio.Task[_Fetched]]] = collections.deque()

        def read_ahead() -> None:  # keep FETCH_AHEAD content reads in flight while we encode and write
            while len(ahead) < FETCH_AHEAD and (batch := next(batches, None)) is not None:
                ahead.append((batch, asyncio.create_task(self.source.fetch([i.path for i in batch]))))

        try:
            read_ahead()  # content reads start before the light writes go out
            light = [i for i in the_plan.items if i.operation is not plan.Operation.PUT]
            for batch in _chunks(light, self.fetch_batch_size):
                outcome.absorb(await self._apply([rediscache.Write(i) for i in batch], fence=fence))
                done += len(batch)
                _report_progress(progress, done, total)
            while ahead:
                batch, fetching = ahead.popleft()
                found, rejected = await fetching
                read_ahead()
                outcome.rejected += rejected
                writes = _writes(batch, found)
                outcome.vanished += len(batch) - len(writes) - len(rejected)
                outcome.absorb(await self._apply(writes, fence=fence))
                done += len(batch)
                _report_progress(progress, done, total)
        finally:
            for _, fetching in ahead:
                fetching.cancel()
        return outcome

    async def _apply(self, writes: Sequence[rediscache.Write], *, fence: int) -> _Outcome:
        if not writes:
            return _Outcome()
        result = await self.cache.apply(writes, fence=fence)
        return _Outcome(applied=list(result.applied), conflicted=list(result.conflicted))

    # -- reporting -----------------------------------------------------------------------------------------

    def _report(
        self,
        the_plan: plan.Plan,
        outcome: _Outcome,
        source: plan.SourceView,
        view: plan.CacheView,
        started: float,
        *,
        dry_run: bool,
        digest: str | None,
    ) -> plan.Report:
        """``digest`` is the source digest of a full resync, None for an incremental one."""
        rejected = _unique_rejections([*the_plan.rejected, *outcome.rejected])
        refused = {r.path for r in outcome.rejected}
        if refused:  # found unservable only once their content was read: not drift, but rejected input
            the_plan = dataclasses.replace(the_plan, items=tuple(i for i in the_plan.items if i.path not in refused))
        applied = plan.count_applied(outcome.applied)
        cached = view.cached_count()
        if not dry_run:
            cached += applied[plan.Reason.MISSING] - applied[plan.Reason.ORPHAN]
        return plan.Report(
            plan=dataclasses.replace(the_plan, rejected=rejected),
            applied=applied,
            superseded=len(outcome.conflicted),
            vanished=outcome.vanished,
            source_count=len(source.live),
            cached_count=cached,
            digest=digest or "",
            duration_s=self._monotonic() - started,
            dry_run=dry_run,
            full=digest is not None,
        )


def _writes(items: Iterable[plan.Item], found: dict[str, pgsource.Module]) -> list[rediscache.Write]:
    """Plan items as cache writes; PUTs take the content read now (which may be newer than the plan's)."""
    writes = []
    for item in items:
        if item.operation is not plan.Operation.PUT:
            writes.append(rediscache.Write(item))
        elif (module := found.get(item.path)) is not None:
            fresh = plan.Item(item.operation, item.path, item.reason, item.old, module.hash)  # cheaper than replace
            writes.append(rediscache.Write(fresh, modules.encode_cached(module.path, module.content, module.hash)))
    return writes


def _unique_rejections(rejections: Iterable[modules.Rejected]) -> tuple[modules.Rejected, ...]:
    return tuple({r.path: r for r in rejections}.values())


def _chunks(items: Sequence[plan.Item], size: int) -> Iterable[Sequence[plan.Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _report_progress(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)
