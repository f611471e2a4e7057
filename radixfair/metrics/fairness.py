"""Fairness, latency and cache metrics over per-request records and per-client service events.

Pure Python + numpy, so the benchmarks, the server and the simulator all compute the same figures.
Times are seconds on any one clock (the caller picks the origin); service is in charged tokens:
`w_in` per uncached input token plus `w_out` per output token, the cost the fair policies account.

A client is *backlogged* over a window when it has a request waiting or running for the whole
window. Fairness is only meaningful among backlogged clients: a client that asks for little is
not wronged by receiving little, so every difference and index here is taken over them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from radixfair.metrics.service import W_IN, W_OUT, charged_service

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class RequestRecord:
    """One request as a client saw it. `first_token` / `finish` are None when the request had not
    reached that point when measurement stopped (it then stays in the system up to the end)."""

    client: str
    arrival: float
    first_token: float | None
    finish: float | None
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    def charged(self, w_in: float = W_IN, w_out: float = W_OUT) -> float:
        # nothing is charged for input until the prefill produced a token: before that the cached
        # count is unknown and the work may still be undone at a cutoff
        if self.first_token is None:
            return 0.0
        return charged_service(self.uncached_tokens, self.output_tokens, w_in, w_out)


class ServiceEvent(NamedTuple):
    time: float
    client: str
    amount: float  # charged tokens delivered at `time`


class LatencyStats(NamedTuple):
    """Percentiles over finished requests (NaN when there are none)."""

    n: int  # finished requests
    e2e_p50: float
    e2e_p99: float
    ttft_p50: float
    ttft_p99: float


class ServiceDifference(NamedTuple):
    max: float  # NaN when no window had two backlogged clients
    mean: float
    per_window: FloatArray  # max - min service among backlogged clients; NaN where fewer than two


@dataclass(frozen=True)
class ServiceWindows:
    """Charged service and backlog per (window, client)."""

    clients: tuple[str, ...]
    edges: FloatArray  # (n_windows + 1,) window boundaries; window i is [edges[i], edges[i+1])
    service: FloatArray  # (n_windows, n_clients) charged tokens delivered in the window
    backlogged: BoolArray  # (n_windows, n_clients)

    @property
    def widths(self) -> FloatArray:
        return np.diff(self.edges)

    def rates(self) -> FloatArray:
        """Service per second in each window, (n_windows, n_clients)."""
        return self.service / self.widths[:, None]


@dataclass(frozen=True)
class FairnessReport:
    windows: ServiceWindows
    total_service: dict[str, float]  # charged tokens per client over the whole interval
    backlogged_rates: dict[str, float]  # service/s while backlogged, for the clients Jain counts
    jain: float  # over `backlogged_rates`
    service_difference: ServiceDifference
    hit_rate: float
    latency: dict[str, LatencyStats]  # per client
    overall_latency: LatencyStats


# ---- building blocks ---------------------------------------------------------------------------


def jain_index(values: Iterable[float]) -> float:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1 when all equal, 1/n when one gets all.
    NaN for no values; all zeros count as equal shares (1.0)."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return math.nan
    top = float(np.max(np.abs(x)))
    if top == 0.0:
        return 1.0
    x = x / top  # the index is scale-free; this keeps x * x from underflowing for tiny values
    return float(np.sum(x) ** 2 / (x.size * np.sum(x * x)))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, NaN for no values."""
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def window_edges(t0: float, t1: float, window: float) -> FloatArray:
    """Boundaries of consecutive `window`-second windows covering [t0, t1); the last one is shorter
    when `window` does not divide the interval, so no service at the end is dropped."""
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    if t1 <= t0:
        raise ValueError(f"empty interval [{t0}, {t1})")
    n = math.ceil((t1 - t0) / window - 1e-9)
    edges = t0 + window * np.arange(n + 1, dtype=np.float64)
    edges[-1] = t1
    return edges


