"""Each request to the next healthy worker in turn: the baseline every other policy must beat."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from radixfair.router.policies.base import NoHealthyWorkerError, RouteRequest, RouterPolicy, WorkerView
from radixfair.router.policies.config import RouterConfig


@dataclass(frozen=True)
class RoundRobinConfig(RouterConfig):
    pass


class RoundRobinPolicy(RouterPolicy):
    name = "round_robin"
    config_class = RoundRobinConfig

    def __init__(self, config: RoundRobinConfig | None = None) -> None:
        super().__init__(config)
        self._next = 0

    def select(self, request: RouteRequest, workers: Sequence[WorkerView]) -> WorkerView:
        n = len(workers)
        for step in range(n):
            w = workers[(self._next + step) % n]
            if w.healthy:
                self._next += step + 1
                return w
        raise NoHealthyWorkerError(f"no healthy worker among {n}")
