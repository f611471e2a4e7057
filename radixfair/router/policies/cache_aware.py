"""sgl-router's cache-aware routing (the baseline users of SGLang know), on token ids.

The router keeps an approximate prefix tree per worker, learned from the prompts it sent there. For
each request: if the load is imbalanced (the busiest worker has more than `balance_abs_threshold`
requests in flight above the least busy and more than `balance_rel_threshold` times as many), send
it to the least loaded worker; else, if the best prefix match covers more than `cache_threshold` of
the prompt, to the worker holding it; else to the worker whose tree is smallest (the one that has
been sent the least). Either way the prompt is recorded under the chosen worker. Where several
workers hold the best match (or have equally small trees) sgl-router takes the first tenant in its
node's hash map, whatever their loads; here the first one listed, which is as load-blind and, unlike
hash order, reproducible.

`decisions` counts the branches taken: "imbalance", "cache", "smallest_tree".

Its known failure, which `d2lpm` is built to avoid: a hot client's requests all match the worker
holding its prefix, so they pile onto it until the imbalance test fires, and the clients that share
that worker wait behind them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from radixfair.router.policies.base import RouteRequest, RouterPolicy, WorkerView, healthy, least_loaded
from radixfair.router.policies.config import CacheMatch, LoadBalance, PrefixIndexLimits
from radixfair.router.policies.worker_index import WorkerPrefixIndex


@dataclass(frozen=True)
class CacheAwareConfig(CacheMatch, LoadBalance, PrefixIndexLimits):
    pass


class CacheAwarePolicy(RouterPolicy):
    name = "cache_aware"
    config_class = CacheAwareConfig

    def __init__(self, config: CacheAwareConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.index = WorkerPrefixIndex(cfg.max_tree_size, cfg.eviction_interval_secs)

    def select(self, request: RouteRequest, workers: Sequence[WorkerView]) -> WorkerView:
        cfg = self.config
        hs = healthy(workers)
        self.index.trim(request.time)
        loads = [w.requests for w in hs]
        if cfg.imbalanced(max(loads), min(loads)):
            self.decisions["imbalance"] += 1
            return least_loaded(hs)
        matched = self.index.match(request.input_ids, (w.worker_id for w in hs))
        best = max(matched.values())
        if request.input_ids and best / len(request.input_ids) > cfg.cache_threshold:
            self.decisions["cache"] += 1
            return next(w for w in hs if matched[w.worker_id] == best)
        self.decisions["smallest_tree"] += 1
        return min(hs, key=lambda w: self.index.size(w.worker_id))

    def on_dispatch(self, request: RouteRequest, worker: WorkerView) -> None:
        self.index.insert(worker.worker_id, request.input_ids, request.time)

    def remove_worker(self, worker_id: str) -> None:
        self.index.remove_worker(worker_id)
