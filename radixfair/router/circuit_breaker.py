"""A circuit breaker per worker: after `failure_threshold` failed requests in a row the worker gets
no requests for `timeout_secs` (open); then requests may try it again (half-open), and
`success_threshold` successes in a row close the breaker, while one failure opens it again."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.Enum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    def __init__(self, failure_threshold: int, success_threshold: int, timeout_secs: float, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.timeout_secs = timeout_secs
        self.enabled = enabled
        self.clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0  # in a row
        self._successes = 0  # in a row, while half-open
        self._opened_at = 0.0
        self.opened = 0  # times it opened

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self.clock() - self._opened_at >= self.timeout_secs:
            self._state = BreakerState.HALF_OPEN
            self._successes = 0
        return self._state

    def allows(self) -> bool:
        return not self.enabled or self.state is not BreakerState.OPEN

    def record(self, ok: bool) -> None:
        state = self.state
        if ok:
            self._failures = 0
            if state is BreakerState.HALF_OPEN:
                self._successes += 1
                if self._successes >= self.success_threshold:
                    self._state = BreakerState.CLOSED
            return
        self._failures += 1
        if state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._state = BreakerState.OPEN
            self._opened_at = self.clock()
            self._failures = 0
            self.opened += 1
