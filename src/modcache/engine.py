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

from modcache import gcpause, keys, lineage, modules, observation, pgsource, plan, rediscache

log = logging.getLogger(__name__)

MAX_ROUNDS = 5
FETCH_AHEAD = 2  # content batches read ahead of the one being written
#: A status record that says what a resync found (all but its time and duration) is rewritten only this often: a
#: resync that finds nothing to do writes nothing (``modcache status`` shows when the record was written).
STATUS_REFRESH_S = 60.0
#: Fields that change without news: times, and the WAL position (it advances with any write to the database; it is
#: recorded with the next write that has news, or the refresh, so a no-drift resync still writes nothing).
_STATUS_TIMES = ("last_success_at", "duration_s", "source_lsn", "source_seal")
LIGHT_BATCH = 5000  # items per APPLY that carry no content (a few calls each in Redis: ~10-20 ms per batch)

Progress = Callable[[int, int], None]
_Fetched = tuple[dict[str, pgsource.Module], list[modules.Rejected]]


@dataclasses.dataclass
class _Outcome:
    # applied items counted by reason, not kept: a cold fill's 100,000 written items and their hashes were 19 MB
    applied: collections.Counter[plan.Reason] = dataclasses.field(default_factory=collections.Counter)
    conflicted: list[plan.Item] = dataclasses.field(default_factory=list)
    moved: list[plan.Item] = dataclasses.field(default_factory=list)
    rejected: list[modules.Rejected] = dataclasses.field(default_factory=list)
    repairs: list[plan.KeyRepair] = dataclasses.field(default_factory=list)
    vanished: int = 0

    def absorb(self, other: _Outcome) -> None:
        self.applied.update(other.applied)
        self.conflicted += other.conflicted
        self.moved += other.moved
        self.rejected += other.rejected
        self.repairs += other.repairs
        self.vanished += other.vanished


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
        self._lineage_learnt = False
        self._key: str | None = None  # the status record's seal key (``lineage.KEY_TABLE``), once read
        self._unsealed_said = False

    # -- full resync ---------------------------------------------------------------------------------------

    async def observe(self, *, deep: bool = False) -> tuple[int, plan.SourceView, plan.CacheView]:
        """The fence, the source listing and the complete cache view (for tests and tools: a full resync plans
        from the narrowed view of ``observation.observe``)."""
        observed = await self._observe(deep=deep, dry_run=True, complete=True)
        return observed.fence, observed.source, observed.view

    async def _observe(
        self, *, deep: bool, dry_run: bool, complete: bool = False, claims: bool = False, lengths: bool = True
    ) -> observation.Observation:
        return await observation.observe(
            source=self.source,
            cache=self.cache,
            fetch_batch_size=self.fetch_batch_size,
            deep=deep,
            dry_run=dry_run,
            complete=complete,
            claims=claims and not deep,
            lengths=lengths or deep,
        )

    async def full_resync(
        self,
        *,
        dry_run: bool = False,
        deep: bool = False,
        claims: bool = False,
        lengths: bool = True,
        progress: Progress | None = None,
    ) -> plan.Report:
        """Converge the whole cache. ``claims``: content keys the manifest lacks are taken on what they claim (their
        path and hash, ``observation``) rather than compared by whole value -- for a watcher rebuilding a deleted
        manifest, which must then run a deep resync (``Report.claimed`` says how many were taken so). ``lengths``
        false: the content keys the manifest names are not checked (their length) -- only for a watcher whose
        keyspace events cover every write to them (docs/integrity.md)."""
        with gcpause.paused():
            return await self._full_resync(
                dry_run=dry_run, deep=deep, claims=claims, lengths=lengths, progress=progress
            )

    async def _full_resync(
        self, *, dry_run: bool, deep: bool, claims: bool, lengths: bool, progress: Progress | None
    ) -> plan.Report:
        started = self._monotonic()
        await self.learn_lineage()
        observed = await self._observe(deep=deep, dry_run=dry_run, claims=claims, lengths=lengths)
        repairs = list(observed.repairs)
        if observed.top_generation > observed.fence and (
            dry_run or await self.cache.raise_generation(observed.top_generation)
        ):
            repairs.append(plan.KeyRepair("generation", self.cache.keyspace.generation, "lower than the manifest"))
        # in a thread: planning 1,000,000 paths (after a DEL of the index) must not block the replies in flight
        the_plan = await asyncio.to_thread(lambda: self._compute(*observed.narrowed(), repairs))
        outcome = _Outcome()
        if not dry_run:
            outcome = await self._execute(
                the_plan,
                fence=observed.fence,
                lengths=observed.lengths,
                progress=progress,
                large=observed.source.large,
            )
            await self._settle(outcome)
            await self.cache.refresh_ttl(observed.source.live)
        else:  # rows found unservable only when their content is read: a dry run must say so too
            outcome.rejected = await self._unservable(the_plan)
        report = self._report(
            the_plan, outcome, observed.source, observed.cached, started, dry_run=dry_run, digest=observed.digest
        )
        report = dataclasses.replace(report, deep=deep, claimed=observed.claimed)
        if not dry_run:
            await self._record(report)
        return report

    async def _record(self, report: plan.Report) -> None:
        """Write the status record, unless the one stored says the same (but for its time and duration) and is less
        than ``STATUS_REFRESH_S`` old: a resync that finds nothing to do writes nothing at all."""
        stored = await self.cache.read_status()
        status = _never_weaker(await self._status(report), await self._believed(stored))
        key = await self._lineage_key()
        recorded = _recorded(status)  # type: ignore[arg-type]
        status["source_seal"] = lineage.seal(key, self.cache.keyspace.prefix, *recorded) if key and recorded[0] else ""
        if _same_news(stored, status, now=self._wall_clock()):
            return
        await self.cache.write_status(status)

    async def _status(self, report: plan.Report) -> keys.SyncStatus:
        """The sync-status record (``keys.SyncStatus``): what the consumer and ``modcache status`` read."""
        checked = self.source.lineage
        return keys.SyncStatus(
            last_success_at=self._wall_clock().isoformat(timespec="seconds"),
            generation=str(self.cache.high_water),
            source_modules=str(report.source_count),
            cached_modules=str(report.cached_count),
            source_digest=report.digest,
            last_drift=json.dumps({r.value: n for r, n in report.plan.counts().items() if n}),
            rejected=str(len(report.plan.rejected)),
            duration_s=f"{report.duration_s:.4f}",
            deep="1" if report.deep else "0",
            source_system=(checked.system or "") if checked is not None else "",
            source_timeline=str(checked.timeline if checked is not None else 0),
            source_lsn=lineage.lsn_text(checked.lsn if checked is not None else 0),
            source_seal="",  # by ``_record``, over what is kept
        )

    async def learn_lineage(self) -> None:
        """Take the cluster and timeline the cache's status records as the lowest acceptable source (before the
        first read: a restarted modcache that first reaches a stale former primary must refuse it too) -- if the
        record is sealed (``lineage.seal``): anyone who can write the hash could otherwise lock modcache out of
        every server (attack-9d F1). An unsealed record is said once, not believed, and replaced by ``_record``."""
        if self.source.lineage is None:
            return
        status = await self.cache.read_status()
        self._lineage_learnt = True
        # the cluster first: the seal's key is read from the source, which must be that cluster already
        raised = self.source.lineage.learn(_recorded(status)[0], 0, 0)
        raised |= self.source.lineage.learn(*await self._believed(status))
        if raised:  # connections pooled before (the consumer's first SELECT 1) passed a lower bar: not reused
            await self.source.engine.dispose()

    async def _believed(self, status: Mapping[str, str]) -> tuple[str, int, int]:
        """What ``status`` records about the source if its seal is right, else only the cluster (timeline and
        position 0): the seal's key is this cluster's, so a record of another cluster cannot be told from a forged
        one, and is refused as another cluster's (``lineage``: the limit)."""
        recorded = _recorded(status)
        if not recorded[0]:
            return recorded
        key = await self._lineage_key()
        if lineage.sealed(key, self.cache.keyspace.prefix, recorded, status.get("source_seal", "")):
            return recorded
        if not self._unsealed_said:
            self._unsealed_said = True
            why = "its seal is wrong" if key is not None else f"this database has no {lineage.KEY_TABLE} to check it"
            log.warning(
                "the cache's status record says it was filled from PostgreSQL system %s, timeline %d, but %s "
                "(written by someone else, or before seals): only its system is believed, and the next full resync "
                "replaces the record; if that system is not this source's, every sync is refused until the record "
                "is deleted (DEL %smodcache:status: a forged or foreign record, docs/topologies.md)",
                recorded[0][:40],
                recorded[1],
                why,
                self.cache.keyspace.prefix,
            )
        return recorded[0], 0, 0

    async def _lineage_key(self) -> str | None:
        if self._key is None:  # read until found (a database migrated while we run has it from then on)
            self._key = await self.source.lineage_key()
        return self._key

    async def _unservable(self, the_plan: plan.Plan) -> list[modules.Rejected]:
        rejected: list[modules.Rejected] = []
        for batch in _chunks(the_plan.by_operation(plan.Operation.PUT), self.fetch_batch_size):
            rejected += (await self.source.fetch([i.path for i in batch]))[1]
        return rejected

    # -- incremental -----------------------------------------------------------------------------------------

    async def apply_paths(self, paths: Iterable[str], *, dry_run: bool = False) -> plan.Report:
        """Converge just ``paths`` (re-reading their rows, comparing whole values); other cached paths are not
        looked at. Names that are not content keys of this cache (a hint that names ``index``) are reported as
        rejected and never acted on."""
        started = self._monotonic()
        if not self._lineage_learnt:  # a repair before any full resync (the consumer's) is held to the record too
            await self.learn_lineage()
        wanted, refused = self._judge_names(paths)
        the_plan, outcome, source, cached = await self._converge_batched(wanted, dry_run=dry_run)
        if not dry_run:
            await self._settle(outcome)
        outcome.rejected += refused
        return self._report(the_plan, outcome, source, cached, started, dry_run=dry_run, digest=None)

    async def unlist(self, names: Iterable[str]) -> plan.Report:
        """Remove exactly these index members / manifest fields, each a name that is no content key of this cache
        (found changed by someone else: ``RedisCache.index_changes``); valid names are left alone (they are
        converged by ``apply_paths``), and no key is derived from any name."""
        started = self._monotonic()
        problems = {n: self.cache.keyspace.name_problem(n) for n in sorted(set(names))}
        items = tuple(
            plan.Item(plan.Operation.UNLIST, name, plan.Reason.INVALID, None, None, why)
            for name, why in problems.items()
            if why is not None
        )
        outcome = _Outcome()
        if items:
            generation = await self.cache.read_generation()
            outcome = await self._apply([rediscache.Write(item) for item in items], fence=generation.value)
        the_plan = plan.Plan(items=items)
        return self._report(the_plan, outcome, plan.SourceView(live={}), 0, started, dry_run=False, digest=None)

    async def put_manifest_back(self) -> plan.Report | None:
        """Manifest fields changed by someone else: modcache's expected copy, what it last wrote there, put in the
        manifest's place (``RedisCache.put_manifest_back``). The report names the key; None when a member check must
        tell (no copy to believe, or one too large to copy at once)."""
        started = self._monotonic()
        if not await self.cache.put_manifest_back():
            return None
        key = self.cache.keyspace.manifest
        repair = plan.KeyRepair("manifest", key, "fields changed by someone else: modcache's copy put back")
        the_plan = plan.Plan(items=(), repairs=(repair,))
        return self._report(the_plan, _Outcome(), plan.SourceView(live={}), 0, started, dry_run=False, digest=None)

    async def _converge_batched(
        self, paths: Sequence[str], *, dry_run: bool
    ) -> tuple[plan.Plan, _Outcome, plan.SourceView, int]:
        """``_converge_paths`` in the full resync's bounded batches (``fetch_batch_size`` rows and
        ``plan.BATCH_BYTES`` of content each): a burst of hints naming 8 MiB modules must not become one read and
        one Redis call holding all of them. Returns the plans joined, the outcome, the source seen, the keys cached."""
        large = await self.source.large_among(paths) if len(paths) > 1 else {}
        generation = await self.cache.read_generation(create=not dry_run)  # one fence, read before every batch's rows
        items: list[plan.Item] = []
        rejected: list[modules.Rejected] = []
        repairs: list[plan.KeyRepair] = []
        live: dict[str, str] = {}
        outcome, cached = _Outcome(), 0
        # rows per batch: small modules cost little each (the bytes bound keeps the memory), so not fetch_batch_size
        for batch in plan.batches_by_bytes(paths, large, rows=max(self.fetch_batch_size, LIGHT_BATCH)):
            the_plan, done, source, view = await self._converge_paths(batch, dry_run=dry_run, generation=generation)
            items += the_plan.items
            rejected += the_plan.rejected
            repairs += the_plan.repairs
            live.update(source.live)
            outcome.absorb(done)
            cached += view.cached_count()
        joined = plan.Plan(items=tuple(items), rejected=tuple(rejected), repairs=_unique_repairs(repairs))
        return joined, outcome, plan.SourceView(live=live, rejected=tuple(rejected)), cached

    def _judge_names(self, paths: Iterable[str]) -> tuple[list[str], list[modules.Rejected]]:
        wanted, refused = [], []
        for path in sorted(set(paths)):
            problem = self.cache.keyspace.name_problem(path)
            if problem is None:
                wanted.append(path)
            else:
                refused.append(modules.Rejected(path, modules.Rejection.BAD_PATH, f"named in a change hint: {problem}"))
        return wanted, refused

    async def _converge_paths(
        self, paths: Sequence[str], *, dry_run: bool, generation: rediscache.Generation | None = None
    ) -> tuple[plan.Plan, _Outcome, plan.SourceView, plan.CacheView]:
        """``generation``: the fence read before these rows are (read now if not given)."""
        generation = generation or await self.cache.read_generation(create=not dry_run)
        repairs = [plan.KeyRepair("generation", self.cache.keyspace.generation, generation.problem)]
        repairs = repairs if generation.problem and generation.problem != "missing" else []
        found, rejected = await self.source.fetch(paths)
        source = plan.SourceView(live={p: m.hash for p, m in found.items()}, rejected=tuple(rejected))
        view, values = await self._look(paths, found)
        the_plan = self._compute(source, view, repairs)
        outcome = _Outcome(rejected=list(rejected))
        if the_plan.items and not dry_run:
            writes = _writes(the_plan.items, found, {p: len(v.encode()) for p, v in values.items()})
            outcome.absorb(await self._apply(writes, fence=generation.value))
        return the_plan, outcome, source, view

    async def _look(
        self, paths: Sequence[str], found: Mapping[str, pgsource.Module]
    ) -> tuple[plan.CacheView, dict[str, str]]:
        """The cache view of ``paths``: live ones by whole value against what their rows make, others by
        existence; the values built, by path."""
        entries, malformed = await self.cache.read_manifest(paths)
        index = await self.cache.read_index_members(paths)
        values = {p: modules.encode_cached(p, m.content, m.hash) for p, m in found.items()}
        expected = {p: (rediscache.value_digest(v), found[p].hash) for p, v in values.items()}
        codes = await self.cache.check_values(expected) if expected else {}
        codes.update(await self.cache.check_lengths(dict.fromkeys(p for p in paths if p not in found)))
        content: dict[str, str | None] = {}
        damaged: dict[str, plan.Reason] = {}
        for path, code in codes.items():
            live = found.get(path)
            content[path] = observation.content_state(code, live.hash if live is not None else "")
            if live is not None and code not in (rediscache.MATCH, rediscache.ABSENT):
                damaged[path] = observation.damage(code)
        view = plan.CacheView(
            index=index,
            manifest={p: e.hash for p, e in entries.items()},
            content=content,
            damage=damaged,
            # an entry whose length is not the value's (forged: attack-9d F5) is rewritten, as an unparsable one is
            malformed=frozenset(malformed).union(
                p for p, e in entries.items() if p in values and e.length != len(values[p].encode())
            ),
        )
        return view, values

    def _compute(
        self, source: plan.SourceView, view: plan.CacheView, repairs: Iterable[plan.KeyRepair] = ()
    ) -> plan.Plan:
        the_plan = plan.compute(source, view, repairs)
        return the_plan if self.prune else plan.without_orphans(the_plan)

    async def _settle(self, outcome: _Outcome) -> None:
        """Re-check fenced-out (and, for REINDEX, moved) items with fresh reads until none conflict (bounded)."""
        pending = outcome.conflicted + outcome.moved
        for _ in range(MAX_ROUNDS):
            if not pending:
                return
            log.debug("re-checking %d paths a concurrent writer changed", len(pending))
            _, again, _, _ = await self._converge_batched(sorted({i.path for i in pending}), dry_run=False)
            outcome.applied.update(again.applied)
            outcome.vanished += again.vanished
            outcome.repairs += again.repairs
            pending = again.conflicted + again.moved
        if pending:
            log.warning(
                "%d paths still contended after %d rounds; the next sync re-checks them", len(pending), MAX_ROUNDS
            )

    # -- applying a plan -----------------------------------------------------------------------------------

    def _put_batches(self, the_plan: plan.Plan, large: Mapping[str, int]) -> Iterable[Sequence[plan.Item]]:
        """The PUT items in batches bounded by rows and by content bytes (``plan.batches_by_bytes``)."""
        puts = the_plan.by_operation(plan.Operation.PUT)
        by_path = {i.path: i for i in puts}
        for paths in plan.batches_by_bytes([i.path for i in puts], large, rows=self.fetch_batch_size):
            yield [by_path[p] for p in paths]

    async def _execute(
        self,
        the_plan: plan.Plan,
        *,
        fence: int,
        lengths: Mapping[str, int],
        progress: Progress | None,
        large: Mapping[str, int],
    ) -> _Outcome:
        outcome = _Outcome()
        total, done = len(the_plan.items), 0
        batches = iter(list(self._put_batches(the_plan, large)))
        ahead: collections.deque[tuple[Sequence[plan.Item], asyncio.Task[_Fetched]]] = collections.deque()

        def read_ahead() -> None:  # keep FETCH_AHEAD content reads in flight while we encode and write
            while len(ahead) < FETCH_AHEAD and (batch := next(batches, None)) is not None:
                ahead.append((batch, asyncio.create_task(self.source.fetch([i.path for i in batch]))))

        try:
            read_ahead()  # content reads start before the light writes go out
            light = [i for i in the_plan.items if i.operation is not plan.Operation.PUT]
            for batch in _chunks(light, LIGHT_BATCH):
                outcome.absorb(await self._apply(_writes(batch, {}, lengths), fence=fence))
                done += len(batch)
                _report_progress(progress, done, total)
            while ahead:
                batch, fetching = ahead.popleft()
                found, rejected = await fetching
                read_ahead()
                outcome.rejected += rejected
                writes = _writes(batch, found, lengths)
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
        return _Outcome(
            applied=collections.Counter(i.reason for i in result.applied),
            conflicted=list(result.conflicted),
            moved=list(result.moved),
            repairs=list(result.repairs),
        )

    # -- reporting -----------------------------------------------------------------------------------------

    def _report(
        self,
        the_plan: plan.Plan,
        outcome: _Outcome,
        source: plan.SourceView,
        cached: int,
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
        repairs = _unique_repairs([*the_plan.repairs, *outcome.repairs])
        applied = {reason: outcome.applied[reason] for reason in plan.Reason}
        if not dry_run:
            cached += applied[plan.Reason.MISSING] - applied[plan.Reason.ORPHAN]
        return plan.Report(
            plan=dataclasses.replace(the_plan, rejected=rejected, repairs=repairs),
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


def _same_news(stored: Mapping[str, str], status: keys.SyncStatus, *, now: datetime.datetime) -> bool:
    """Whether ``stored`` is a status record saying what ``status`` says, written less than STATUS_REFRESH_S ago."""
    fresh = dict(status)
    if stored.keys() != fresh.keys():
        return False
    if any(stored[k] != v for k, v in fresh.items() if k not in _STATUS_TIMES):
        return False
    try:
        written = datetime.datetime.fromisoformat(stored["last_success_at"])
    except ValueError:
        return False
    if written.tzinfo is None:
        return False
    return datetime.timedelta(0) <= now - written < datetime.timedelta(seconds=STATUS_REFRESH_S)


def _writes(
    items: Iterable[plan.Item], found: Mapping[str, pgsource.Module], lengths: Mapping[str, int]
) -> list[rediscache.Write]:
    """Plan items as cache writes; PUTs take the content read now (which may be newer than the plan's)."""
    writes = []
    for item in items:
        if item.operation is plan.Operation.REINDEX:
            writes.append(rediscache.Write(item, length=lengths.get(item.path)))
        elif item.operation is not plan.Operation.PUT:
            writes.append(rediscache.Write(item))
        elif (module := found.get(item.path)) is not None:
            fresh = plan.Item(item.operation, item.path, item.reason, item.old, module.hash)  # cheaper than replace
            writes.append(rediscache.Write(fresh, modules.encode_cached(module.path, module.content, module.hash)))
    return writes


def _unique_rejections(rejections: Iterable[modules.Rejected]) -> tuple[modules.Rejected, ...]:
    return tuple({r.path: r for r in rejections}.values())


def _unique_repairs(repairs: Iterable[plan.KeyRepair]) -> tuple[plan.KeyRepair, ...]:
    return tuple(dict.fromkeys(repairs))


def _chunks(items: Sequence[plan.Item], size: int) -> Iterable[Sequence[plan.Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _report_progress(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def _recorded(status: Mapping[str, str]) -> tuple[str, int, int]:
    """The (system, timeline, WAL position) a status hash records (``""``, 0, 0: nothing)."""
    timeline = status.get("source_timeline", "")
    return (
        status.get("source_system", ""),
        int(timeline) if timeline.isascii() and timeline.isdigit() else 0,
        lineage.parse_lsn(status.get("source_lsn", "")),
    )


def _never_weaker(status: keys.SyncStatus, stored: tuple[str, int, int]) -> keys.SyncStatus:
    """``status`` with the ``stored`` lineage (as believed) kept when this process knows less (no lineage, an
    identity it could not read, an older timeline or position): a resync never lowers what the next modcache is
    held to (attack-11c U3: a resync with no lineage wrote an empty record, and the next one took the stale
    primary)."""
    system, timeline, lsn = stored
    mine_system, mine_timeline, mine_lsn = _recorded(status)  # type: ignore[arg-type]
    if not system or (mine_system == system and (mine_timeline, mine_lsn) >= (timeline, lsn)):
        return status
    if mine_system and mine_system != system:
        return status  # cannot be: ``learn_lineage`` took the stored system first; the record was replaced meanwhile
    kept = status.copy()
    kept["source_system"], kept["source_timeline"], kept["source_lsn"] = system, str(timeline), lineage.lsn_text(lsn)
    return kept
