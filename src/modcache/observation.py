"""What a full resync sees: both sides read in parallel, every name validated, every corruption classified.

``observe`` reads the fence first, then lists the source (PostgreSQL) while Redis verifies the manifest page by
page (``rediscache.verify_manifest``). Paths the cache already serves exactly -- live, content key present with
the length its manifest entry records, manifest hash = source hash, indexed -- are *settled* as the pages arrive
and are never handed to the planner; only the rest (``Observation.unsettled``) is, so the plan is the one the
pure planner computes over the complete views, found without a 100,000-path planner pass.

Nothing read from Redis is believed before it is judged: index members and manifest fields that name no content
key of this cache become ``invalid`` (removed from the index/manifest by an UNLIST, never used to derive a key);
manifest entries that are not what modcache writes become ``malformed``; content keys of the wrong type or length
become ``damage``; bookkeeping keys of the wrong type or an unbelievable generation become ``KeyRepair`` items.

``deep`` adds the whole-value check: every live module's content is read from PostgreSQL in batches, the value
modcache would write is built, and Redis compares its sha1 with each stored value (``rediscache.check_values``);
and a SCAN for content keys nobody indexed.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet

from modcache import keys, modules, pgsource, plan, rediscache

_DAMAGED = (rediscache.WRONGTYPE, rediscache.OTHER, rediscache.CORRUPT)
#: Manifest pages kept while the source listing or the index is still being read, when Redis checks no lengths (a
#: watcher's routine resync: the walk is then only HSCAN, faster than the listing, and each page held is 1 MB of names
#: and hashes at 5,000 entries): the walk waits for them beyond. With lengths, Redis's work is worth overlapping with
#: the listing, and the pages come slower: no bound.
MAX_BACKLOG = 4


@dataclasses.dataclass
class Observation:
    """Both sides as observed, the source digest, the fence, and what the planner must look at."""

    fence: int
    source: plan.SourceView
    digest: str
    view: plan.CacheView  # restricted to ``unsettled`` unless observed with ``complete=True``
    unsettled: set[str]
    repairs: list[plan.KeyRepair]
    lengths: dict[str, int]  # the value length of live paths whose whole value was verified (for REINDEX)
    cached: int  # content keys present (of paths the manifest or the index name)
    top_generation: int  # the highest believable generation in the manifest
    claimed: int = 0  # content keys taken on their own claim (``claims``): every value must be compared next

    def narrowed(self) -> tuple[plan.SourceView, plan.CacheView]:
        """Both views restricted to the unsettled paths (a settled path yields no item and is never an orphan)."""
        paths, live, view = self.unsettled, self.source.live, self.view
        return (
            plan.SourceView(
                live={p: live[p] for p in paths if p in live}, rejected=self.source.rejected, large=self.source.large
            ),
            plan.CacheView(
                index=frozenset(p for p in paths if p in view.index),
                manifest={p: view.manifest[p] for p in paths if p in view.manifest},
                content={p: view.content[p] for p in paths if p in view.content},
                damage={p: view.damage[p] for p in paths if p in view.damage},
                malformed=frozenset(p for p in paths if p in view.malformed),
                invalid=view.invalid,
            ),
        )


def content_state(code: str, digest: str) -> str | None:
    """What ``CacheView.content`` says of a content key with this check status, verified against ``digest``."""
    return digest if code == rediscache.MATCH else None if code == rediscache.ABSENT else plan.UNVERIFIED


_DAMAGE = {rediscache.WRONGTYPE: plan.Reason.WRONGTYPE, rediscache.CORRUPT: plan.Reason.CORRUPT}


def damage(code: str) -> plan.Reason:
    """Why a present content key that did not match is wrong: the wrong type, a value that claims the right hash
    but is not what modcache writes (corrupt), or another module version (stale)."""
    return _DAMAGE.get(code, plan.Reason.STALE)


class _Views:
    """The cache view being assembled (only unsettled paths, unless ``complete``)."""

    def __init__(self, ks: keys.KeySpace, *, complete: bool) -> None:
        self.ks = ks
        self.complete = complete
        self.index: set[str] = set()
        self.manifest: dict[str, str] = {}
        self.content: dict[str, str | None] = {}
        self.damage: dict[str, plan.Reason] = {}
        self.malformed: set[str] = set()
        self.invalid: dict[str, str] = {}
        self.unsettled: set[str] = set()
        self.all_index: AbstractSet[str] = frozenset()  # every valid index member
        self.unlisted_index: AbstractSet[str] = frozenset()  # the valid index members that are not live paths
        self.settled = 0
        self.top_generation = 0

    def judge(self, name: str) -> bool:
        """Whether ``name`` (from the index or the manifest) names a content key; if not, it is invalid."""
        problem = self.ks.name_problem(name)
        if problem is None:
            return True
        self.invalid.setdefault(name, problem)
        return False

    def view(self) -> plan.CacheView:
        return plan.CacheView(
            index=frozenset(self.index),
            manifest=self.manifest,
            content=self.content,
            damage=self.damage,
            malformed=frozenset(self.malformed),
            invalid=self.invalid,
        )


class _Settling:
    """Consumes the verified manifest pages (``rediscache.verify_manifest``); once the source listing and the index
    are known (usually before the first page), settles each page at once, keeping only what is not settled."""

    def __init__(
        self,
        views: _Views,
        listing: asyncio.Task[tuple[plan.SourceView, str]],
        indexing: asyncio.Task[frozenset[str] | None],
        *,
        max_backlog: int | None = None,
    ) -> None:
        self._views = views
        self._max_backlog = max_backlog
        self._listing = listing
        self._indexing = indexing
        self._backlog: list[rediscache.VerifiedPage] = []
        # the believable manifest names, as the live paths not among them (the listing's strings, no copy of each name;
        # set operations at C speed per page) and the names that are not live paths
        self.unseen_live: set[str] = set()
        self.seen_other: set[str] = set()
        self._started = False
        self.entries = 0

    async def page(self, page: rediscache.VerifiedPage) -> None:
        self._backlog.append(page)
        if self._max_backlog is not None and len(self._backlog) >= self._max_backlog:  # wait for the source
            await asyncio.wait([self._listing, self._indexing])
        if all(t.done() and not t.cancelled() and t.exception() is None for t in (self._listing, self._indexing)):
            await self.drain()

    async def drain(self) -> None:
        (source, _), index = self._listing.result(), self._indexing.result() or frozenset()
        if not self._started:
            self._started = True
            self.unseen_live = set(source.live)
        while self._backlog:  # one page at a time, letting the replies in flight be read in between
            self._settle(self._backlog.pop(0), source.live, index)
            await asyncio.sleep(0)

    def _settle(self, page: rediscache.VerifiedPage, live: Mapping[str, str], index: frozenset[str]) -> None:
        v = self._views
        v.top_generation = max(v.top_generation, page.top_generation)
        for name in (*page.not_paths, *page.malformed):
            if v.judge(name) and name in page.malformed:
                v.malformed.add(name)
                v.unsettled.add(name)
        hashes = page.hashes
        self.entries += len(hashes)
        self.unseen_live.difference_update(page.names)
        rest: Mapping[str, str] = hashes
        if not v.complete:
            rest = self._settle_verified(page, live, index)
            if not rest:
                return
        self.seen_other.update(rest.keys() - live.keys())
        for name, digest in rest.items():
            if not v.judge(name):
                continue
            code = page.codes.get(name, rediscache.MATCH)
            settled = code == rediscache.MATCH and live.get(name) == digest and name in index
            if settled:
                v.settled += 1
                if not v.complete:
                    continue
            else:
                v.unsettled.add(name)
            v.manifest[name] = digest
            v.content[name] = content_state(code, digest)
            if code in _DAMAGED:
                v.damage[name] = damage(code)

    def _settle_verified(
        self, page: rediscache.VerifiedPage, live: Mapping[str, str], index: frozenset[str]
    ) -> Mapping[str, str]:
        """Settle the entries whose content key verified and whose hash is their live (so validated) row's, with
        C-level operations (a drifted page, 1 % of it, does not judge its other 99 % name by name); the rest."""
        hashes = page.hashes
        if list(map(live.get, page.names)) == page.digests:  # every hash is its live row's: one list comparison
            if not page.codes:
                self._settle_clean(hashes, index)
                return {}
            clean = hashes.copy()
            for name in page.codes:
                del clean[name]
            self._settle_clean(clean, index)
            return {n: hashes[n] for n in page.codes}
        clean = {n: d for n, d in hashes.items() if n not in page.codes and live.get(n) == d}
        self._settle_clean(clean, index)
        return {n: d for n, d in hashes.items() if n not in clean}

    def _settle_clean(self, clean: Mapping[str, str], index: frozenset[str]) -> None:
        """Settle entries whose content key verified and whose hash is their live row's: what the index lacks (all of
        it after a DEL of the index) needs an index entry and nothing else."""
        v = self._views
        if index.issuperset(clean):  # the common case: no set built
            v.settled += len(clean)
            return
        unindexed = clean.keys() - index
        v.settled += len(clean) - len(unindexed)
        if unindexed:
            v.unsettled |= unindexed
            lacking = {name: clean[name] for name in unindexed}
            v.manifest.update(lacking)
            v.content.update(lacking)


async def observe(
    *,
    source: pgsource.PgSource,
    cache: rediscache.RedisCache,
    fetch_batch_size: int,
    deep: bool,
    dry_run: bool,
    complete: bool = False,
    claims: bool = False,
    lengths: bool = True,
) -> Observation:
    generation = await cache.read_generation(create=not dry_run)
    repairs = list(generation.wrong_types)
    if not dry_run:
        await cache.reset(repairs)
    if generation.problem and generation.problem != "missing":
        repairs.append(plan.KeyRepair("generation", cache.keyspace.generation, generation.problem))
    views = _Views(cache.keyspace, complete=complete)
    listing = asyncio.create_task(_list(source, cache.keyspace))
    indexing = asyncio.create_task(_index(cache, listing))
    settling = _Settling(views, listing, indexing, max_backlog=None if lengths else MAX_BACKLOG)
    try:
        async for page in cache.verify_manifest(limit=generation.limit, lengths=lengths):  # verified while we list
            await settling.page(page)
        the_source, digest = await listing
        index = await indexing
    finally:
        for task in (listing, indexing):
            task.cancel()
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a read that failed while the walk failed too is not logged as lost
    await settling.drain()
    _judged_index(views, index, the_source.live, cache.keyspace, repairs)
    observed = Observation(
        fence=generation.value,
        source=the_source,
        digest=digest,
        view=views.view(),
        unsettled=views.unsettled,
        repairs=repairs,
        lengths={},
        cached=0,
        top_generation=views.top_generation,
    )
    await _by_path(observed, views, settling, source=source, cache=cache, batch=fetch_batch_size, claims=claims)
    if deep:
        await _deep(observed, views, source=source, cache=cache, batch=fetch_batch_size)
    views.index.update(views.all_index if complete else (p for p in views.unsettled if p in views.all_index))
    observed.view = views.view()
    observed.cached = views.settled + sum(1 for p in views.unsettled if views.content.get(p) is not None)
    return observed


def _judged_index(
    views: _Views,
    index: frozenset[str] | None,
    live: Mapping[str, str],
    ks: keys.KeySpace,
    repairs: list[plan.KeyRepair],
) -> None:
    """Keep the valid index members; live paths were validated with the source, so only the others are judged."""
    if index is None:  # changed type after the inspection: rebuilt by the next sync
        repairs.append(plan.KeyRepair("index", ks.index, "wrong type"))
        index = frozenset()
    unlisted = index - live.keys()
    invalid = {name for name in unlisted if not views.judge(name)}
    views.all_index = index - invalid if invalid else index
    views.unlisted_index = unlisted - invalid if invalid else unlisted


async def _by_path(
    observed: Observation,
    views: _Views,
    settling: _Settling,
    *,
    source: pgsource.PgSource,
    cache: rediscache.RedisCache,
    batch: int,
    claims: bool,
) -> None:
    """Check by path what the manifest walk could not: indexed paths without a believable manifest entry and
    paths with a malformed one (does the key exist, of which type), and live paths the manifest lacks (by whole
    value, so that a right content key is only reindexed; with ``claims``, by what the value claims)."""
    unseen = settling.unseen_live  # the live paths the manifest lacks
    unknown = unseen | (views.unlisted_index - settling.seen_other) | views.malformed  # C-level set operations
    present = []
    for path, code in (await cache.check_lengths(dict.fromkeys(unknown))).items():
        views.unsettled.add(path)
        views.content[path] = None if code == rediscache.ABSENT else plan.UNVERIFIED
        if code == rediscache.WRONGTYPE:
            views.damage[path] = plan.Reason.WRONGTYPE
        elif path in views.malformed and code != rediscache.ABSENT:
            views.damage[path] = plan.Reason.MANIFEST
        if code == rediscache.PRESENT and path in unseen:
            present.append(path)
    # only unlisted keys that exist are read and compared by whole value (after a flush none is: nothing is read
    # twice, once to find it absent and once to write it)
    if claims:
        present = await _claims(present, observed, views, cache=cache)
    await _whole_values(present, observed, views, source=source, cache=cache, batch=batch)


async def _claims(
    paths: Sequence[str], observed: Observation, views: _Views, *, cache: rediscache.RedisCache
) -> list[str]:
    """Take each content key that ends as modcache's value for its live row ends (path and hash) at its word: the
    manifest entry is rebuilt from it without reading 400 MB from PostgreSQL. Only a watcher asks for this (after a
    DEL of the manifest), and it compares every value right after (``claimed``); the keys that do not claim it
    are compared by whole value as usual (returned)."""
    if not paths:
        return []
    live = observed.source.live
    doubtful = []
    for path, (code, length) in (await cache.check_claims({p: modules.cached_tail(p, live[p]) for p in paths})).items():
        if code == rediscache.MATCH:
            views.content[path] = live[path]
            views.damage.pop(path, None)
            observed.lengths[path] = length
            observed.claimed += 1
        else:
            doubtful.append(path)
    return doubtful


async def _deep(
    observed: Observation,
    views: _Views,
    *,
    source: pgsource.PgSource,
    cache: rediscache.RedisCache,
    batch: int,
) -> None:
    """Every live module's whole value, and every content key nobody indexed (SCAN)."""
    live = observed.source.live
    strays = await cache.scan_names() - views.manifest.keys() - views.all_index - views.malformed - live.keys()
    for path, code in (await cache.check_lengths(dict.fromkeys(strays))).items():
        if code != rediscache.ABSENT:
            views.unsettled.add(path)
            views.content[path] = plan.UNVERIFIED
    absent = {p for p in views.unsettled if p in views.content and views.content[p] is None}
    await _whole_values([p for p in live if p not in absent], observed, views, source=source, cache=cache, batch=batch)


