"""Double Deficit Longest Prefix Match: fairness, locality and load across workers
(DESIGN.md, "Scheduling across workers"; the paper's exact rule is not public, this is our
reconstruction, and the README lists which choices are ours).

The router keeps a deficit per (client, worker), D[u][w], and each worker runs `dlpm` itself (the
second deficit). To route a request r of client u:

    H = healthy workers
    if no w in H has D[u][w] > 0: D[u][w] += Q * weight(u) for every w in H (as many rounds as it
        takes for one to turn positive)
    P = {w in H : D[u][w] > 0}                  where u may still place work this round
    L = the workers in P holding the longest prefix of r, if it covers more than cache_threshold
    w* = least loaded of L (or of P when L is empty)      locality first, then load
    if w* is imbalanced against the least loaded worker of P (sgl-router's thresholds): that one
    D[u][w*] -= w_in * (prompt - prefix w* holds) + w_out * max_new_tokens     corrected on finish
    record r's prompt under w* in the prefix index

So a client that floods spends its quantum on the worker holding its prefix and spills to others
(where its prefix then gets cached too) instead of piling onto one worker, while a client with
little traffic keeps finding its prefix where it left it: with nothing in flight it keeps no credit
(D = min(D, 0), the idle rule of `dlpm`), so its next request starts a fresh round with every
worker open to it.

`decisions` counts the branches taken: "locality" (followed a useful cached prefix), "load" (no
prefix was useful), "spill" (the best prefix is on a worker where the client has spent its
quantum), "guard" (the imbalance guard overrode the choice).

State per client: a deficit per worker while the client has requests in flight or owes (a negative
deficit); a client that is idle and owes nothing is forgotten, so memory follows the active clients,
and past `max_clients` owing clients a new one is refused rather than a debt forgiven.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from radixfair.config_flags import flag
from radixfair.router.policies.base import (
    ClientLimitError,
    RouteRequest,
    RouterPolicy,
    Usage,
    WorkerView,
    healthy,
    least_loaded,
)
from radixfair.router.policies.config import (
    CacheMatch,
    ClientLimit,
    LoadBalance,
    PrefixIndexLimits,
    ServiceCosts,
    check_positive,
)
from radixfair.router.policies.worker_index import WorkerPrefixIndex

# A spill moves a client's working set of prefixes (its documents, templates, problems: 1-6k tokens
# each in the design's workloads) to another worker, which re-prefills them; the quantum is large
# against that, so a spill costs a small fraction of the work it moves (README, "Across workers",
# compares it with a quarter of it).
DEFAULT_ROUTER_QUANTUM = 65536


@dataclass(frozen=True)
class D2LPMConfig(CacheMatch, LoadBalance, PrefixIndexLimits, ServiceCosts, ClientLimit):
    router_quantum: float = flag(DEFAULT_ROUTER_QUANTUM,
                                 "d2lpm: service (in cost units) a client may place on each worker per round, "
                                 "times its weight, before it spills to other workers")

    def _check_quantum(self) -> None:
        check_positive(self, "router_quantum")


class D2LPMPolicy(RouterPolicy):
    name = "d2lpm"
    config_class = D2LPMConfig

    def __init__(self, config: D2LPMConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.index = WorkerPrefixIndex(cfg.max_tree_size, cfg.eviction_interval_secs)
        self.deficits: dict[str, dict[str, float]] = {}  # client -> worker -> D[u][w]
        self.rounds = 0  # refills, over all clients
        self._active: Counter[str] = Counter()  # client -> requests in flight
        self._inflight: dict[RouteRequest, tuple[str, float]] = {}  # -> (worker, estimated cost)
        self._matched: tuple[RouteRequest | None, dict[str, int]] = (None, {})  # select's matches, for on_dispatch

    # ---- decisions -----------------------------------------------------------------------------

    def select(self, request: RouteRequest, workers: Sequence[WorkerView]) -> WorkerView:
        cfg = self.config
        hs = healthy(workers)
        d = self._state(request.client_id)
        ids = [w.worker_id for w in hs]
        self._refill(d, ids, cfg.router_quantum * request.weight)
        open_ = [w for w in hs if d.get(w.worker_id, 0.0) > 0]  # a worker that joined mid-round waits for the next
        self.index.trim(request.time)
        matched = self.index.match(request.input_ids, ids)
        self._matched = (request, matched)
        n = len(request.input_ids)
        best_open = max(matched[w.worker_id] for w in open_)
        best_any = max(matched.values())
        useful = n > 0 and best_open / n > cfg.cache_threshold
        if useful:
            choice = least_loaded([w for w in open_ if matched[w.worker_id] == best_open])
        else:
            choice = least_loaded(open_)
        if best_any > best_open and n > 0 and best_any / n > cfg.cache_threshold:
            branch = "spill"
        else:
            branch = "locality" if useful else "load"
        lightest = least_loaded(open_)
        if choice is not lightest and cfg.imbalanced(choice.requests, lightest.requests):
            choice, branch = lightest, "guard"
        self.decisions[branch] += 1
        return choice

    def _refill(self, d: dict[str, float], ids: Sequence[str], quantum: float) -> None:
        values = [d.get(i, 0.0) for i in ids]
        if max(values) > 0:
            return
        # k rounds at once, the fewest that lift some worker above 0 (rounds in between would open
        # nothing, so this equals refilling one round at a time)
        k = min(math.floor(-v / quantum) + 1 for v in values)
        while True:
            values = [v + k * quantum for v in values]
            self.rounds += k
            if max(values) > 0:
                break
            k = 1  # only through float rounding
        d.update(zip(ids, values, strict=True))

    # ---- accounting ----------------------------------------------------------------------------

    def on_dispatch(self, request: RouteRequest, worker: WorkerView) -> None:
        cfg = self.config
        wid = worker.worker_id
        seen, matched = self._matched
        cached = matched[wid] if seen is request and wid in matched else \
            self.index.match(request.input_ids, (wid,))[wid]
        self._matched = (None, {})
        cost = request.estimated_cost(cached, cfg.w_in, cfg.w_out)
        u = request.client_id
        d = self._state(u)
        d[wid] = d.get(wid, 0.0) - cost
        self._inflight[request] = (wid, cost)
        self._active[u] += 1
        self.index.insert(wid, request.input_ids, request.time)

    def on_finish(self, request: RouteRequest, worker: WorkerView, usage: Usage | None) -> None:
        rec = self._inflight.pop(request, None)
        if rec is None:
            raise KeyError(f"on_finish for a request d2lpm did not dispatch: {request.rid!r}")
        wid, estimate = rec
        u = request.client_id
        d = self.deficits[u]
        if wid in d:  # the worker may have left meanwhile
            cfg = self.config
            d[wid] += estimate - (usage.cost(cfg.w_in, cfg.w_out) if usage is not None else 0.0)
        self._active[u] -= 1
        if self._active[u] == 0:
            del self._active[u]
            # idle: no credit kept (no burst bought by idle time), debts kept
            for k, v in d.items():
                if v > 0:
                    d[k] = 0.0
            if not any(d.values()):
                del self.deficits[u]

    def _state(self, client: str) -> dict[str, float]:
        d = self.deficits.get(client)
        if d is None:
            if len(self.deficits) >= self.config.max_clients:
                self._forget_idle()
            if len(self.deficits) >= self.config.max_clients:
                raise ClientLimitError(f"d2lpm keeps state for {len(self.deficits)} clients with work in flight or "
                                       f"a debt (max_clients); refusing new client {client!r}")
            d = self.deficits[client] = {}
        return d

    def _forget_idle(self) -> None:
        """Drop the clients with nothing in flight and no debt (say, one whose request was selected
        but never dispatched)."""
        for u in [u for u, d in self.deficits.items() if u not in self._active and min(d.values(), default=0.0) >= 0]:
            del self.deficits[u]

    balance_name = "deficit"

    def balances(self) -> dict[str, float]:
        """A client's deficits summed over the workers: what it may still place this round across
        the fleet (negative: what it owes)."""
        return {u: sum(d.values()) for u, d in self.deficits.items()}

    def quantum(self) -> float | None:
        return float(self.config.router_quantum)

    def remove_worker(self, worker_id: str) -> None:
        self.index.remove_worker(worker_id)
        for d in self.deficits.values():
            d.pop(worker_id, None)
