"""The live fairness view: what `GET /fairness` returns and `/dashboard` draws.

A worker (the server) or a router hands `FairnessView` snapshots of its clients' cumulative charged
service, queues and policy state (`FairnessSnapshot`, from any `FairnessSource`), and tells it about
finished requests (`observe`). The view keeps a bounded history of those snapshots and turns them
into rates over the last `window_s` seconds, a service-over-time series for the chart, latency
percentiles and the "behind" flag. It is pure Python over plain values: the server builds snapshots
from its engine's stats, a router from its workers' reports, and both serve `report(...)` as JSON.

"Behind": a client with requests waiting whose service per unit weight over the window trails the
best-served waiting client's by more than the policy's bound (`fairness_bound`, DESIGN.md: VTC
keeps two continuously backlogged clients within 2U, DLPM within 2(U + Q)). Clients are compared
only while both wait now, an approximation of "continuously backlogged over the window".
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from radixfair.io_struct import ClientStats
from radixfair.metrics.fairness import percentile

DEFAULT_WINDOW_S = 60.0
DEFAULT_HISTORY_S = 600.0
MAX_HISTORY_POINTS = 240  # points per client in `history` (older samples are merged)
LATENCY_SAMPLES = 512  # finished requests kept per client for the percentiles
MAX_SAMPLE_INTERVAL_S = 2.0


def fairness_bound(policy: str, w_in: float, w_out: float, quantum: float, max_input_len: int,
                   max_batch_tokens: int) -> float:
    """The service gap (charged tokens) a policy allows between two continuously backlogged
    clients: VTC 2U, DLPM 2(U + Q), with U = max(w_in * max_input_len, w_out * max_batch_tokens).
    Policies without a fairness guarantee (fcfs, lpm, dfs-weight) are held to VTC's 2U: the gap a
    fair policy would keep."""
    u = max(w_in * max_input_len, w_out * max_batch_tokens)
    return 2.0 * (u + quantum) if policy == "dlpm" else 2.0 * u


@dataclass(frozen=True)
class FairnessSnapshot:
    """One reading of a scheduler (or of a router's view of its workers)."""

    time: float  # time.monotonic() of the reading
    policy: str
    quantum: float | None  # DLPM's quantum; None for a policy that has none
    balance: str  # what ClientStats.balance is: "deficit", "counter" or ""
    bound: float  # fairness_bound(...) for this policy and configuration
    input_tokens: int  # cumulative prompt tokens admitted
    cached_tokens: int  # of which served from the cache
    decode_tokens: int  # cumulative output tokens
    kv_used: float | None  # share of the KV pool in use, 0..1 (a router's: of the workers that report it; or None)
    clients: tuple[ClientStats, ...]
    weights: Mapping[str, float] = field(default_factory=dict)  # client -> weight (absent: 1)
    # a client with requests running counts as backlogged too: a router's "running" are in flight at
    # the workers, where they may as well be waiting in a queue it cannot see
    running_backlogged: bool = False


class FairnessSource(Protocol):
    """Anything that can be read for the fairness view: a worker's engine, a router."""

    def fairness_snapshot(self) -> FairnessSnapshot: ...


class _Sample(NamedTuple):
    time: float
    service: dict[str, float]  # client -> cumulative charged service (the clients kept, see `sample`)
    complete: bool  # every client the source listed was kept: one absent then had no service yet
    input_tokens: int
    cached_tokens: int
    decode_tokens: int


class _Finished(NamedTuple):
    time: float
    prompt: int
    cached: int
    ttft: float | None
    e2e: float


class FairnessView:
    """Thread-safe: `sample` and `observe` may come from any thread, `report` from another."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, history_s: float = DEFAULT_HISTORY_S,
                 max_clients: int = 32) -> None:
        if not window_s > 0 or not history_s >= window_s:
            raise ValueError(f"need 0 < window_s <= history_s, got {window_s}, {history_s}")
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        self.window_s = window_s
        self.history_s = history_s
        self.max_clients = max_clients
        # about 30 samples per window, at most one every 2 s; readings closer together than most of
        # an interval are not kept, so that a rate is never a difference over a few milliseconds
        self.interval_s = min(MAX_SAMPLE_INTERVAL_S, max(window_s / 30.0, 0.1))
        self._samples: deque[_Sample] = deque()
        self._finished: dict[str, deque[_Finished]] = {}
        self._latest: FairnessSnapshot | None = None
        self._lock = threading.Lock()

    @property
    def latest(self) -> FairnessSnapshot | None:
        """The newest snapshot sampled: what a reader may report without reading the source again."""
        with self._lock:
            return self._latest

    # ---- input ---------------------------------------------------------------------------------
    def sample(self, snap: FairnessSnapshot) -> None:
        """Record a snapshot's cumulative service. Each sample keeps at most `max_clients` clients
        (those with requests in the system first, then the most served), so memory stays bounded
        however many client ids callers invent."""
        kept = _shown(snap.clients, self.max_clients)
        s = _Sample(snap.time, {c.client: c.service for c in kept}, len(kept) == len(snap.clients),
                    snap.input_tokens, snap.cached_tokens, snap.decode_tokens)
        with self._lock:
            if self._latest is None or snap.time >= self._latest.time:
                self._latest = snap
            if self._samples and s.time < self._samples[-1].time + 0.8 * self.interval_s:
                return  # too close to the last one (or out of order: two readers raced)
            self._samples.append(s)
            while self._samples and self._samples[0].time < s.time - self.history_s:
                self._samples.popleft()

    def observe(self, client: str, prompt_tokens: int, cached_tokens: int, ttft: float | None, e2e: float,
                now: float | None = None) -> None:
        """A finished request: its prompt/cached tokens (for the client's hit rate) and latencies."""
        t = time.monotonic() if now is None else now
        with self._lock:
            q = self._finished.get(client)
            if q is None:
                if len(self._finished) >= 4 * self.max_clients:
                    # forget the client heard from least recently
                    stale = min(self._finished, key=lambda c: self._finished[c][-1].time if self._finished[c] else -1.0)
                    del self._finished[stale]
                q = self._finished[client] = deque(maxlen=LATENCY_SAMPLES)
            q.append(_Finished(t, prompt_tokens, cached_tokens, ttft, e2e))

    # ---- output --------------------------------------------------------------------------------
    def report(self, snap: FairnessSnapshot, workers: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """The `/fairness` JSON for `snap` (which is also recorded as a sample, if due). `workers`
        (a router's: `url`, `load`, `healthy`, `clients`) is passed through when given; the
        dashboard then shows a table of them."""
        self.sample(snap)
        now = snap.time
        with self._lock:
            samples = list(self._samples)
            finished = {c: [f for f in q if f.time >= now - self.window_s] for c, q in self._finished.items()}
        start = now - self.window_s
        in_window = [s for s in samples if s.time >= start and s.time <= now] or samples[-1:]
        base = in_window[0]
        span = max(now - base.time, 1e-9)
        d_input = snap.input_tokens - base.input_tokens
        d_cached = snap.cached_tokens - base.cached_tokens
        d_decode = snap.decode_tokens - base.decode_tokens
        if d_input > 0:
            hit = d_cached / d_input
        else:
            hit = snap.cached_tokens / snap.input_tokens if snap.input_tokens else 0.0
        shown = _shown(snap.clients, self.max_clients)
        rates = {c.client: _rate(c, in_window, now) for c in shown}
        backlogged = {c.client for c in shown if c.waiting > 0 or (snap.running_backlogged and c.running > 0)}
        per_weight = {c: rates[c] * span / snap.weights.get(c, 1.0) for c in backlogged}
        clients = []
        for c in shown:
            done = finished.get(c.client, [])
            ttft = [f.ttft for f in done if f.ttft is not None]
            e2e = [f.e2e for f in done]
            prompt = sum(f.prompt for f in done)
            others = [v for u, v in per_weight.items() if u != c.client]
            row: dict[str, Any] = {
                "client": c.client,
                "service_rate": rates[c.client],
                "waiting": c.waiting,
                "running": c.running,
            }
            if snap.balance:
                row[snap.balance] = c.balance
            row.update(
                hit_rate=sum(f.cached for f in done) / prompt if prompt else None,
                ttft_p50=_num(percentile(ttft, 50)), ttft_p99=_num(percentile(ttft, 99)),
                e2e_p50=_num(percentile(e2e, 50)), e2e_p99=_num(percentile(e2e, 99)),
                backlogged=c.client in backlogged,
                behind=c.client in backlogged and bool(others) and max(others) - per_weight[c.client] > snap.bound,
            )
            clients.append(row)
        out: dict[str, Any] = {
            "time": time.time(),
            "policy": snap.policy,
            "quantum": snap.quantum,
            "window_s": self.window_s,
            # prompt + output tokens per second (0 until a second reading gives a span)
            "throughput": (max(d_input, 0) + max(d_decode, 0)) / span if span > 1e-6 else 0.0,
            "hit_rate": hit,
            "kv_used": snap.kv_used,
            "balance": snap.balance or None,
            "bound": snap.bound,
            "clients": clients,
            "history": _history(samples, [c.client for c in shown], now),
        }
        if workers is not None:
            out["workers"] = [dict(w) for w in workers]
        return out


def _shown(clients: Sequence[ClientStats], limit: int) -> list[ClientStats]:
    """Clients with requests in the system first, then those charged the most; `limit` of them,
    sorted by name."""
    ranked = sorted(clients, key=lambda c: (-(c.waiting + c.running > 0), -c.service, c.client))
    return sorted(ranked[:limit], key=lambda c: c.client)


def _rate(c: ClientStats, window: Sequence[_Sample], now: float) -> float:
    """Charged service per second since the first in-window sample that knows the client, or that
    lists every client (one it lacks had none yet: it came and went between two samples). A total
    that went down (the worker forgot an idle client, or restarted) counts from zero."""
    for s in window:
        if c.client in s.service or s.complete:
            span = now - s.time
            if span <= 0:
                return 0.0
            delta = c.service - s.service.get(c.client, 0.0)
            return (delta if delta >= 0 else c.service) / span
    return 0.0


def _history(samples: Sequence[_Sample], clients: Sequence[str], now: float) -> dict[str, Any]:
    """Service rate per client between consecutive samples (merged down to `MAX_HISTORY_POINTS`),
    timed in seconds before `now`; None where a sample did not keep the client (`_rate`'s rule)."""
    step = max(1, math.ceil((len(samples) - 1) / MAX_HISTORY_POINTS))
    picked = list(samples[::step])
    if samples and picked[-1] is not samples[-1]:
        picked.append(samples[-1])
    t: list[float] = []
    rates: dict[str, list[float | None]] = {c: [] for c in clients}
    for a, b in itertools.pairwise(picked):
        dt = b.time - a.time
        if dt <= 0:
            continue
        t.append(round(b.time - now, 3))
        for c in clients:
            if c in b.service and (c in a.service or a.complete):
                d = b.service[c] - a.service.get(c, 0.0)
                rates[c].append((d if d >= 0 else b.service[c]) / dt)
            else:
                rates[c].append(None)
    return {"t": t, "service_rate": rates}


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x
