"""Who writes where: the key-prefix claims of this operator's ModuleCaches, shared by their supervisors.

A supervisor that resolved its Redis URL ``claim``s (endpoint, prefix); ``blocker`` says whether an older
ModuleCache's claim refuses it (the rule is ``prefixes.blockers``); ``running`` marks whose watcher runs, so a
winner waits until a refused one has really stopped. Every change pokes the other supervisors, which
re-evaluate: nothing here decides on its own.

At start-up an older ModuleCache may not have read its Secrets yet, so its endpoint is unknown: ``elder``
names an older, active ModuleCache whose prefix overlaps and which has not finished its first resolve
(kopf's index hands every existing ModuleCache to ``know`` before any daemon starts), and the supervisor waits
for it (bounded) rather than starting and being refused a moment later.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from modcache import keys
from modcache_operator import prefixes

Owner = prefixes.Owner


@dataclasses.dataclass(frozen=True)
class Known:
    created: str
    prefix: str
    active: bool  # not suspended, not being deleted


class Registry:
    def __init__(self) -> None:
        self._claims: dict[Owner, prefixes.Claim] = {}
        self._running: set[Owner] = set()
        self._known: dict[Owner, Known] = {}
        self._settled: set[Owner] = set()
        self._pokes: dict[Owner, Callable[[], None]] = {}
        self._blockers: dict[Owner, prefixes.Claim] | None = None

    # -- membership ---------------------------------------------------------------------------------------------

    def subscribe(self, owner: Owner, poke: Callable[[], None]) -> None:
        self._pokes[owner] = poke

    def unsubscribe(self, owner: Owner) -> None:
        self._pokes.pop(owner, None)
        self._settled.discard(owner)
        self.withdraw(owner)

    def know(self, owner: Owner, known: Known) -> None:
        if self._known.get(owner) != known:
            self._known[owner] = known
            self._changed(owner)

    def forget(self, owner: Owner) -> None:
        if self._known.pop(owner, None) is not None:
            self._changed(owner)

    # -- claims -------------------------------------------------------------------------------------------------

    def claim(self, claim: prefixes.Claim) -> None:
        self._settled.add(claim.owner)
        if self._claims.get(claim.owner) != claim:
            self._claims[claim.owner] = claim
            self._changed(claim.owner)

    def withdraw(self, owner: Owner, *, settled: bool = True) -> None:
        """No claim: suspended, refused, gone, or failing (``settled``: for a reason that will not pass by itself)."""
        if settled and owner in self._pokes:
            self._settled.add(owner)
        if self._claims.pop(owner, None) is not None:
            self._changed(owner)
        self.running(owner, False)

    def running(self, owner: Owner, running: bool) -> None:
        if running != (owner in self._running):
            (self._running.add if running else self._running.discard)(owner)
            self._changed(owner)

    # -- questions ----------------------------------------------------------------------------------------------

    def blocker(self, owner: Owner) -> prefixes.Claim | None:
        if self._blockers is None:
            self._blockers = prefixes.blockers(self._claims.values())
        return self._blockers.get(owner)

    def still_running(self, owner: Owner) -> prefixes.Claim | None:
        """A colliding claim whose watcher still runs (a refused one that has not stopped yet)."""
        mine = self._claims.get(owner)
        if mine is None:
            return None
        return next((c for o, c in self._claims.items() if o in self._running and prefixes.collide(mine, c)), None)

    def elder(self, owner: Owner, created: str, prefix: str) -> Owner | None:
        """An older active ModuleCache with an overlapping prefix whose endpoint is not known yet."""
        mine = (created, *owner)
        for other, known in self._known.items():
            unsettled = other not in self._settled and other not in self._claims
            older = (known.created, *other) < mine
            if unsettled and older and known.active and keys.prefixes_overlap(known.prefix, prefix):
                return other
        return None

    def _changed(self, by: Owner) -> None:
        self._blockers = None
        for owner, poke in list(self._pokes.items()):
            if owner != by:
                poke()
