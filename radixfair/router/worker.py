"""One worker as the router keeps it: load, health, circuit breaker, and the service it gave each
client. The counters are changed only by `Dispatch` (load) and the health checker (health)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from radixfair.router.circuit_breaker import CircuitBreaker
from radixfair.router.policies import WorkerView


@dataclass(frozen=True)
class HealthThresholds:
    failures: int  # failed checks in a row that take a worker out
    successes: int  # passed checks in a row that bring it back


@dataclass(eq=False)
class Worker:
    url: str
    breaker: CircuitBreaker
    healthy: bool = True
    requests: int = 0  # in flight: dispatched, not finished
    tokens: int = 0  # prompt + max_new_tokens of those
    dispatched: int = 0  # requests sent here, ever
    failed: int = 0  # of which ended with a connection error or a 5xx
    service: dict[str, float] = field(default_factory=dict)  # client -> service charged here
    active: Counter[str] = field(default_factory=Counter)  # client -> its requests in flight here
    kv: tuple[int, int] | None = None  # (KV tokens used, pool size) as the worker last reported them
    _fails: int = 0  # health checks failed in a row
    _oks: int = 0  # passed in a row while out

    def view(self) -> WorkerView:
        return WorkerView(self.url, self.requests, self.tokens, self.healthy and self.breaker.allows())

    def record_health(self, ok: bool, thresholds: HealthThresholds) -> bool:
        """A health check's outcome; True when it changed whether the worker is routed to."""
        if ok:
            self._fails = 0
            if not self.healthy:
                self._oks += 1
                if self._oks >= thresholds.successes:
                    self.healthy, self._oks = True, 0
                    return True
            return False
        self._oks = 0
        self._fails += 1
        if self.healthy and self._fails >= thresholds.failures:
            self.healthy = False
            return True
        return False

    def clients(self, limit: int) -> list[str]:
        """The clients this worker holds: those with requests in flight here first, then those it
        has served most (whose prefixes its cache is likeliest to keep); `limit` of them."""
        ranked = sorted(set(self.active) | set(self.service),
                        key=lambda c: (-self.active.get(c, 0), -self.service.get(c, 0.0), c))
        return ranked[:limit]

    def snapshot(self) -> dict[str, Any]:
        return {"url": self.url, "healthy": self.healthy, "circuit_breaker": self.breaker.state.name.lower(),
                "requests": self.requests, "tokens": self.tokens, "dispatched": self.dispatched,
                "failed": self.failed, "service": dict(self.service)}