def events_from_records(
    records: Iterable[RequestRecord], w_in: float = W_IN, w_out: float = W_OUT, end: float | None = None
) -> list[ServiceEvent]:
    """A service timeline for callers that only keep per-request records: the prefill (uncached input
    and the first output token) at the first-token time, later tokens evenly spaced up to the finish
    (or up to `end` for unfinished requests; at the first token when `end` is None too)."""
    events: list[ServiceEvent] = []
    per_token = charged_service(0, 1, w_in, w_out)
    for r in records:
        if r.first_token is None:
            continue
        first = charged_service(r.uncached_tokens, min(r.output_tokens, 1), w_in, w_out)
        events.append(ServiceEvent(r.first_token, r.client, first))
        rest = r.output_tokens - 1
        if rest <= 0:
            continue
        stop = r.finish if r.finish is not None else end
        if stop is None or stop <= r.first_token:
            events.append(ServiceEvent(r.first_token, r.client, charged_service(0, rest, w_in, w_out)))
            continue
        step = (stop - r.first_token) / rest
        events.extend(ServiceEvent(r.first_token + k * step, r.client, per_token) for k in range(1, rest + 1))
    return events


def service_per_window(events: Iterable[ServiceEvent], clients: Sequence[str], edges: FloatArray) -> FloatArray:
    """(n_windows, n_clients) sums of event amounts; events outside [edges[0], edges[-1]) and of
    clients not listed are ignored."""
    col = {c: i for i, c in enumerate(clients)}
    out = np.zeros((len(edges) - 1, len(clients)), dtype=np.float64)
    evs = list(events)
    if not evs:
        return out
    times = np.fromiter((ev.time for ev in evs), np.float64, len(evs))
    cols = np.fromiter((col.get(ev.client, -1) for ev in evs), np.int64, len(evs))
    amounts = np.fromiter((ev.amount for ev in evs), np.float64, len(evs))
    keep = (cols >= 0) & (times >= edges[0]) & (times < edges[-1])
    rows = np.searchsorted(edges, times[keep], side="right") - 1
    # unbuffered and in event order, so each cell sums exactly as a loop over the events would
    np.add.at(out, (rows, cols[keep]), amounts[keep])
    return out


