"""Full-jitter exponential backoff, shared by every loop that reconnects or retries (pure: no clock, no I/O)."""

from __future__ import annotations

import dataclasses
import random


@dataclasses.dataclass
class Backoff:
    initial_s: float
    max_s: float
    rng: random.Random
    attempt: int = 0

    def next_s(self) -> float:
        self.attempt += 1
        return self.rng.uniform(0, min(self.max_s, self.initial_s * 2**self.attempt))

    def reset(self) -> None:
        self.attempt = 0