async def _whole_values(
    paths: Sequence[str],
    observed: Observation,
    views: _Views,
    *,
    source: pgsource.PgSource,
    cache: rediscache.RedisCache,
    batch: int,
) -> None:
    """Compare the stored value of each live path with the value its source row makes, byte for byte. A match
    makes the content key verified (whatever the manifest said); anything else makes the path unsettled with the
    damage found."""
    live = observed.source.live
    changed: list[modules.Rejected] = []
    for chunk in plan.batches_by_bytes(paths, observed.source.large, rows=batch):
        found, refused = await source.fetch(chunk)
        changed += _changed_under_hash(refused, live)
        expected = {p: modules.encode_cached(p, m.content, m.hash) for p, m in found.items() if live.get(p) == m.hash}
        codes = await cache.check_values({p: (rediscache.value_digest(v), live[p]) for p, v in expected.items()})
        for path, code in codes.items():
            _judge_value(views, path, code, live[path])
            if code == rediscache.MATCH:
                observed.lengths[path] = len(expected[path].encode())
    if changed:  # reported as rejected (the path is left alone, as every rejected row is), under its own reason
        rejected = (*observed.source.rejected, *changed)
        observed.source = dataclasses.replace(observed.source, rejected=rejected)


def _changed_under_hash(refused: Sequence[modules.Rejected], live: Mapping[str, str]) -> list[modules.Rejected]:
    """The rows listed as live with a hash that their content, read now, does not have (attack-9 F9)."""
    return [
        modules.Rejected(
            r.path,
            modules.Rejection.CONTENT_CHANGED,
            f"content_hash still {live[r.path][:12]}…, the cache serves that version ({r.detail})",
        )
        for r in refused
        if r.reason is modules.Rejection.HASH_MISMATCH and r.path in live
    ]


