"""Deficit Longest Prefix Match: VTC's fairness with LPM's locality, in the manner of deficit round
robin (DESIGN.md, "Scheduling in one worker").

Each client has a deficit d[u] and a quantum Q[u] = Q * weight[u]. The batch builder walks the
queue in LPM order and admits only requests of clients with d > 0, charging w_in per uncached
prompt token (cached tokens are free: that is what keeps locality worth having) and w_out per
output token. When nothing could be admitted because every client with waiting requests is at
d <= 0, a new round gives each of them Q[u].

Idle rule: a client with nothing waiting and nothing running keeps no positive credit,
d = min(d, 0). Its debt stays: DLPM admits on d > 0 whatever the request costs, so a client can
overdraw by up to one request; forgiving that on idle (DRR's reset to 0, safe in DRR because a flow
never overdraws there) would let a client that sends one large request at a time overdraw every
round.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from radixfair.sched.policies.base import PolicyConfig, newest_of_most_served
from radixfair.sched.policies.clients import ClientBook, ClientLimit
from radixfair.sched.policies.lpm import PrefixAwarePolicy

if TYPE_CHECKING:
    from radixfair.sched.request import Req


class DLPMPolicy(PrefixAwarePolicy):
    name = "dlpm"

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        self.deficits: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.book = ClientBook(self.config.weight)
        self.batch_slots = 1 << 30  # until the scheduler says
        self.rounds = 0  # deficit rounds started so far
        self.limit = ClientLimit(self.config.max_clients)

    def quantum(self, client: str) -> float:
        return self.config.dlpm_quantum * self.weights.get(client, 1.0)

    def client_for(self, client_id: str) -> str:
        return self.limit.resolve(client_id, client_id in self.deficits, len(self.deficits), self._prune)

    def _prune(self) -> int:
        """Forget idle clients at d = 0: one returning starts at 0 anyway. A debt (d < 0) is kept,
        so forgetting never forgives it; an idle client never holds credit (the idle rule)."""
        gone = [u for u, d in self.deficits.items() if d >= 0 and u not in self.book.active]
        for u in gone:
            del self.deficits[u]
            self.weights.pop(u, None)
        return len(gone)

    def balances(self) -> tuple[str, Mapping[str, float]]:
        return "deficit", dict(self.deficits)

    def retract_victim(self, running: Sequence[Req]) -> Req:
        # furthest over its share: the lowest deficit per unit of quantum
        return newest_of_most_served(running, lambda u: -self.deficits.get(u, 0.0) / self.quantum(u))

    def on_arrival(self, req: Req) -> None:
        u = req.client_id
        self.weights[u] = self.config.weight(req)
        self.deficits.setdefault(u, 0.0)
        self.book.arrive(req)
        super().on_arrival(req)

    def order(self, waiting: Sequence[Req]) -> Iterable[Req]:
        lpm = self._lpm_order(waiting)  # a snapshot: the index may change while the pass runs
        d = self.deficits
        if all(d[u] > 0 for u in self.book.waiting):
            return lpm
        # Clients that spent their quantum sit the round out (may_admit says the same; filtering
        # here, lazily, spares the batch builder a walk over their requests: a pass usually stops
        # at its token budget long before the end of a long queue).
        return (r for r in lpm if d[r.client_id] > 0)

    def set_batch_slots(self, max_running_requests: int) -> None:
        self.batch_slots = max_running_requests if self.config.row_share else 1 << 30

    def may_admit(self, req: Req) -> bool:
        u = req.client_id
        return self.deficits[u] > 0 and self.book.within_batch_share(u, self.batch_slots)

    def refill(self, waiting: Sequence[Req]) -> bool:
        backlogged = self.book.backlogged()
        d = self.deficits
        share = self.book.within_batch_share
        if not backlogged or any(d[u] > 0 and share(u, self.batch_slots) for u in backlogged):
            return False  # something else (budget, memory) held the pass back
        # Every client with waiting requests is out of credit or holds its share of the batch's
        # rows. A new round goes to those out of credit: one that is only waiting for a row keeps
        # what it has and earns no more meanwhile (so it banks no credit while it cannot spend it),
        # and the others must not wait on it.
        broke = [u for u in backlogged if d[u] <= 0]
        if not broke:
            return False
        # k rounds at once, k the fewest that lift some client above 0: rounds in between would
        # admit nothing, so this is the same as refilling one round at a time, just bounded
        k = min(math.floor(-d[u] / self.quantum(u)) + 1 for u in broke)
        while True:
            for u in broke:
                d[u] += k * self.quantum(u)
            self.rounds += k
            if any(d[u] > 0 for u in broke):
                return True
            k = 1  # only reachable through float rounding

    def on_admit(self, req: Req, extend_len: int, cached_len: int) -> None:
        self.deficits[req.client_id] -= self.config.w_in * extend_len
        self.book.admit(req)

    def on_dequeue(self, req: Req) -> None:
        self.book.dequeue(req)
        super().on_dequeue(req)

    def on_decode(self, req: Req, n_tokens: int) -> None:
        self.deficits[req.client_id] -= self.config.w_out * n_tokens

    def on_finish(self, req: Req) -> None:
        _, idle = self.book.finish(req)
        if idle:
            u = req.client_id
            self.deficits[u] = min(self.deficits[u], 0.0)
        super().on_finish(req)
