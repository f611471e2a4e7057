"""Which client has requests waiting or running: what fair policies need to know who is backlogged
(VTC's counter lift, DLPM's refill) and who went idle (DLPM's idle rule)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

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
