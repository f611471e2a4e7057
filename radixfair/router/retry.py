"""When to retry a request on another worker, and how long to wait first."""

from __future__ import annotations

import random
from dataclasses import dataclass

# a worker that is overloaded (429) or failing (5xx) may do better on the next try elsewhere; a
# 4xx other than 429 is the caller's fault and would fail anywhere
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


def retryable(status: int) -> bool:
    return status in RETRYABLE_STATUS


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: retry k (from 1) waits initial * multiplier**(k-1), capped at
    `max_ms`, times a random factor in [1 - jitter, 1 + jitter]."""

    initial_ms: float
    max_ms: float
    multiplier: float
    jitter: float

    def delay_secs(self, retry: int, rng: random.Random | None = None) -> float:
        base = min(self.initial_ms * self.multiplier ** max(retry - 1, 0), self.max_ms)
        r = (rng or random).uniform(1 - self.jitter, 1 + self.jitter)
        return max(base * r, 0.0) / 1000.0
