"""Which node is the Sentinel master: asked of every configured sentinel, believed only when a majority agrees
and the node itself says it is a master; and told at once when the sentinels switch (issue 11).

redis-py's ``Sentinel.discover_master`` takes the first sentinel whose answer looks healthy. A sentinel that was
partitioned away during a failover (it still names the old master, which may be writable again), or a rogue one
listed first, would send every write to the wrong node, and nothing would ever say so. ``Quorum`` is what
redis-py's ``SentinelConnectionPool`` asks instead (its ``sentinel_manager``: composition, not a subclass):

1. every configured sentinel is asked at once (``SENTINEL MASTER service``); an answer counts only if it passes
   redis-py's own check (``Sentinel.check_master_state``: flagged master, not down, and knowing at least
   ``min_other_sentinels`` peers, set to ``len(sentinels) // 2``: a sentinel that knows fewer peers could not have
   taken part in the majority that elected the current master);
2. an address is believed only when **more than half of the configured sentinels** name it (an unreachable
   sentinel counts against: two of three, three of five). A sentinel votes once, however many entries of the
   URL reach it (``127.0.0.1:P`` and ``localhost:P``, a Service name beside its pod's): each is asked for its run
   id (``SENTINEL MYID``) and a run id already heard is not counted again (attack-11b T9);
3. the node must say ``ROLE`` master (a majority that names a demoted master, during the seconds before the
   sentinels reconfigure it, or a replica).

Otherwise ``MasterNotFoundError`` (a redis-py ``ConnectionError``): the command fails as ``CacheUnavailable`` and
is retried, and the message says what each sentinel answered.

``Quorum.switches`` subscribes to ``+switch-master`` on every sentinel: after a planned ``SENTINEL FAILOVER`` the
old master keeps accepting writes until the sentinels reconfigure it (about 8 s later, their role-check period),
so waiting for a ``READONLY`` would leave the cache writing to, and watching, a node whose data is about to be
discarded. Each announcement is checked against the quorum; when the master really changed, the pool's
connections are dropped and the new address is yielded (the key-event iterator reconnects on it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.asyncio.sentinel as aiosentinel
import redis.exceptions

from modcache import backoff, errors

log = logging.getLogger(__name__)

SWITCH_CHANNEL = "+switch-master"
Address = tuple[str, int]


class Quorum:
    """``discover_master``/``discover_slaves`` for ``SentinelConnectionPool``, by majority (see the module)."""

    def __init__(self, sentinel: aiosentinel.Sentinel, *, node_options: dict[str, Any]) -> None:
        self.sentinel = sentinel
        self._node_options = node_options  # how to reach a data node (credentials, TLS): for its ROLE
        self._order = list(sentinel.sentinels)  # redis-py reorders its list; the answers are reported in ours

    @property
    def majority(self) -> int:
        return len(self._order) // 2 + 1

    async def discover_master(self, service_name: str) -> Address:
        answers = await asyncio.gather(*(self._ask(s, service_name) for s in self._order))
        places = await asyncio.gather(*(_resolved(s) for s in self._order))
        votes, said = _count(list(zip(self._order, answers, places, strict=True)), service_name)
        address, count = votes.most_common(1)[0] if votes else (None, 0)
        if address is None or count < self.majority:
            raise aiosentinel.MasterNotFoundError(
                f"no master of {service_name!r} named by a majority ({self.majority} of {len(self._order)}) of the "
                f"sentinels ({'; '.join(said)})"
            )
        role = await self._role(address)
        if role != "master":
            raise aiosentinel.MasterNotFoundError(
                f"{count} of {len(self._order)} sentinels name {_join(address)} the master of {service_name!r}, "
                f"but the node says ROLE {role} ({'a replica' if role == 'slave' else 'not a master'}): waiting for "
                "the sentinels to agree on its successor"
            )
        return address

    async def discover_slaves(self, service_name: str) -> Sequence[Address]:
        return [(str(host), int(port)) for host, port in await self.sentinel.discover_slaves(service_name)]

    async def _ask(self, sentinel: aioredis.Redis, service_name: str) -> tuple[Address | str, str | None]:
        """The address this sentinel names, or why it names none; and its run id (None: it did not say)."""
        try:
            state: Any = await sentinel.sentinel_master(service_name)
        except (redis.exceptions.RedisError, OSError) as e:
            return errors.describe(e), None
        run_id = await _run_id(sentinel)
        if not isinstance(state, dict) or not self.sentinel.check_master_state(state, service_name):
            return "reports it down, or knows too few other sentinels", run_id
        return (str(state["ip"]), int(state["port"])), run_id

    async def _role(self, address: Address) -> str:
        node = aioredis.Redis(host=address[0], port=address[1], **self._node_options)
        try:
            reply = await node.execute_command("ROLE")  # type: ignore[no-untyped-call]
        except (redis.exceptions.RedisError, OSError) as e:
            return f"unknown ({errors.describe(e)})"
        finally:
            await node.aclose()
        return str(reply[0]) if isinstance(reply, list | tuple) and reply else "unknown"

    async def switches(self, pool: aiosentinel.SentinelConnectionPool, *, backoff_max_s: float) -> AsyncIterator[str]:
        """``host:port`` of each new master of ``pool``'s service, the moment a majority of the sentinels agree on
        it after a ``+switch-master`` (``pool``'s connections to the old one are dropped first)."""
        heard: asyncio.Queue[str] = asyncio.Queue()
        listeners = [
            asyncio.create_task(self._listen(s, pool.service_name, heard, backoff_max_s), name="modcache-sentinel")
            for s in self._order
        ]
        try:
            while True:
                said = await heard.get()
                if pool.master_address is None:  # nothing connected yet: the first connection asks the quorum
                    continue
                with contextlib.suppress(aiosentinel.MasterNotFoundError):  # the others follow within a moment
                    address = await self.discover_master(pool.service_name)
                    if address != pool.master_address:
                        log.warning("the sentinels switched the master of %r: %s", pool.service_name, said)
                        pool.master_address = address
                        await pool.disconnect(inuse_connections=True)  # commands in flight are retried, on the new
                        yield _join(address)
        finally:
            for task in listeners:
                task.cancel()
            await asyncio.gather(*listeners, return_exceptions=True)

    async def _listen(
        self, sentinel: aioredis.Redis, service_name: str, heard: asyncio.Queue[str], backoff_max_s: float
    ) -> None:
        """Put every ``+switch-master`` of ``service_name`` this sentinel publishes on ``heard``, reconnecting."""
        retry = backoff.Backoff(0.2, backoff_max_s, random.Random())
        again = False
        while True:
            try:
                async with sentinel.pubsub() as pubsub:
                    await pubsub.subscribe(SWITCH_CHANNEL)
                    retry.reset()
                    if again:  # a switch may have been announced while this sentinel was out of reach
                        heard.put_nowait(f"{_name(sentinel)} reachable again")
                    again = True
                    async for message in pubsub.listen():
                        raw = message.get("data", "")  # the sentinels' clients do not decode replies
                        data = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
                        if message.get("type") == "message" and data.split(" ", 1)[0] == service_name:
                            heard.put_nowait(f"{_name(sentinel)} announced {data}")
            except (redis.exceptions.RedisError, OSError):
                pass
            await asyncio.sleep(retry.next_s())


Entry = tuple[aioredis.Redis, tuple[Address | str, str | None], frozenset[Address]]


def _count(entries: list[Entry], service_name: str) -> tuple[collections.Counter[Address], list[str]]:
    """One vote per sentinel process: an entry that does not report its run id gets none (it could be any sentinel
    listed again: attack-11c U1), nor one that resolves to the address of an entry before it, nor a second entry
    with a run id already heard and the same answer. Two entries with one run id but different answers are a
    spoofed run id or a misconfiguration: no master is picked (attack-11c U2)."""
    votes: collections.Counter[Address] = collections.Counter()
    heard: dict[str, tuple[str, Address | str]] = {}  # run id -> (the entry that voted for it, its answer)
    seen: list[tuple[frozenset[Address], str]] = []  # resolved addresses -> the entry
    said = []
    for sentinel, (answer, run_id), place in entries:
        name = _name(sentinel)
        same_place = next((other for where, other in seen if where & place), None)
        seen.append((place, name))
        if run_id is not None and run_id in heard and heard[run_id][1] != answer:
            first, theirs = heard[run_id]
            raise aiosentinel.MasterNotFoundError(
                f"sentinels {first} and {name} report the same run id {run_id} but answer differently for "
                f"{service_name!r} ({first}: {_said(theirs)}; {name}: {_said(answer)}): a spoofed run id or two "
                "sentinels sharing one sentinel.conf; refusing to pick a master (list each sentinel once, with its "
                "own run id)"
            )
        if same_place is not None:
            said.append(f"{name}: the same address as {same_place}, counted once")
        elif run_id is None and isinstance(answer, tuple):
            said.append(
                f"{name}: {_said(answer)}, but did not report its run id (SENTINEL MYID, Redis 6.2 on, "
                "allowed by its ACL): not counted"
            )
        elif run_id is not None and run_id in heard:
            said.append(f"{name}: the same sentinel as {heard[run_id][0]}, counted once")
        else:
            if run_id is not None:
                heard[run_id] = (name, answer)
            if isinstance(answer, tuple):
                votes[answer] += 1
            said.append(f"{name}: {_said(answer)}")
    return votes, said


async def _resolved(sentinel: aioredis.Redis) -> frozenset[Address]:
    """The addresses an entry's host resolves to (``localhost`` and ``127.0.0.1`` share one); empty if none."""
    kwargs = sentinel.connection_pool.connection_kwargs
    host, port = kwargs.get("host"), kwargs.get("port")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return frozenset()
    return frozenset((str(info[4][0]), int(info[4][1])) for info in infos)


async def _run_id(sentinel: aioredis.Redis) -> str | None:
    """The sentinel's run id (``SENTINEL MYID``, Redis 6.2 on), which names the process whatever address reached it."""
    try:
        reply = await sentinel.execute_command("SENTINEL MYID")  # type: ignore[no-untyped-call]
    except (redis.exceptions.RedisError, OSError):
        return None
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
    return text or None


def _name(sentinel: aioredis.Redis) -> str:
    kwargs = sentinel.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}"


def _join(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


def _said(answer: Address | str) -> str:
    return f"names {_join(answer)}" if isinstance(answer, tuple) else answer
