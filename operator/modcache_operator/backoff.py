"""Retry delays: exponential with jitter and a ceiling, never zero (so no retry path can spin).

"Equal jitter": the n-th delay is uniform in [c/2, c] with c = min(ceiling, initial * 2**n). The lower half
keeps a floor under every retry (the core's full jitter, ``modcache.backoff``, can return ~0 again and again,
which suits a reconnect but not a loop that calls the Kubernetes API); the upper half spreads replicas and
ModuleCaches that failed together. Pure: the random source is passed in.
"""

from __future__ import annotations

import dataclasses
import random


@dataclasses.dataclass
class Backoff:
    initial_s: float
    max_s: float
    rng: random.Random
    failures: int = 0

    def next_s(self) -> float:
        """The delay before the next attempt, after one more failure."""
        ceiling = min(self.max_s, self.initial_s * 2 ** min(self.failures, 30))
        self.failures += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


def jittered(period_s: float, rng: random.Random, *, spread: float = 0.2) -> float:
    """``period_s`` give or take ``spread`` of it, so periodic work of many objects does not line up."""
    return period_s * rng.uniform(1 - spread, 1 + spread)
