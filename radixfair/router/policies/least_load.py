"""Each request to the worker with the fewest requests in flight (then the fewest tokens)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from radixfair.router.policies.base import RouteRequest, RouterPolicy, WorkerView, healthy, least_loaded
from radixfair.router.policies.config import RouterConfig


@dataclass(frozen=True)
class LeastLoadConfig(RouterConfig):
    pass


class LeastLoadPolicy(RouterPolicy):
    name = "least_load"
    config_class = LeastLoadConfig

    def select(self, request: RouteRequest, workers: Sequence[WorkerView]) -> WorkerView:
        return least_loaded(healthy(workers))