def busy_intervals(records: Iterable[RequestRecord], end: float) -> dict[str, list[tuple[float, float]]]:
    """Per client, the merged intervals during which it had at least one request in the system
    (arrived, not finished; unfinished requests count as present up to `end`)."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        stop = r.finish if r.finish is not None else end
        spans.setdefault(r.client, []).append((r.arrival, max(stop, r.arrival)))
    merged: dict[str, list[tuple[float, float]]] = {}
    for client, items in spans.items():
        items.sort()
        out: list[tuple[float, float]] = []
        for a, b in items:
            # touching intervals merge: a request arriving the instant another finishes keeps the
            # client backlogged
            if out and a <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
        merged[client] = out
    return merged


def backlogged_per_window(
    records: Iterable[RequestRecord], clients: Sequence[str], edges: FloatArray, end: float | None = None
) -> BoolArray:
    """(n_windows, n_clients): True where one busy interval of the client covers the whole window."""
    busy = busy_intervals(records, edges[-1] if end is None else end)
    out = np.zeros((len(edges) - 1, len(clients)), dtype=np.bool_)
    for j, c in enumerate(clients):
        for a, b in busy.get(c, []):
            out[:, j] |= (edges[:-1] >= a) & (edges[1:] <= b)
    return out


def service_windows(
    records: Sequence[RequestRecord],
    events: Iterable[ServiceEvent],
    t0: float,
    t1: float,
    window: float,
    clients: Sequence[str] | None = None,
) -> ServiceWindows:
    names = tuple(clients) if clients is not None else tuple(sorted({r.client for r in records}))
    edges = window_edges(t0, t1, window)
    return ServiceWindows(
        clients=names,
        edges=edges,
        service=service_per_window(events, names, edges),
        backlogged=backlogged_per_window(records, names, edges, end=t1),
    )


def service_difference(sw: ServiceWindows) -> ServiceDifference:
    """Per window, the spread (max - min) of charged service among the clients backlogged in it."""
    per = np.full(len(sw.edges) - 1, np.nan)
    for i in range(len(per)):
        got = sw.service[i, sw.backlogged[i]]
        if got.size >= 2:
            per[i] = float(got.max() - got.min())
    valid = per[~np.isnan(per)]
    if valid.size == 0:
        return ServiceDifference(math.nan, math.nan, per)
    return ServiceDifference(float(valid.max()), float(valid.mean()), per)


def backlogged_rates(sw: ServiceWindows, min_fraction: float = 0.5) -> dict[str, float]:
    """Service per second over the windows in which each client was backlogged, for the clients
    backlogged in at least `min_fraction` of the windows. Measuring only while backlogged keeps a
    client that had nothing to ask for from dragging the index down; the floor keeps a client seen
    backlogged once from entering with a one-window rate."""
    n = sw.backlogged.shape[0]
    widths = sw.widths
    out: dict[str, float] = {}
    for j, c in enumerate(sw.clients):
        mask = sw.backlogged[:, j]
        if n == 0 or mask.sum() < min_fraction * n or not mask.any():
            continue
        out[c] = float(sw.service[mask, j].sum() / widths[mask].sum())
    return out


def hit_rate(records: Iterable[RequestRecord]) -> float:
    """Cached input tokens / input tokens over the requests admitted so far (those with a first
    token: only they have a known cached count). 0 when none was admitted."""
    cached = total = 0
    for r in records:
        if r.first_token is not None:
            cached += r.cached_tokens
            total += r.prompt_tokens
    return cached / total if total else 0.0


def latency_stats(records: Iterable[RequestRecord]) -> LatencyStats:
    done = [r for r in records if r.finish is not None]
    e2e = [r.finish - r.arrival for r in done if r.finish is not None]
    ttft = [r.first_token - r.arrival for r in done if r.first_token is not None]
    return LatencyStats(len(done), percentile(e2e, 50), percentile(e2e, 99), percentile(ttft, 50),
                        percentile(ttft, 99))


def latency_by_client(records: Iterable[RequestRecord], clients: Sequence[str] | None = None
                      ) -> dict[str, LatencyStats]:
    by: dict[str, list[RequestRecord]] = {c: [] for c in clients or ()}
    for r in records:
        by.setdefault(r.client, []).append(r)
    return {c: latency_stats(rs) for c, rs in by.items()}


def totals(events: Iterable[ServiceEvent], t0: float, t1: float) -> dict[str, float]:
    out: dict[str, float] = {}
    for ev in events:
        if t0 <= ev.time < t1:
            out[ev.client] = out.get(ev.client, 0.0) + ev.amount
    return out


# ---- all of it ---------------------------------------------------------------------------------


def fairness_report(
    records: Sequence[RequestRecord],
    events: Sequence[ServiceEvent] | None = None,
    *,
    t0: float,
    t1: float,
    window: float,
    w_in: float = W_IN,
    w_out: float = W_OUT,
    clients: Sequence[str] | None = None,
    min_backlogged_fraction: float = 0.5,
) -> FairnessReport:
    """Every metric over [t0, t1). Without `events` the service timeline is rebuilt from the records
    (`events_from_records`), which is exact per request but spreads output tokens evenly in time."""
    if events is None:
        events = events_from_records(records, w_in, w_out, end=t1)
    sw = service_windows(records, events, t0, t1, window, clients)
    got = totals(events, t0, t1)
    rates = backlogged_rates(sw, min_backlogged_fraction)
    return FairnessReport(
        windows=sw,
        total_service={c: got.get(c, 0.0) for c in sw.clients},
        backlogged_rates=rates,
        jain=jain_index(rates.values()),
        service_difference=service_difference(sw),
        hit_rate=hit_rate(records),
        latency=latency_by_client(records, sw.clients),
        overall_latency=latency_stats(records),
    )


def as_plain(stats: Mapping[str, LatencyStats]) -> dict[str, dict[str, float | int | None]]:
    """Latency stats as JSON-ready dicts (NaN -> None: JSON has no NaN)."""
    return {c: {k: _finite(v) for k, v in s._asdict().items()} for c, s in stats.items()}


def _finite(v: float | int) -> float | int | None:
    return None if isinstance(v, float) and not math.isfinite(v) else v
