"""The router's live fairness view: `GET /fairness` and `/dashboard` over the whole fleet.

The same view and page as a worker's (`metrics.live_fairness`, `server.fairness`), read from the
router's state: per client, the service charged over all workers (from the usage each answer
reports), requests waiting at the router (for a queue place, or held by the policy) and in flight,
the routing policy's deficit or counter; latencies and hit rates measured at the router; and the
workers (load, health, KV use, the clients each holds). KV use is the workers' own: each worker's
`/get_load` is read every sampling interval, and the fleet's share is used over pool size summed
over the workers that answered (null when none did).

A client with requests in flight counts as backlogged: the router cannot see whether they wait in a
worker's queue or run there. The fairness bound is the policy's over the fleet: `2U` (VTC's) for
every policy but D²LPM, whose clients may each place `Q` per worker per round before they wait for
the others, `2(U + Q * workers)`; U is the costliest request the router has routed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from radixfair.io_struct import ClientStats
from radixfair.metrics.live_fairness import FairnessSnapshot
from radixfair.router.state import RouterState
from radixfair.router.worker import Worker
from radixfair.server.fairness import every

logger = logging.getLogger(__name__)

KV_READ_TIMEOUT_S = 2.0


class RouterFairness:
    """A `FairnessSource` over a router's state; read it on the router's event loop."""

    def __init__(self, state: RouterState) -> None:
        self.state = state

    def fairness_snapshot(self) -> FairnessSnapshot:
        s = self.state
        policy = s.policy
        balances = policy.balances()
        names = set(s.service) | set(s.waiting) | set(s.running) | set(balances)
        clients = tuple(ClientStats(c, s.waiting.get(c, 0), s.running.get(c, 0), s.service.get(c, 0.0),
                                    balances.get(c) if policy.balance_name else None) for c in sorted(names))
        quantum = policy.quantum()
        u = s.max_request_cost
        bound = 2.0 * (u + quantum * len(s.workers)) if quantum is not None else 2.0 * u
        used = [w.kv for w in s.workers.values() if w.kv is not None]
        pool = sum(total for _, total in used)
        return FairnessSnapshot(
            time=time.monotonic(), policy=policy.name, quantum=quantum, balance=policy.balance_name, bound=bound,
            input_tokens=s.input_tokens, cached_tokens=s.cached_tokens, decode_tokens=s.decode_tokens,
            kv_used=sum(u for u, _ in used) / pool if pool else None, clients=clients,
            weights=s.weights, running_backlogged=True)

    def workers(self) -> list[dict[str, Any]]:
        """The `workers` of `/fairness`: url, load (requests in flight), healthy (routed to: health
        checks pass and the circuit breaker is closed), clients (`Worker.clients`), kv_used."""
        limit = self.state.fairness.max_clients
        return [{"url": w.url, "load": w.requests, "healthy": w.view().healthy, "clients": w.clients(limit),
                 "kv_used": w.kv[0] / w.kv[1] if w.kv is not None and w.kv[1] else None}
                for w in self.state.workers.values()]

    async def read_kv(self) -> None:
        """Each worker's KV use, from its `/get_load`; None for one that does not say."""
        s = self.state

        async def one(w: Worker) -> None:
            try:
                r = await s.client.get(w.url + "/get_load", headers=s.worker_headers("router"),
                                       timeout=KV_READ_TIMEOUT_S)
                r.raise_for_status()
                body = r.json()
                w.kv = (int(body["num_used_tokens"]), int(body["max_total_tokens"]))
            except (httpx.HTTPError, ValueError, TypeError, KeyError):
                w.kv = None  # unreachable, or not a radixfair worker: its KV use is unknown

        await asyncio.gather(*(one(w) for w in list(s.workers.values())))


@contextlib.asynccontextmanager
async def sampling(source: RouterFairness) -> AsyncIterator[None]:
    """While the router serves: read the workers' KV use and sample the view every interval, so that
    the service-over-time history exists before anyone opens the dashboard."""
    view = source.state.fairness

    async def step() -> None:
        await source.read_kv()
        view.sample(source.fairness_snapshot())

    async with every(view.interval_s, step):
        yield
