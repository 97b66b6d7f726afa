"""Every change to a key under the cache's prefix that this process did not make, as an async iterator.

Two sources, merged into one stream of typed events (``Subscribed``, ``Changed``, ``Regressed``, ``Lost``,
``Unavailable``):

* **keyspace notifications**, subscribed with a server-side pattern on the prefix (``PSUBSCRIBE
  __keyspace@N__:{prefix}*``), so another cache's or application's traffic never reaches us. Every write
  command on a key under the prefix -- SET/SETEX/APPEND/SETRANGE, DEL, EXPIRE, expiry, eviction, RENAME,
  SADD/SREM, HSET/HDEL, a key of another type created -- arrives here. ``notify-keyspace-events`` is merged with
  what is set (``K`` plus every key-event class) when CONFIG is permitted; otherwise whatever the admin set is
  used, and a canary write checks that events really arrive (the event says which, so the status can);
* a **probe** every ``probe_interval_s`` on a connection of its own that ``WATCH``es a key of this process's own
  (with a short TTL): FLUSHDB, FLUSHALL and SWAPDB touch watched keys, so the probe's ``MULTI``/``EXEC`` aborts
  even when the swapped-in database holds a byte-identical copy of the probe key; a restart without persistence
  loses the key, and a failover that lost writes shows as a generation lower than this process has seen. Redis
  emits no keyspace event for those. Each round's ``PEXPIRE`` of the probe key must come back as a keyspace event:
  if none has for ``DEAF_AFTER_ROUNDS`` rounds (``notify-keyspace-events`` changed at runtime, events lost), the
  subscription is dropped and made again (re-enabling the flags, then a deep resync).

modcache's own writes are not reported: ``rediscache.APPLY`` publishes ``b:<nonce>``/``e:<nonce>`` on the
prefix's writes channel around its writes, on the same subscription, and a script runs atomically, so every event
between the two markers of a nonce this process registered is its own. A marker with an unknown nonce (another
process, a forgery) is ignored, so such writes are reported like any other.

After any (re)connect the iterator yields ``Subscribed``: events published while it was away are lost, so the
caller resyncs (deeply: a foreign write in the gap may have kept a value's length).

Topologies (issue 11): both connections are made by ``RedisCache.open_node_connection``, to the node holding the
cache's keys at that moment -- the Sentinel's current master, or the Cluster node owning the prefix's slot. A
failover or resharding breaks them (the old master is killed or demoted: the probe's write is refused with
READONLY or MOVED), the iterator reconnects to the new node, enables the flags there, and yields ``Subscribed``
(naming the node, and the one before it), so the caller resyncs after every master change. On a Sentinel, the
sentinels' ``+switch-master`` (``RedisCache.master_switches``) makes it reconnect at once: after a planned
``SENTINEL FAILOVER`` the old master stays writable for seconds, and nothing would break.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import secrets
from collections.abc import AsyncIterator
from typing import Any

import redis.exceptions

from modcache import backoff, errors, keys, rediscache

#: The keyspace-event flags modcache needs: keyspace channels (K) and every class of key event.
WANTED_FLAGS = "Kg$lshzxet"
CANARY_WAIT_S = 1.0
#: Probe rounds in a row whose own write's keyspace event did not arrive before events count as off (counted in
#: rounds, not seconds, so an event loop starved by a long sync never looks like lost events).
DEAF_AFTER_ROUNDS = 10
#: Probe rounds between two reads of ``notify-keyspace-events`` (the probe key's own event is a ``g`` event: a
#: runtime change that keeps ``g`` and drops ``$``, ``s`` or ``h`` leaves the probe hearing itself and the rest deaf).
FLAGS_EVERY_ROUNDS = 10
#: How long a touched watch waits at most for the subscription to read every event Redis sent before the touch was
#: found (``_heard_so_far``; it takes a round trip and the reader's backlog, milliseconds, when subscribed).
HEARD_WAIT_S = 1.0
#: What the probe reports when its key was evicted (maxmemory): keys may be gone, but nothing was replaced.
EVICTED = "Redis evicted keys under maxmemory (modcache's probe key among them)"
#: What the probe reports when its watch was touched by a flush, a swap or a write to its guard key too.
REPLACED = "the cache was flushed or replaced (modcache's probe key was touched)"

#: The role of ``Changed`` events on the expected copies of the index and the manifest (``keys.KeySpace.expected``).
EXPECTED_ROLE = "expected"

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Subscribed:
    """Subscribed (again): events may have been missed; ``detail`` says how events are configured; ``complete``:
    this process set (or found) every class it needs in ``notify-keyspace-events`` (CONFIG permitted), so every write
    to a key under the prefix is heard (until a ``Lost``, ``Unavailable`` or ``Degraded``)."""

    detail: str
    complete: bool = False


@dataclasses.dataclass(frozen=True)
class Changed:
    """A content key (``path``) or one of modcache's own keys (``role``: index, manifest, generation, status,
    ``EXPECTED_ROLE``) was changed by someone else; ``event`` is what Redis said happened (``del``, ``hset``, ...)."""

    path: str | None = None
    role: str | None = None
    event: str = ""
    #: ``RedisCache.writes_heard`` when the event arrived: events arrive in the order Redis published them, so an
    #: event heard after the begin marker of this process's write number N happened after write N started
    after_write: int = 0


@dataclasses.dataclass(frozen=True)
class Regressed:
    """The cache went back or was replaced without a key event (FLUSHDB, SWAPDB, restart, a lossy failover).

    ``replaced``: the database was flushed or swapped (whatever it holds now was never checked), not only behind."""

    detail: str
    replaced: bool = True
    #: the probe key whose watch was touched (a FLUSHDB took it with everything; a write to it left it there)
    probe_key: str = ""


@dataclasses.dataclass(frozen=True)
class Lost:
    detail: str


@dataclasses.dataclass(frozen=True)
class Degraded:
    """``notify-keyspace-events`` lacks classes modcache needs (``missing``) and they could not be set again: changes
    of those kinds are not heard, only the probe and the periodic resyncs repair them."""

    detail: str
    missing: str


@dataclasses.dataclass(frozen=True)
class Unavailable:
    """Connected, but no keyspace events arrive (and they cannot be enabled): only the probe and the timer work."""

    detail: str


KeyEvent = Subscribed | Changed | Regressed | Lost | Unavailable | Degraded


def missing_keyspace_flags(current: str) -> str:
    """The flags modcache needs that ``current`` lacks ('' when none)."""
    have = set(current)
    if "A" in have:
        have |= set("g$lshzxetd")
    return "".join(flag for flag in WANTED_FLAGS if flag not in have)


def merged_keyspace_flags(current: str) -> str:
    """``current`` plus the flags modcache needs, without dropping any already set."""
    have = set(current)
    if "A" in have:
        have |= set("g$lshzxetd")
    return current + "".join(flag for flag in WANTED_FLAGS if flag not in have)


class KeyEvents:
    """``async with KeyEvents(cache, ...) as events: async for event in events: ...``"""

    def __init__(
        self,
        cache: rediscache.RedisCache,
        *,
        probe_interval_s: float,
        backoff_max_s: float,
        rng: random.Random | None = None,
    ) -> None:
        self._cache = cache
        self._ks = cache.keyspace
        self._probe_interval_s = probe_interval_s
        self._backoff_max_s = backoff_max_s
        self._rng = rng or random.Random()
        self._queue: asyncio.Queue[KeyEvent] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._conn: Any = None
        self._token = secrets.token_hex(8)
        self._canary_seen = asyncio.Event()
        self._roles = {key: role for role, key in self._ks.bookkeeping().items()}
        self._roles.update(dict.fromkeys(self._ks.expected(), EXPECTED_ROLE))
        self._probe_arms = 0  # each arming watches a key of its own name: a late event of an earlier one is not its
        self._probe_key = self._next_probe_key()
        self._probe_conn: Any = None
        # a second watched key on a connection of its own: FLUSHDB, FLUSHALL, SWAPDB and a restart touch both watches,
        # a write to the probe key only the probe's, which is then re-armed without a resync (``_guard_intact``)
        self._guard_key = ""
        self._guard_conn: Any = None
        self.probe_rearmed = 0  # writes to the probe key alone (the guard untouched): re-armed, nothing resynced
        self._probe_armed = asyncio.Event()  # Subscribed is reported only once the probe watches its key
        self._probe_evicted = False  # the probe key's ``evicted`` event arrived since it was armed
        self._guard_evicted = False  # the guard key's, since it was armed (the probe's re-arming leaves it alone)
        self._evictions_seen: int | None = None  # Redis's eviction count when probe and guard were last seen intact
        self._heard: dict[str, asyncio.Event] = {}  # ``_heard_so_far``'s markers, by token, until the reader reads them
        self._unheard: int | None = None  # probe rounds since the subscription delivered the probe's own event
        self._node: str | None = None  # host:port the subscription was last reported on (a failover moves it)
        self._moving: str | None = None  # why the subscription is being closed on purpose (the master moved)
        self._rounds = 0  # probe rounds made
        self._flags_refused: str | None = None  # flags found missing that re-subscribing did not bring back

    async def __aenter__(self) -> KeyEvents:
        self._tasks = [
            asyncio.create_task(self._subscribe_forever(), name="modcache-key-events"),
            asyncio.create_task(self._probe_forever(), name="modcache-cache-probe"),
        ]
        if self._cache.master_switches is not None:
            self._tasks.append(asyncio.create_task(self._follow_master(), name="modcache-master-switches"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close_probe()
        self._cache.tracking_own_writes = False

    def __aiter__(self) -> AsyncIterator[KeyEvent]:
        return self

    async def __anext__(self) -> KeyEvent:
        return await self._queue.get()

    # -- the subscription -----------------------------------------------------------------------------------

    async def _subscribe_forever(self) -> None:
        retry = backoff.Backoff(0.2, self._backoff_max_s, self._rng)
        while True:
            try:
                await self._subscribe_once(retry)
            except Exception as e:  # nothing Redis sends may end the subscription for good
                self._cache.tracking_own_writes = False
                self._queue.put_nowait(Lost(self._moving or errors.describe(e)))
                self._moving = None
            finally:
                self._unheard = None
                await self._disconnect()
            await asyncio.sleep(retry.next_s())

    async def _subscribe_once(self, retry: backoff.Backoff) -> None:
        self._conn = conn = await self._cache.open_node_connection()
        node = _address(conn)
        configured, complete = await self._enable(conn)
        db = self._cache.database
        prefix = f"__keyspace@{db}__:"
        await conn.send_command("PSUBSCRIBE", self._ks.keyspace_pattern(db))
        await conn.read_response()
        await conn.send_command("SUBSCRIBE", self._ks.writes_channel)
        await conn.read_response()
        self._cache.own_writes.clear()
        self._cache.tracking_own_writes = True
        self._canary_seen.clear()
        self._moving = None
        moved = f" (was {self._node})" if self._node not in (None, node) else ""
        canary = asyncio.create_task(self._check_canary(f"on {node}{moved}: {configured}", node, complete))
        try:
            retry.reset()
            await self._read(conn, prefix)
        finally:
            canary.cancel()

    @staticmethod
    async def _enable(conn: Any) -> tuple[str, bool]:
        """Merge the flags modcache needs into ``notify-keyspace-events`` on the node ``conn`` reaches (the setting
        is per node: a promoted replica or a slot's new owner needs it too); say how events are configured, and
        whether every class is known to be on."""
        try:
            await conn.send_command("CONFIG", "GET", "notify-keyspace-events")
            reply = await conn.read_response()
            current = str(reply[1] if isinstance(reply, list) else reply.get("notify-keyspace-events", ""))
            wanted = merged_keyspace_flags(current)
            if wanted != current:
                await conn.send_command("CONFIG", "SET", "notify-keyspace-events", wanted)
                await conn.read_response()
        except redis.exceptions.ResponseError as e:  # CONFIG disabled, renamed or not permitted (ACL)
            return f"configured by the admin (CONFIG not permitted: {errors.describe(e)})", False
        return f"notify-keyspace-events {wanted!r}", True

    async def _check_canary(self, configured: str, node: str, complete: bool) -> None:
        """Write a canary key and wait for its event: proof that events arrive, whoever configured them."""
        canary = f"{self._ks.prefix}modcache:canary"
        try:
            await self._cache.client.set(canary, self._token, px=60_000)
            await asyncio.wait_for(self._canary_seen.wait(), CANARY_WAIT_S)
        except TimeoutError:
            self._node = node
            self._queue.put_nowait(
                Unavailable(f"no keyspace events arrive ({configured}); repairing on the timer alone and the probe")
            )
        except (redis.exceptions.RedisError, OSError) as e:
            # the subscription is fine, but nothing would ever say so: subscribed again, the canary is tried again
            # (after a restart of Redis, the first canary went out on a pooled connection the restart had closed, and
            # the watcher stayed without key events, and without the reconnect's deep resync, for good)
            self._queue.put_nowait(Lost(errors.describe(e)))
            await self._disconnect()
        else:
            await self._probe_armed.wait()  # a resync this causes must not run before a flush can be noticed
            self._unheard = 0
            self._node = node  # "(was ...)" names the node last reported, not one subscribed to and dropped at once
            self._queue.put_nowait(Subscribed(f"keyspace events on {self._ks.prefix!r} {configured}", complete))

    async def _read(self, conn: Any, channel_prefix: str) -> None:
        inside: str | None = None  # the nonce of this process's write whose events are arriving
        canary = f"{self._ks.prefix}modcache:canary"
        while True:
            message = await conn.read_response(disable_decoding=False)
            kind = message[0]
            if kind == "message":
                inside = self._marker(str(message[2]), inside)
                continue
            if inside is not None and inside in self._cache.aborted_writes:
                self._cache.aborted_writes.discard(inside)  # that write failed mid-way: its events are over
                inside = None
            if kind != "pmessage" or inside is not None:
                continue
            key, event = str(message[2])[len(channel_prefix) :], str(message[3])
            heard = self._cache.writes_heard
            if key in (self._probe_key, self._guard_key):
                if event == "evicted":  # maxmemory: the probe's EXEC aborts, but nothing was flushed
                    self._probe_evicted |= key == self._probe_key
                    self._guard_evicted |= key == self._guard_key
                if key == self._probe_key and self._unheard is not None:
                    self._unheard = 0
            elif key == canary:
                self._canary_seen.set()
            elif (role := self._roles.get(key)) is not None:
                self._queue.put_nowait(Changed(role=role, event=event, after_write=heard))
            elif (path := self._ks.path_of(key)) is not None:
                self._queue.put_nowait(Changed(path=path, event=event, after_write=heard))

    def _marker(self, text: str, inside: str | None) -> str | None:
        """A message on the writes channel: the begin or end marker of a write of this process's (what ``inside``,
        the nonce whose events are arriving, becomes), or the marker of ``_heard_so_far``."""
        marker, _, nonce = text.partition(":")
        own = self._cache.own_writes
        if marker == "b" and nonce in own:
            self._cache.writes_heard = max(self._cache.writes_heard, own.pop(nonce))
            return nonce
        if marker == "e" and nonce == inside:
            return None
        if marker == "h" and (heard := self._heard.get(nonce)) is not None:
            heard.set()  # every event Redis sent before it has been read
        return inside

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    async def _follow_master(self) -> None:
        """Reconnect the subscription and the probe the moment the sentinels switch the master (a planned failover
        leaves the old master writable for seconds: waiting for it to refuse the probe's write would watch it, and
        let the engine write to it, until then). The reconnect yields ``Subscribed``, so the caller resyncs."""
        switches = self._cache.master_switches
        assert switches is not None
        while True:
            try:
                async for node in switches():
                    if self._probe_conn is not None and _address(self._probe_conn) != node:
                        await self._close_probe()
                    if self._conn is not None and _address(self._conn) == node:
                        continue  # it reconnected there by itself (a crash: the old master's refusals came first)
                    log.warning("the master moved to %s: subscribing there", node)
                    self._moving = f"the sentinels switched the master to {node}: subscribing there"
                    await self._disconnect()
            except Exception as e:  # nothing the sentinels send may stop the following; reconnects are the fallback
                log.warning("following the sentinels' master switches failed: %s", errors.describe(e))
            await asyncio.sleep(self._backoff_max_s)

    # -- the probe --------------------------------------------------------------------------------------------

    async def _probe_forever(self) -> None:
        ttl_ms = max(5_000, int(self._probe_interval_s * 50_000))
        while True:
            touched = self._probe_key  # ``_probe`` watches a key of a new name before it reports this one touched
            try:
                problem = await self._probe(ttl_ms)
            except (redis.exceptions.OutOfMemoryError, redis.exceptions.ExecAbortError):
                # out of memory (maxmemory, nothing evictable enough): the probe's write was refused, the connections
                # are fine; Redis evicting or refusing is not a lost subscription (which would mean a deep resync)
                await self._close_probe()
                problem = EVICTED
            except Exception as e:  # nothing Redis sends may stop the probe
                await self._close_probe()
                await self._disconnect()  # the subscription is as doubtful as the probe: reconnect it
                self._queue.put_nowait(Lost(errors.describe(e)))
                await asyncio.sleep(self._probe_interval_s)
                continue
            if problem is not None:
                replaced = problem != EVICTED and "went back" not in problem
                self._queue.put_nowait(Regressed(problem, replaced=replaced, probe_key=touched))
            self._rounds += 1
            # also while the canary is unheard (a configuration without ``$`` fails it): the classes are named then
            if self._rounds % FLAGS_EVERY_ROUNDS == 0 and self._probe_conn is not None and self._conn is not None:
                await self._check_flags(self._probe_conn)
            if self._unheard is not None and problem is None:  # a refused or aborted round wrote nothing to hear
                self._unheard += 1
                if self._unheard > DEAF_AFTER_ROUNDS:
                    self._unheard = None
                    log.warning(
                        "no keyspace event for the probe's last %d writes: subscribing again", DEAF_AFTER_ROUNDS
                    )
                    self._queue.put_nowait(
                        Lost(f"no keyspace events arrive (none for {DEAF_AFTER_ROUNDS} probe rounds)")
                    )
                    await self._disconnect()
            await asyncio.sleep(self._probe_interval_s)

    async def _probe(self, ttl_ms: int) -> str | None:
        """One round on the probe's own connection: ``EXEC`` of the probe key's refresh and the generation read,
        then ``WATCH`` again in the same write (Redis runs one client's pipelined commands back to back, so no
        other client's command lands between the two)."""
        seen = self._cache.high_water  # before the read: a write landing meanwhile must not look like a regression
        conn = self._probe_conn
        if conn is None:
            await self._open_probe(ttl_ms)
            return None
        ks = self._ks
        commands = [("MULTI",), ("PEXPIRE", self._probe_key, ttl_ms), ("GET", ks.generation), ("EXEC",)]
        await conn.send_packed_command(conn.pack_commands([*commands, ("WATCH", self._probe_key)]))
        replies = [await conn.read_response(disable_decoding=False) for _ in range(5)]
        executed = replies[3]
        if executed is None:  # a watched key was touched: flushed, swapped, deleted, evicted or written to
            return await self._touched(ttl_ms)
        alive, raw = executed
        if not alive:  # gone without touching the watch: it was gone when last watched (Redis evicts before any
            await self._heard_so_far(conn)  # command, our WATCH after the EXEC too), or a flush took it before that
            evicted = self._probe_evicted and await self._evicted_for_real(self._probe_key)
            await self._close_probe(guard=not evicted)
            await self._watch_again(ttl_ms)
            return EVICTED if evicted else "the cache was flushed or replaced (modcache's probe key vanished)"
        value = keys.parse_generation(raw)
        if seen and (value or 0) < seen:
            self._cache.high_water = value or 0  # learn again from here, so one regression is reported once
            return f"the generation went back from {seen} to {value or 'nothing'}"  # behind, not replaced
        if (self._rounds + 1) % FLAGS_EVERY_ROUNDS:
            return None
        return await self._refresh_guard(ttl_ms)  # its TTL, and its watch (touched only by a flush, or a write to it)

    async def _check_flags(self, conn: Any) -> None:
        """Read ``notify-keyspace-events`` on the probe's connection (when CONFIG is permitted): if classes modcache
        needs were dropped at runtime, subscribe again (which merges them back, then a deep resync); if that did not
        bring them back (they are dropped again, or CONFIG SET is refused), say so once (``Degraded``) and rely on
        the probe and the periodic resyncs rather than re-subscribing (and resyncing deeply) in a loop."""
        try:
            await conn.send_command("CONFIG", "GET", "notify-keyspace-events")
            reply = await conn.read_response()
        except redis.exceptions.ResponseError:  # not permitted: the canary and the probe's own event are the checks
            return
        current = str(reply[1] if isinstance(reply, list) and len(reply) > 1 else "")
        missing = missing_keyspace_flags(current)
        if not missing:
            self._flags_refused = None
            return
        if self._flags_refused is None:
            self._flags_refused = missing
            log.warning("notify-keyspace-events is %r, lacking %r: subscribing again", current, missing)
            self._queue.put_nowait(Lost(f"notify-keyspace-events {current!r} lacks {missing!r} (changed at runtime)"))
            await self._disconnect()
        elif self._flags_refused != "reported":
            self._flags_refused = "reported"
            self._queue.put_nowait(
                Degraded(
                    f"notify-keyspace-events {current!r} lacks {missing!r} and could not be set again: changes of "
                    "those kinds are repaired by the periodic resync and the probe only",
                    missing,
                )
            )

    async def _watch_again(self, ttl_ms: int) -> None:
        """Watch a key of a new name before the touched one is reported. Nothing watches between the touch and this,
        so a flush landing then would go unseen; reported after it, the touch's resync reads the cache after any such
        flush, and a later one touches the new key (the chaos test's round 125: an eviction took the probe key, the
        eviction's resync ran, and a FLUSHDB landed before the next round armed the probe again; nothing refilled).
        If this fails, the next round arms the probe as always, and its failure is handled there."""
        with contextlib.suppress(Exception):
            await self._open_probe(ttl_ms)

    async def _touched(self, ttl_ms: int) -> str | None:
        """The probe's watch was touched: an eviction, a flush or swap (which touch the guard's watch too), or a write
        to the probe key alone (anyone who can write under the prefix finds it with SCAN). The last is re-armed under
        a new name with no report: nothing else was lost, so it costs no resync."""
        await self._heard_so_far(self._probe_conn)  # an eviction's event may still be on its way
        await self._close_probe(guard=False)
        if self._probe_evicted and await self._evicted_for_real(self._probe_key):
            # re-armed before it is reported (a flush landing meanwhile is seen); the guard keeps watching: if the
            # eviction took it too, it says so itself
            await self._watch_again(ttl_ms)
            return EVICTED
        if await self._guard_intact(ttl_ms):
            self.probe_rearmed += 1
            (log.warning if self.probe_rearmed == 1 else log.debug)(
                "modcache's probe key was written to by someone else (its guard was not): re-armed, nothing resynced"
            )
            return None  # the next round arms a probe key of a new name (the guard watches meanwhile)
        return await self._guard_lost(ttl_ms)

    async def _refresh_guard(self, ttl_ms: int) -> str | None:
        """Keep the guard key alive (its TTL) and check its watch: touched means flushed, swapped or written to --
        or evicted: an eviction that took it rounds ago is remembered until a new guard is armed (its event cleared
        with the probe's, each re-arming of the probe forgot it, and the next check took the eviction for a flush)."""
        seen = await self._cache.evictions()  # before the check: an eviction after it makes the count grow
        if await self._guard_intact(ttl_ms):
            self._evictions_seen = seen
            return None
        await self._heard_so_far(self._guard_conn)
        return await self._guard_lost(ttl_ms)

    async def _guard_lost(self, ttl_ms: int) -> str:
        """The guard's watch was touched too: evicted (heard now or rounds ago: the guard's own ``evicted`` event, if
        Redis could have evicted it), or flushed, swapped, written to."""
        evicted = self._guard_evicted and await self._evicted_for_real(self._guard_key)
        await self._close_probe()
        await self._watch_again(ttl_ms)
        return EVICTED if evicted else REPLACED

    async def _evicted_for_real(self, key: str) -> bool:
        """Whether an ``evicted`` event heard on the probe's keys can be believed for ``key``: anyone may PUBLISH on
        a keyspace channel (attack-9d F3: spoofed, it passed a SWAPDB of a forged database off as an eviction, and
        no deep resync ran). An evicted key is gone, and Redis evicts only near its memory limit (``INFO``; unless
        INFO is not permitted): both must hold (the limit alone was met by any Redis used as an LRU cache: attack-9e
        E4). Believed when Redis cannot be asked (as before)."""
        try:
            if await self._cache.key_type(key) != "none":
                return False
            if await self._cache.at_memory_limit() is not False:
                return True
        except errors.ModcacheError:
            return True
        # ``used_memory`` falls well below the limit right after a burst (the guard was taken for a flush, and every
        # module read again from PostgreSQL, in a cache that does not fit): Redis's own count of evictions decides then
        seen, now = self._evictions_seen, await self._cache.evictions()
        return seen is not None and now is not None and now > seen

    async def _guard_intact(self, ttl_ms: int) -> bool:
        """One round on the guard's connection (``EXEC`` of its key's refresh, then ``WATCH`` again in the same write):
        whether nothing touched the guard key since it was last watched. Its watches tile time from its arming, so a
        flush, a swap or a restart since then aborts this ``EXEC`` or an earlier one (each reported as ``REPLACED``)."""
        conn = self._guard_conn
        if conn is None:
            return False
        commands = [("MULTI",), ("PEXPIRE", self._guard_key, ttl_ms), ("EXEC",), ("WATCH", self._guard_key)]
        await conn.send_packed_command(conn.pack_commands(commands))
        replies = [await conn.read_response(disable_decoding=False) for _ in range(4)]
        return replies[2] is not None and bool(replies[2][0])

    async def _heard_so_far(self, conn: Any) -> None:
        """Wait until the subscription has read every event Redis sent before now: a message published now on the
        writes channel (on the node the subscription reads) comes after them, in Redis's order. An ``evicted`` event
        and the ``EXEC`` reply it aborted travel on two connections; a fixed wait (0.1 s, once) sometimes ended
        before the event, in a storm of them, and an eviction was taken for a flush. Bounded (``HEARD_WAIT_S``):
        without a subscription nothing comes back."""
        if conn is None or self._conn is None:
            return
        token = secrets.token_hex(8)
        self._heard[token] = heard = asyncio.Event()
        try:
            await conn.send_command("PUBLISH", self._ks.writes_channel, f"h:{token}")
            await conn.read_response()
            await asyncio.wait_for(heard.wait(), HEARD_WAIT_S)
        except (TimeoutError, redis.exceptions.RedisError, OSError):
            pass  # what has been heard decides
        finally:
            del self._heard[token]

    def _next_probe_key(self) -> str:
        self._probe_arms += 1
        return f"{self._ks.prefix}modcache:probe:{self._token}:{self._probe_arms}"

    async def _open_probe(self, ttl_ms: int) -> None:
        # a new name each time: the ``evicted`` event of the key an earlier round watched may arrive after this one
        # is armed, and must not make a later FLUSHDB (which aborts this round's EXEC) look like an eviction
        self._probe_evicted = False
        if self._guard_conn is None:  # armed first: the probe's watches start inside the guard's
            self._guard_evicted = False
            self._evictions_seen = await self._cache.evictions()
            self._guard_key = f"{self._next_probe_key()}:guard"
            self._guard_conn = await self._watching(self._guard_key, ttl_ms)
        self._probe_key = self._next_probe_key()
        self._probe_conn = await self._watching(self._probe_key, ttl_ms)
        self._probe_armed.set()

    async def _watching(self, key: str, ttl_ms: int) -> Any:
        """A connection of its own that has written ``key`` (with a TTL) and watches it."""
        conn = await self._cache.open_node_connection()
        try:
            await conn.send_packed_command(conn.pack_commands([("SET", key, "1", "PX", ttl_ms), ("WATCH", key)]))
            for _ in range(2):
                await conn.read_response()
        except BaseException:  # refused (out of memory) or cut: this connection is not the probe's
            with contextlib.suppress(Exception):
                await conn.disconnect()
            raise
        return conn

    async def _close_probe(self, *, guard: bool = True) -> None:
        self._probe_armed.clear()
        conns = [self._probe_conn, self._guard_conn if guard else None]
        self._probe_conn = None
        if guard:
            self._guard_conn = None
        for conn in conns:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.disconnect()


def _address(conn: Any) -> str:
    """Where a redis-py connection goes: ``host:port``, or the socket path."""
    path = getattr(conn, "path", None)
    return str(path) if path else f"{conn.host}:{conn.port}"
