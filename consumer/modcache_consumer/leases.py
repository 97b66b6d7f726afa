"""The leases one consumer holds, kept alive; the sweep that recovers everyone's expired ones; group commits.

``Leases`` owns two periodic tasks (each sleeps interruptibly, so ``close`` returns at once):

* **renewal**: every ``renew_interval_s`` one statement extends every lease this consumer holds (running
  executions, by their fencing token, and replies not yet sent). An id that comes back missing was taken over
  (this consumer stalled past the expiry and its execution was recovered, maybe by this consumer's own sweep):
  ``on_lost`` is told, so the run is stopped and its outcome, which fencing would refuse anyway, is not waited
  for. Those kept are passed to ``on_renewed`` with the time until which their leases are surely valid
  (``safe_until``): the executor lets their runs go on that long and kills them then, so a consumer that stalls
  without dying cannot have its runs outlive their leases (attack-10 F1);
* **sweep**: every ``sweep_interval_s`` (with jitter, so replicas spread out) one statement applies the crash
  policy to rows whose lease expired (``executions.sweep``); ``on_recovered`` republishes or replies. So an
  expired lease is noticed within one sweep interval even if no message is ever redelivered.

``Batcher`` is a group commit: callers ``submit`` one item and await its result; items that arrive while a
flush runs go into the next one. Idle, a submit is flushed at once (no added latency); busy, N outcomes cost
one statement instead of N. A batch that fails other than by an outage is flushed again item by item: one
outcome the database refuses spoils only its own.

"Replied" marks (``mark_replied``) ride along with the next outcome flush (the same statement): a mark waits
up to ``mark_delay_s`` for one and is flushed alone only if none came. Busy, an execution costs one write after
its run (its outcome, carrying the previous execution's mark) instead of two; idle, the mark is written
``mark_delay_s`` later, which nobody waits for (the reply went out already; the lease is renewed meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from modcache import errors
from modcache_consumer import database, executions, messages

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741  # an item submitted
O = TypeVar("O")  # noqa: E741  # its result

Recover = Callable[[list[executions.Recovered]], Awaitable[None]]
Renewed = Callable[[set[uuid.UUID], float], Awaitable[None]]


def clock() -> float:
    """The clock lease deadlines are told in: CLOCK_BOOTTIME, which the consumer and its executor (same host,
    same kernel) share and which, unlike CLOCK_MONOTONIC, counts a suspended machine's time (the database's
    clock went on meanwhile). Deadlines are absolute, so a message that waits in a socket does not move them
    (attack-10b N9)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def safe_until(started: float, lease_s: float) -> float:
    """Until when (``clock``) a lease taken or renewed by a statement sent at ``started`` (``clock``) is surely
    still valid: the database set its expiry to its own ``now()`` (no earlier than ``started``) + ``lease_s``;
    the margin covers killing a run and the clocks' drift over one lease, so no run outlives its lease."""
    return started + lease_s - min(5.0, lease_s * 0.2)


async def _nothing_renewed(kept: set[uuid.UUID], until: float) -> None:
    return None


