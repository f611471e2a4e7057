"""Admission: how many requests the server holds, in all and per client, before it says 429.

Counted in engine requests (a body of 3 prompts with `n: 2` is 6), from admission until every one
of them has finished or been aborted: `Ticket.release` runs on every path (a response sent, a stream
closed, an error), so the counts cannot leak. A server over its bounds refuses at once instead of
queueing work that would wait for minutes: one client cannot fill the queue, and a flood cannot grow
memory without bound.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import AsyncIterable
from dataclasses import dataclass

from radixfair.server.errors import APIError
from radixfair.server.held_stream import HeldStream

RETRY_AFTER_S = 1


@dataclass(frozen=True)
class AdmissionLimits:
    max_running_requests: int  # what the running batch takes: it does not count as queued
    max_queued_requests: int
    max_requests_per_client: int

    @property
    def capacity(self) -> int:
        return self.max_running_requests + self.max_queued_requests


class Ticket:
    """Requests held for one HTTP request; `release` (idempotent) hands them back. As a context
    manager it releases on leaving, unless a streaming response took it over (`stream`)."""

    def __init__(self, admission: Admission, client: str, n: int) -> None:
        self._admission = admission
        self.client = client
        self.n = n
        self._released = False
        self._handed_over = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(self.client, self.n)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._handed_over:
            self.release()

    def stream(self, content: AsyncIterable[bytes]) -> HeldStream:
        """An SSE response that holds the requests until it has been sent or abandoned."""
        self._handed_over = True
        return HeldStream(content, self.release)


class Admission:
    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self.in_flight = 0
        self.per_client: Counter[str] = Counter()
        self.refused = 0

    def admit(self, client: str, n: int) -> Ticket:
        """Hold `n` requests for `client`, or raise: a 400 for more than the server could ever hold
        for one client, a 429 (with Retry-After) while it holds too many."""
        lim = self.limits
        if n > lim.max_requests_per_client or n > lim.capacity:
            bound, flag = min((lim.max_requests_per_client, "--max-requests-per-client"),
                              (lim.capacity, "--max-running-requests + --max-queued-requests"))
            raise APIError(f"n: this request asks for {n} sequences (prompts x n); the server holds at most "
                           f"{bound} for one client ({flag})", param="n")
        with self._lock:
            mine = self.per_client[client]
            if mine + n > lim.max_requests_per_client:
                self.refused += 1
                raise _overloaded(f"client {client!r} has {mine} requests in flight; the limit is "
                                  f"{lim.max_requests_per_client} (--max-requests-per-client)")
            if self.in_flight + n > lim.capacity:
                self.refused += 1
                raise _overloaded(f"the server holds {self.in_flight} requests; the limit is {lim.capacity} "
                                  "(--max-running-requests + --max-queued-requests)")
            self.in_flight += n
            self.per_client[client] = mine + n
        return Ticket(self, client, n)

    def _release(self, client: str, n: int) -> None:
        with self._lock:
            self.in_flight -= n
            left = self.per_client[client] - n
            if left > 0:
                self.per_client[client] = left
            else:
                del self.per_client[client]  # an idle client costs nothing here


def _overloaded(message: str) -> APIError:
    return APIError(f"{message}: retry later", status=429, type_="rate_limit_error", code="rate_limit_exceeded",
                    headers={"Retry-After": str(RETRY_AFTER_S)})
