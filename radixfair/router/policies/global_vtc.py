"""Global VTC: a fairness-only baseline across workers. One Virtual Token Counter table over all
clients (Sheng et al., OSDI'24, as `sched/policies/vtc.py` keeps it in one worker), locality ignored.

While some worker has fewer than `max_worker_requests` requests in flight, a request goes straight to
the least loaded such worker; past that the router holds requests and, whenever a worker frees a
place, releases the oldest held request of the client with the smallest counter. A counter grows by
`(w_in * prompt + w_out * max_new_tokens) / weight` at dispatch (every prompt token: VTC does not
know about caches), corrected to the output actually produced on finish. A client with nothing held
or in flight rejoins at `max(c, min c over the clients that have)` (or at the counter of the client
that left last), so idle time earns no credit; it is forgotten when it leaves with a counter at or
below that floor (it would rejoin there anyway), kept while above it. The workers run `vtc` themselves.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
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
from radixfair.router.policies.config import ClientLimit, ServiceCosts, check_positive


@dataclass(frozen=True)
class GlobalVTCConfig(ServiceCosts, ClientLimit):
    max_worker_requests: int = flag(64, "global_vtc: requests in flight per worker past which the router holds "
                                        "requests and releases them in VTC order")

    def _check_worker_requests(self) -> None:
        check_positive(self, "max_worker_requests")


class GlobalVTCPolicy(RouterPolicy):
    name = "global_vtc"
    config_class = GlobalVTCConfig

    def __init__(self, config: GlobalVTCConfig | None = None) -> None:
        super().__init__(config)
        self.counters: dict[str, float] = {}
        self._held: dict[str, deque[tuple[int, RouteRequest]]] = {}  # client -> (seq, request), oldest first
        self._seq = itertools.count()
        self._active: Counter[str] = Counter()  # client -> requests held or in flight
        self._inflight: dict[RouteRequest, float] = {}  # -> output charged at dispatch
        self._last_left: float | None = None  # counter of the client that left the system last

    balance_name = "counter"

    def balances(self) -> dict[str, float]:
        return dict(self.counters)

    def held(self) -> int:
        return sum(len(q) for q in self._held.values())

    # ---- decisions -----------------------------------------------------------------------------

    def select(self, request: RouteRequest, workers: Sequence[WorkerView]) -> WorkerView | None:
        hs = healthy(workers)
        u = request.client_id
        self._arrive(u)
        room = [w for w in hs if w.requests < self.config.max_worker_requests]
        if room and not self._held:
            self.decisions["direct"] += 1
            return least_loaded(room)
        # hold: the counters decide who goes when a place frees up
        self.decisions["held"] += 1
        self._held.setdefault(u, deque()).append((next(self._seq), request))
        return None

    def next_held(self, workers: Sequence[WorkerView]) -> tuple[RouteRequest, WorkerView] | None:
        if not self._held:
            return None
        room = [w for w in healthy(workers) if w.requests < self.config.max_worker_requests]
        if not room:
            return None
        c = self.counters
        u = min(self._held, key=lambda v: (c[v], self._held[v][0][0]))
        queue = self._held[u]
        _, request = queue.popleft()
        if not queue:
            del self._held[u]
        return request, least_loaded(room)

    def _arrive(self, u: str) -> None:
        """VTC's counter lift, with "in the system" (held or in flight) for "queued": a client that
        had nothing there rejoins no lower than the smallest counter of those that had."""
        if not self._active[u]:
            floor = self._floor()
            if u not in self.counters:
                if len(self.counters) >= self.config.max_clients:
                    self._forget_idle()
                if len(self.counters) >= self.config.max_clients:
                    raise ClientLimitError(f"global_vtc keeps counters for {len(self.counters)} clients that are "
                                           f"active or above the floor (max_clients); refusing a new client")
                self.counters[u] = 0.0 if floor is None else floor
            elif floor is not None:
                self.counters[u] = max(self.counters[u], floor)
        self._active[u] += 1

    def _floor(self) -> float | None:
        """The smallest counter of the clients in the system, or the counter of the one that left
        it last when nobody is there."""
        c = self.counters
        return min((c[v] for v in self._active), default=self._last_left)

    # ---- accounting ----------------------------------------------------------------------------

    def on_dispatch(self, request: RouteRequest, worker: WorkerView) -> None:
        cfg = self.config
        output = cfg.w_out * request.max_new_tokens
        self._inflight[request] = output
        self.counters[request.client_id] += (cfg.w_in * len(request.input_ids) + output) / request.weight

    def on_finish(self, request: RouteRequest, worker: WorkerView, usage: Usage | None) -> None:
        cfg = self.config
        charged_output = self._inflight.pop(request, None)
        if charged_output is None:
            raise KeyError(f"on_finish for a request global_vtc did not dispatch: {request.rid!r}")
        u = request.client_id
        actual = 0.0 if usage is None else cfg.w_in * len(request.input_ids) + cfg.w_out * usage.completion_tokens
        charged = cfg.w_in * len(request.input_ids) + charged_output
        self.counters[u] += (actual - charged) / request.weight
        self._active[u] -= 1
        if self._active[u] == 0:
            del self._active[u]
            self._last_left = self.counters[u]
            floor = self._floor()
            if floor is None or self.counters[u] <= floor:
                del self.counters[u]  # it would rejoin at the floor anyway: it owes nothing

    def _forget_idle(self) -> None:
        floor = self._floor()
        for u in [u for u, c in self.counters.items() if u not in self._active and (floor is None or c <= floor)]:
            del self.counters[u]