class Batcher(Generic[I, O]):
    def __init__(self, flush: Callable[[list[I]], Awaitable[Sequence[O]]], *, max_batch: int = 200) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._pending: list[tuple[I, asyncio.Future[O]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: I) -> O:
        future: asyncio.Future[O] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return await asyncio.shield(future)  # a cancelled caller does not cancel the others' flush

    async def close(self) -> None:
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
                await self._flush_one(batch)
        finally:
            self._task = None

    async def _flush_one(self, batch: list[tuple[I, asyncio.Future[O]]]) -> None:
        """Flush ``batch``; if it fails for a reason other than an outage, flush its items one by one, so an
        item the database refuses fails only its own caller (attack-8b A3), not everyone batched with it."""
        try:
            results = await self._flush([item for item, _ in batch])
        except Exception as e:
            if len(batch) > 1 and not isinstance(e, errors.TransientError):
                log.warning("a batch of %d failed (%s); flushing its items one by one", len(batch), errors.describe(e))
                for one in batch:
                    await self._flush_one([one])
                return
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
                    future.exception()  # retrieved here: a caller that went away must not warn
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


class Leases:
    def __init__(
        self,
        *,
        database: database.Database,
        terms: executions.Terms,
        renew_interval_s: float,
        sweep_interval_s: float,
        on_recovered: Recover,
        on_lost: Callable[[uuid.UUID], None],
        on_renewed: Renewed = _nothing_renewed,
        mark_delay_s: float = 0.02,
    ) -> None:
        self.terms = terms
        self._mark_delay_s = mark_delay_s
        self._marks: list[tuple[uuid.UUID, asyncio.Future[None]]] = []  # replied, to be marked so
        self._marking: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()  # outcome and mark flushes take turns: one connection for both
        self._database = database
        self._renew_interval_s = renew_interval_s
        self._sweep_interval_s = sweep_interval_s
        self._on_recovered = on_recovered
        self._on_lost = on_lost
        self._on_renewed = on_renewed
        self._held: dict[uuid.UUID, int | None] = {}
        self._waiting: dict[
            uuid.UUID, tuple[executions.Target, ...]
        ] = {}  # from outcome flushes, until replied  # id -> its run's lease token (None: a reply owed)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.outcomes: Batcher[tuple[executions.Lease, messages.Outcome], bool] = Batcher(self._record)

    def hold(self, execution_id: uuid.UUID, token: int | None = None) -> None:
        """Renew this lease from now on: a run's (``token``: its fencing token) or a finished execution's whose
        reply is owed (no token)."""
        self._held[execution_id] = token

    def drop(self, execution_id: uuid.UUID) -> None:
        self._held.pop(execution_id, None)

    def token(self, execution_id: uuid.UUID) -> int | None:
        """The fencing token of the run this consumer holds a lease for (None: no run of it held here)."""
        return self._held.get(execution_id)

    @property
    def held(self) -> frozenset[uuid.UUID]:
        return frozenset(self._held)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._every(self._renew_interval_s, self.renew, jitter=0.0)),
            asyncio.create_task(self._every(self._sweep_interval_s, self.sweep, jitter=0.2)),
        ]

    async def close(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.outcomes.close()
        if self._marking is not None:
            await asyncio.gather(self._marking, return_exceptions=True)
        await self._marks_now()

    async def mark_replied(self, execution_id: uuid.UUID) -> None:
        """The reply of ``execution_id`` was sent: mark it so (with the next outcome flush, or alone after
        ``mark_delay_s``), which ends its lease. Raises TransientError if the mark could not be written."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._marks.append((execution_id, future))
        if self._marking is None:
            self._marking = asyncio.create_task(self._marks_alone())
        await asyncio.shield(future)

    async def release(self) -> None:
        """Expire every lease still held now (this consumer stops): the next sweep anywhere recovers them.
        Marks still waiting for an outcome flush are written first (those replies are sent: nothing is owed)."""
        await self._marks_now()
        held, self._held = list(self._held), {}
        if held:
            await self._database.run(lambda db: executions.release(db, held, owner=self.terms.owner), autocommit=True)

    async def renew(self) -> None:
        wanted = dict(self._held)
        if not wanted:
            return
        started = clock()
        seen = await self._database.run(lambda db: executions.renew(db, wanted, terms=self.terms), autocommit=True)
        kept = {execution_id for execution_id, ours in seen.items() if ours}
        for lost in seen.keys() - kept:  # a row locked by someone else is neither: its lease waits for the next round
            if self._held.get(lost, -1) == wanted[lost]:  # not dropped or re-held meanwhile
                log.warning("execution %s: lease lost (taken over after it expired); stopping its run", lost)
                self._held.pop(lost, None)
                self._on_lost(lost)
        await self._on_renewed(kept, safe_until(started, self.terms.lease_s))

    async def sweep(self) -> None:
        recovered = await self._database.run(lambda db: executions.sweep(db, terms=self.terms), autocommit=True)
        if recovered:
            for item in recovered:
                log.warning(
                    "execution %s: its lease expired while %s (attempt %d); %s",
                    item.record.id,
                    item.previous_status.value,
                    item.record.attempt,
                    item.action.value,
                )
                if item.action is executions.Action.REPLY:  # a republished retry's lease just expires
                    self._held[item.record.id] = None
            await self._on_recovered(recovered)

    async def _every(self, interval_s: float, work: Callable[[], Awaitable[None]], *, jitter: float) -> None:
        while not self._stop.is_set():
            delay = interval_s * (1 + random.uniform(-jitter, jitter))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                return
            try:
                await work()
            except errors.TransientError as e:
                log.warning("lease %s skipped: %s", getattr(work, "__name__", "work"), e)
            except Exception:
                log.exception("lease %s failed", getattr(work, "__name__", "work"))

    async def _record(self, batch: list[tuple[executions.Lease, messages.Outcome]]) -> list[bool]:
        marks, self._marks = self._marks, []
        ids = [execution_id for execution_id, _ in marks]
        try:
            async with self._writing:
                recorded = await self._database.raw(
                    lambda db: executions.finish_leased_waiting(db, batch, terms=self.terms, replied=ids)
                )
        except BaseException:
            self._marks[:0] = marks  # the outcomes' callers retry theirs; the marks get their own flush
            if marks and self._marking is None:
                self._marking = asyncio.create_task(self._marks_alone())
            raise
        self._marked(marks)
        self._waiting.update((execution_id, found) for execution_id, found in recorded.items() if found)
        return [lease.execution_id in recorded for lease, _ in batch]

    def waiting(self, execution_id: uuid.UUID) -> tuple[executions.Target, ...]:
        """The other callers waiting for the reply of ``execution_id``, as its outcome's flush returned them (once)."""
        return self._waiting.pop(execution_id, ())

    async def _marks_alone(self) -> None:
        """Marks no outcome flush took along within ``mark_delay_s``: written by themselves. At once when no
        other lease is held: no outcome is coming to take them along (idle; the write is then done before the
        next message's claim commits, instead of sharing its WAL flush)."""
        try:
            while self._marks and not self._stop.is_set():
                if len(self._held) > len(self._marks):  # something else runs: its outcome may take them along
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), self._mark_delay_s)
                await self._marks_now()
        finally:
            self._marking = None

    async def _marks_now(self) -> None:
        async with self._writing:
            marks, self._marks = self._marks, []
            if marks:
                await self._write_marks(marks)

    async def _write_marks(self, marks: list[tuple[uuid.UUID, asyncio.Future[None]]]) -> None:
        ids = [execution_id for execution_id, _ in marks]
        try:
            await self._database.raw(lambda db: executions.mark_replied(db, ids, owner=self.terms.owner))
        except Exception as e:
            for _, future in marks:
                if not future.done():
                    future.set_exception(e)
                    future.exception()  # retrieved here: a caller that went away must not warn
            return
        self._marked(marks)

    def _marked(self, marks: list[tuple[uuid.UUID, asyncio.Future[None]]]) -> None:
        for execution_id, future in marks:
            self._held.pop(execution_id, None)
            if not future.done():
                future.set_result(None)
