"""Power of two choices: the less loaded of two healthy workers drawn at random. Nearly as even
as least-load with far less herding when many routers act on stale loads."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from radixfair.config_flags import flag
from radixfair.router.policies.base import RouteRequest, RouterPolicy, WorkerView, healthy, least_loaded
from radixfair.router.policies.config import RouterConfig


@dataclass(frozen=True)
class PowerOfTwoConfig(RouterConfig):
    seed: int | None = flag(None, "seed of power_of_two's random draws", none_means="unseeded")


class PowerOfTwoPolicy(RouterPolicy):
    name = "power_of_two"
    config_class = PowerOfTwoConfig

    def __init__(self, config: PowerOfTwoConfig | None = None) -> None:
        super().__init__(config)
        self._rng = random.Random(self.config.seed)

    def select(self, request: RouteRequest, workers: Sequence[WorkerView]) -> WorkerView:
        hs = healthy(workers)
        if len(hs) == 1:
            return hs[0]
        a, b = self._rng.sample(range(len(hs)), 2)
        return least_loaded([hs[min(a, b)], hs[max(a, b)]])
