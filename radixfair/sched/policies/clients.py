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
    def __init__(self) -> None:
        self._waiting_reqs: dict[Req, bool] = {}  # every live request -> is it waiting?
        self.waiting: Counter[str] = Counter()  # client -> waiting requests
        self.active: Counter[str] = Counter()  # client -> waiting + admitted requests
        self.total_waiting = 0

    def arrive(self, req: Req) -> bool:
        """Record an arrival (new, or re-queued after a retraction); True if the client had
        nothing waiting before it."""
        u = req.client_id
        was_waiting = self._waiting_reqs.get(req)
        if was_waiting:
            return False
        if was_waiting is None:
            self.active[u] += 1
        self._waiting_reqs[req] = True
        self.waiting[u] += 1
        self.total_waiting += 1
        return self.waiting[u] == 1

    def dequeue(self, req: Req) -> None:
        if self._waiting_reqs.get(req):
            self._waiting_reqs[req] = False
            self._drop_waiting(req.client_id)

    def finish(self, req: Req) -> tuple[bool, bool]:
        """Forget a request; returns (it was waiting, its client is now idle)."""
        was_waiting = self._waiting_reqs.pop(req, None)
        if was_waiting is None:
            return False, False
        u = req.client_id
        if was_waiting:
            self._drop_waiting(u)
        self.active[u] -= 1
        if self.active[u] == 0:
            del self.active[u]
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
