"""Prometheus metrics for one engine: engine gauges read at scrape time, latency histograms and
per-client counters (requests, tokens, and the service the fair policies charge: w_in per uncached
prompt token plus w_out per output token).

Per-client series are bounded: client ids come from callers (a client that splits itself into
thousands of ids would otherwise grow the scrape, and Prometheus, without limit). The clients
charged the most service get their own series, `max_clients` of them; everyone else is added up
under `client="other"`. A client entering or leaving the top moves its totals out of or into
`other`, so that series can step down; the sum over all series is always the true total.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from radixfair.io_struct import EngineOutput, EngineStats
from radixfair.metrics.service import charged_service

# engine stat -> (metric name, help); read from the engine's stats on each scrape
_GAUGES = {
    "running": ("radixfair_num_running_reqs", "requests in the running batch"),
    "waiting": ("radixfair_num_waiting_reqs", "requests in the waiting queue"),
    "hit_rate": ("radixfair_cache_hit_rate", "share of prompt tokens served from the radix cache"),
    "free_slots": ("radixfair_kv_free_slots", "free KV pool slots"),
    "tree_tokens": ("radixfair_radix_tree_tokens", "tokens held by the radix tree"),
    "max_total_tokens": ("radixfair_kv_pool_slots", "KV pool size in tokens"),
    "input_tokens": ("radixfair_prompt_tokens_total", "prompt tokens admitted"),
    "cached_tokens": ("radixfair_cached_tokens_total", "prompt tokens served from the cache"),
    "decode_tokens": ("radixfair_generation_tokens_total", "tokens decoded"),
    "retractions": ("radixfair_retractions_total", "requests retracted for lack of KV"),
}


# seconds; SGLang's buckets for time to first token and end-to-end latency, trimmed
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 15.0, 20.0, 30.0, 60.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0, 1200.0)

OTHER = "other"
TRACKED_PER_SHOWN = 4  # clients whose totals are kept apart, per series shown


@dataclass
class ClientTotals:
    requests: dict[str, float] = field(default_factory=dict)  # finish reason -> requests
    prompt: float = 0.0
    output: float = 0.0
    cached: float = 0.0
    service: float = 0.0

    def add(self, other: ClientTotals) -> None:
        for k, v in other.requests.items():
            self.requests[k] = self.requests.get(k, 0.0) + v
        self.prompt += other.prompt
        self.output += other.output
        self.cached += other.cached
        self.service += other.service


class ClientSeries(Collector):
    """Per-client counters in bounded memory: at most `TRACKED_PER_SHOWN * max_clients` clients are
    kept apart; past that the one charged the least service is folded into `other`."""

    def __init__(self, max_clients: int) -> None:
        self.max_clients = max_clients
        self.tracked: dict[str, ClientTotals] = {}
        self.folded = ClientTotals()
        self._lock = threading.Lock()  # added to on the event loop, read by a scrape in a worker thread

    def add(self, client: str, finish_reason: str, prompt: int, output: int, cached: int, service: float) -> None:
        with self._lock:
            t = self.tracked.get(client)
            if t is None:
                if len(self.tracked) >= TRACKED_PER_SHOWN * self.max_clients:
                    smallest = min(self.tracked, key=lambda c: self.tracked[c].service)
                    self.folded.add(self.tracked.pop(smallest))
                t = self.tracked[client] = ClientTotals()
            t.requests[finish_reason] = t.requests.get(finish_reason, 0.0) + 1
            t.prompt += prompt
            t.output += output
            t.cached += cached
            t.service += service

    def series(self) -> list[tuple[str, ClientTotals]]:
        """(client, totals): the top `max_clients` by service, then `other` if anything is left."""
        with self._lock:
            return self._series()

    def _series(self) -> list[tuple[str, ClientTotals]]:
        ranked = sorted((c for c in self.tracked if c != OTHER), key=lambda c: -self.tracked[c].service)
        shown = ranked[: self.max_clients]
        other = ClientTotals()
        other.add(self.folded)
        for c in ranked[self.max_clients:]:
            other.add(self.tracked[c])
        if OTHER in self.tracked:
            other.add(self.tracked[OTHER])
        out = [(c, copy.deepcopy(self.tracked[c])) for c in shown]
        if other.requests:
            out.append((OTHER, other))
        return out

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("radixfair_requests", "finished requests", labels=["client", "finish_reason"])
        families = {
            "prompt": CounterMetricFamily("radixfair_client_prompt_tokens", "prompt tokens per client",
                                          labels=["client"]),
            "output": CounterMetricFamily("radixfair_client_output_tokens", "generated tokens per client",
                                          labels=["client"]),
            "cached": CounterMetricFamily("radixfair_client_cached_tokens",
                                          "prompt tokens served from the cache, per client", labels=["client"]),
            "service": CounterMetricFamily(
                "radixfair_client_service",
                "service charged per client: w_in * uncached prompt tokens + w_out * output tokens",
                labels=["client"]),
        }
        for client, t in self.series():
            for reason, n in sorted(t.requests.items()):
                requests.add_metric([client, reason], n)
            for name, fam in families.items():
                fam.add_metric([client], getattr(t, name))
        yield requests
        yield from families.values()


class ServerMetrics:
    def __init__(self, w_in: float, w_out: float, max_clients: int = 32) -> None:
        self.w_in, self.w_out = w_in, w_out
        self.registry = CollectorRegistry()
        self.gauges = {k: Gauge(name, doc, registry=self.registry) for k, (name, doc) in _GAUGES.items()}
        self.clients = ClientSeries(max_clients)
        self.registry.register(self.clients)
        self.ttft = Histogram("radixfair_time_to_first_token_seconds", "time to first token",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("radixfair_e2e_request_latency_seconds", "end-to-end request latency",
                             buckets=_E2E_BUCKETS, registry=self.registry)

    def observe(self, client: str, out: EngineOutput) -> None:
        """Count one request's final output (it carries the request's totals)."""
        fr = out.finish_reason.type if out.finish_reason is not None else "unknown"
        prompt, cached, output = out.prompt_tokens, out.cached_tokens, out.completion_tokens
        # output tokens a grammar forced (jump-forward) are computed, and charged, as extend tokens
        forced = out.forced_tokens
        self.clients.add(client, fr, prompt, output, cached,
                         charged_service(max(prompt - cached, 0) + forced, output - forced, self.w_in, self.w_out))
        if out.ttft is not None:
            self.ttft.observe(out.ttft)
        self.e2e.observe(out.e2e_latency)

    def render(self, stats: EngineStats) -> bytes:
        values = stats.to_dict()
        for k, g in self.gauges.items():
            g.set(float(values[k]))
        return generate_latest(self.registry)