def _judge_value(views: _Views, path: str, code: str, digest: str) -> None:
    if path not in views.unsettled:
        if code == rediscache.MATCH:
            return
        views.settled -= 1  # a settled path had content = manifest = source hash and was indexed
        views.unsettled.add(path)
        views.manifest[path] = digest
    if code == rediscache.MATCH:
        views.content[path] = digest
        views.damage.pop(path, None)
        return
    views.content[path] = None if code == rediscache.ABSENT else plan.UNVERIFIED
    if code != rediscache.ABSENT:
        views.damage[path] = damage(code)


async def _list(source: pgsource.PgSource, ks: keys.KeySpace) -> tuple[plan.SourceView, str]:
    listed = await source.list_modules()
    if ks.excluded:  # rows whose content key would be another cache's key are not ours to serve
        foreign = {p: why for p in listed.live if (why := ks.name_problem(p)) is not None}
        if foreign:
            rejected = [modules.Rejected(p, modules.Rejection.BAD_PATH, why) for p, why in foreign.items()]
            live = {p: h for p, h in listed.live.items() if p not in foreign}
            listed = plan.SourceView(live=live, rejected=(*listed.rejected, *rejected), large=listed.large)

    return listed, await asyncio.to_thread(plan.source_digest, listed.live)  # seconds at 1,000,000 under load


async def _index(
    cache: rediscache.RedisCache, listing: asyncio.Task[tuple[plan.SourceView, str]]
) -> frozenset[str] | None:
    """The index members (None: not a SET), the live ones as the listing's strings: a copy of every path less to
    keep, and at 1,000,000 paths set operations that compare by identity instead of touching two copies' bytes
    (``set.intersection`` of a dict's keys keeps the keys' objects)."""
    members = await cache.read_index()
    if members is None:
        return None
    live = (await listing)[0].live.keys()
    return await asyncio.to_thread(_as_listed, members, live)


def _as_listed(members: frozenset[str], live: AbstractSet[str]) -> frozenset[str]:
    """``members`` with the live ones as the listing's strings (no union copied when every member is live)."""
    common, others = members.intersection(live), members - live
    return common | others if others else common
