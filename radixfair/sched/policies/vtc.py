"""Virtual Token Counter (Sheng et al., OSDI'24): serve the client that has received the least.

Each client has a counter of weighted service: `w_in / weight` per input token when a request is
admitted (cached or not: VTC does not know about the cache) and `w_out / weight` per output token.
The client with the smallest counter among those with waiting requests gets its oldest request
admitted next. Counter lift: a client whose queue was empty rejoins at
`max(c[u], min c over clients with waiting requests)` (or the last departed client's counter when
nobody waits), so idle time earns no credit. Two continuously backlogged clients' service then
differs by at most 2U, U = max(w_in * max input len, w_out * max batch tokens).
"""

from __future__ import annotations

import heapq
import itertools
from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from radixfair.sched.policies.base import PolicyConfig, SchedulePolicy, newest_of_most_served
from radixfair.sched.policies.clients import ClientBook, ClientLimit

if TYPE_CHECKING:
    from radixfair.sched.request import Req

_Key = tuple[float, int, int]  # arrival time, arrival seq, uid


class _Fifo:
    """One client's waiting requests, oldest first (a retracted request keeps its old place)."""

    def __init__(self) -> None:
        self.keys: list[_Key] = []
        self.reqs: list[Req] = []

    def add(self, key: _Key, req: Req) -> None:
        i = bisect_left(self.keys, key)
        self.keys.insert(i, key)
        self.reqs.insert(i, req)

    def remove(self, key: _Key) -> None:
        i = bisect_left(self.keys, key)
        del self.keys[i]
        del self.reqs[i]


class VTCPolicy(SchedulePolicy):
    name = "vtc"

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        self.counters: dict[str, float] = {}
        self.book = ClientBook(self.config.weight)
        self.batch_slots = 1 << 30  # until the scheduler says
        self._fifos: dict[str, _Fifo] = {}
        self._keys: dict[Req, _Key] = {}
        self._uids = itertools.count()
        self._last_left: str | None = None
        self._last_left_counter = 0.0  # its counter, once it is forgotten
        self.limit = ClientLimit(self.config.max_clients)

    def _floor(self) -> float | None:
        """Where a client rejoining now is lifted to: the smallest counter among clients with waiting
        requests, else the last departed client's counter (None before anyone left)."""
        waiting = [self.counters[v] for v in self.book.waiting]
        if waiting:
            return min(waiting)
        if self._last_left is None:
            return None
        return self.counters.get(self._last_left, self._last_left_counter)

    def client_for(self, client_id: str) -> str:
        return self.limit.resolve(client_id, client_id in self.counters, len(self.counters), self._prune)

    def _prune(self) -> int:
        """Forget idle clients at or below the floor: one returning is lifted to the floor, which
        never falls, so it rejoins where it would have anyway. A counter above the floor is kept, so
        forgetting never forgives service received."""
        floor = self._floor()
        floor = 0.0 if floor is None else floor
        gone = [u for u, c in self.counters.items() if c <= floor and u not in self.book.active]
        for u in gone:
            if u == self._last_left:
                self._last_left_counter = self.counters[u]
            del self.counters[u]
            self._fifos.pop(u, None)
        return len(gone)

    def balances(self) -> tuple[str, Mapping[str, float]]:
        return "counter", dict(self.counters)

    def retract_victim(self, running: Sequence[Req]) -> Req:
        return newest_of_most_served(running, lambda u: self.counters.get(u, 0.0))

    def on_arrival(self, req: Req) -> None:
        u = req.client_id
        if self.book.arrive(req):
            floors = [self.counters.get(v, 0.0) for v in self.book.waiting if v != u]
            if not floors and self._last_left is not None:
                floors = [self.counters.get(self._last_left, self._last_left_counter)]
            if floors:
                self.counters[u] = max(self.counters.get(u, 0.0), min(floors))
        self.counters.setdefault(u, 0.0)
        key = (req.arrival_time, req.arrival_seq, next(self._uids))
        self._keys[req] = key
        self._fifos.setdefault(u, _Fifo()).add(key, req)

    def order(self, waiting: Sequence[Req]) -> Iterator[Req]:
        return self._picks()

    def set_batch_slots(self, max_running_requests: int) -> None:
        self.batch_slots = max_running_requests if self.config.row_share else 1 << 30

    def may_admit(self, req: Req) -> bool:
        u = req.client_id
        if self.book.within_batch_share(u, self.batch_slots):
            return True
        # the row shares never hold back the client with the smallest counter: VTC's bound on the
        # service gap rests on always serving that client first
        c = self.counters
        return c[u] <= min(c[v] for v in self.book.waiting)

    def _picks(self) -> Iterator[Req]:
        """Smallest counter first, re-decided after every pick: the counters move as the batch
        builder admits (on_admit), so this is a generator rather than a sorted list."""
        queues = {u: list(f.reqs) for u, f in self._fifos.items() if f.reqs}
        pos = dict.fromkeys(queues, 0)
        c = self.counters
        heap = [(c[u], q[0].arrival_time, q[0].arrival_seq, u) for u, q in queues.items()]
        heapq.heapify(heap)
        while heap:
            cu, t, seq, u = heap[0]
            if cu != c[u]:  # counters only grow, so a stale entry is re-filed, never lost
                heapq.heapreplace(heap, (c[u], t, seq, u))
                continue
            heapq.heappop(heap)
            q = queues[u]
            yield q[pos[u]]
            pos[u] += 1
            if pos[u] < len(q):
                nxt = q[pos[u]]
                heapq.heappush(heap, (c[u], nxt.arrival_time, nxt.arrival_seq, u))

    def _leave_queue(self, req: Req) -> None:
        key = self._keys.pop(req, None)
        if key is not None:
            self._fifos[req.client_id].remove(key)
        if self.book.total_waiting == 0:
            self._last_left = req.client_id

    def on_dequeue(self, req: Req) -> None:
        self.book.dequeue(req)
        self._leave_queue(req)

    def on_admit(self, req: Req, extend_len: int, cached_len: int) -> None:
        self.counters[req.client_id] += self.config.w_in * (extend_len + cached_len) / self.config.weight(req)
        self.book.admit(req)

    def on_decode(self, req: Req, n_tokens: int) -> None:
        self.counters[req.client_id] += self.config.w_out * n_tokens / self.config.weight(req)

    def on_finish(self, req: Req) -> None:
        was_waiting, _ = self.book.finish(req)
        if was_waiting:
            self._leave_queue(req)
