"""Which client has requests waiting or running: what fair policies need to know who is backlogged
(VTC's counter lift, DLPM's refill) and who went idle (DLPM's idle rule)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from radixfair.sched.policies.base import OVERFLOW_CLIENT

if TYPE_CHECKING:
    from radixfair.sched.request import Req


class ClientBook:
    def __init__(self, weight: Callable[[Req], float] = lambda r: 1.0) -> None:
        self._waiting_reqs: dict[Req, bool] = {}  # every live request -> is it waiting?
        self.waiting: Counter[str] = Counter()  # client -> waiting requests
        self.active: Counter[str] = Counter()  # client -> waiting + admitted requests
        self.total_waiting = 0
        self._weight = weight
        self._active_weight: dict[str, float] = {}  # active client -> its weight when it became active
        self.active_weight = 0.0  # their sum
        # admitted in the batch being formed, still counted as waiting until the batch is dequeued
        self._admitting: set[Req] = set()
        self.admitting: Counter[str] = Counter()

    def arrive(self, req: Req) -> bool:
        """Record an arrival (new, or re-queued after a retraction); True if the client had
        nothing waiting before it."""
        u = req.client_id
        was_waiting = self._waiting_reqs.get(req)
        if was_waiting:
            return False
        if was_waiting is None:
            if self.active[u] == 0:
                w = self._active_weight[u] = self._weight(req)
                self.active_weight += w
            self.active[u] += 1
        self._waiting_reqs[req] = True
        self.waiting[u] += 1
        self.total_waiting += 1
        return self.waiting[u] == 1

    def admit(self, req: Req) -> None:
        """`req` was admitted into the batch being formed (it leaves the queue when the batch does)."""
        if self._waiting_reqs.get(req) and req not in self._admitting:
            self._admitting.add(req)
            self.admitting[req.client_id] += 1

    def _settle(self, req: Req) -> None:
        if req in self._admitting:
            self._admitting.discard(req)
            self.admitting[req.client_id] -= 1
            if self.admitting[req.client_id] == 0:
                del self.admitting[req.client_id]

    def dequeue(self, req: Req) -> None:
        self._settle(req)
        if self._waiting_reqs.get(req):
            self._waiting_reqs[req] = False
            self._drop_waiting(req.client_id)

    def finish(self, req: Req) -> tuple[bool, bool]:
        """Forget a request; returns (it was waiting, its client is now idle)."""
        self._settle(req)
        was_waiting = self._waiting_reqs.pop(req, None)
        if was_waiting is None:
            return False, False
        u = req.client_id
        if was_waiting:
            self._drop_waiting(u)
        self.active[u] -= 1
        if self.active[u] == 0:
            del self.active[u]
            self.active_weight -= self._active_weight.pop(u)
            if not self.active:
                self.active_weight = 0.0  # no float drift across idle periods
            return was_waiting, True
        return was_waiting, False

    def _drop_waiting(self, u: str) -> None:
        self.total_waiting -= 1
        self.waiting[u] -= 1
        if self.waiting[u] == 0:
            del self.waiting[u]

    def backlogged(self) -> list[str]:
        """Clients with at least one waiting request."""
        return list(self.waiting)

    def _running(self, client: str) -> int:
        """Requests of `client` that hold (or are being given) a row of the running batch."""
        return self.active[client] - self.waiting.get(client, 0) + self.admitting.get(client, 0)

    def _share(self, client: str, batch_slots: int) -> int:
        return max(1, int(batch_slots * self._active_weight.get(client, 1.0) / max(self.active_weight, 1e-9)))

    def within_batch_share(self, client: str, batch_slots: int) -> bool:
        """Whether `client` may start one more request. Deficits and counters charge decode work only
        as it happens, so without a bound a client with credit could fill the whole batch at once
        (one request with `n: 128`) and every other client's requests would wait for a free row
        until that work drains. So each active client is guaranteed its weighted share of the
        batch's `batch_slots` rows; past its share a client may still take a row, but only one that
        no client with waiting requests below its own share could claim (the rule stays
        work-conserving: rows nobody else asks for are never left idle). With fewer rows than active
        clients there is no share to guarantee: the deficits or counters alone decide."""
        if len(self.active) <= 1 or len(self.active) > batch_slots:
            return True
        running = self._running(client)
        if running < self._share(client, batch_slots):
            return True
        in_use = len(self._waiting_reqs) - self.total_waiting + len(self._admitting)
        claimable = sum(max(0, self._share(u, batch_slots) - self._running(u)) for u in self.waiting if u != client)
        return in_use + claimable < batch_slots


class ClientLimit:
    """Bounds a policy's per-client state at `max_clients`. A new client past the bound makes the
    policy forget what it can (`prune`: idle clients whose state carries nothing owed); if that
    frees nothing, new clients share `OVERFLOW_CLIENT` (and the next `max_clients // 8` new ones go
    there without another scan, so a full table of debtors costs no scan per request)."""

    def __init__(self, max_clients: int) -> None:
        self.max_clients = max_clients
        self._skip = 0
        self.overflowed = 0  # requests scheduled as the overflow client

    def resolve(self, client: str, known: bool, size: int, prune: Callable[[], int]) -> str:
        if known or size < self.max_clients:
            return client
        if self._skip == 0:
            if size - prune() < self.max_clients:
                return client
            self._skip = max(1, self.max_clients // 8)
        self._skip -= 1
        self.overflowed += 1
        return OVERFLOW_CLIENT
