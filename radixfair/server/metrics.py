"""Prometheus metrics for one engine: engine gauges read at scrape time, latency histograms and
per-client counters (requests, tokens, and the service the fair policies charge: w_in per uncached
prompt token plus w_out per output token)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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


class ServerMetrics:
    def __init__(self, w_in: float, w_out: float) -> None:
        self.w_in, self.w_out = w_in, w_out
        self.registry = CollectorRegistry()
        self.gauges = {k: Gauge(name, doc, registry=self.registry) for k, (name, doc) in _GAUGES.items()}
        self.requests = Counter("radixfair_requests", "finished requests", ["client", "finish_reason"],
                                registry=self.registry)
        self.prompt_tokens = Counter("radixfair_client_prompt_tokens", "prompt tokens per client", ["client"],
                                     registry=self.registry)
        self.output_tokens = Counter("radixfair_client_output_tokens", "generated tokens per client",
                                     ["client"], registry=self.registry)
        self.cached_tokens = Counter("radixfair_client_cached_tokens", "prompt tokens served from the cache, per client",
                                     ["client"], registry=self.registry)
        self.service = Counter("radixfair_client_service",
                               "service charged per client: w_in * uncached prompt tokens + w_out * output tokens",
                               ["client"], registry=self.registry)
        self.ttft = Histogram("radixfair_time_to_first_token_seconds", "time to first token",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("radixfair_e2e_request_latency_seconds", "end-to-end request latency",
                             buckets=_E2E_BUCKETS, registry=self.registry)

    def observe(self, client: str, out: EngineOutput) -> None:
        """Count one request's final output (it carries the request's totals)."""
        fr = out.finish_reason.type if out.finish_reason is not None else "unknown"
        self.requests.labels(client, fr).inc()
        prompt, cached, output = out.prompt_tokens, out.cached_tokens, out.completion_tokens
        self.prompt_tokens.labels(client).inc(prompt)
        self.output_tokens.labels(client).inc(output)
        self.cached_tokens.labels(client).inc(cached)
        # output tokens a grammar forced (jump-forward) are computed, and charged, as extend tokens
        forced = out.forced_tokens
        self.service.labels(client).inc(charged_service(max(prompt - cached, 0) + forced, output - forced,
                                                        self.w_in, self.w_out))
        if out.ttft is not None:
            self.ttft.observe(out.ttft)
        self.e2e.observe(out.e2e_latency)

    def render(self, stats: EngineStats) -> bytes:
        values = stats.to_dict()
        for k, g in self.gauges.items():
            g.set(float(values[k]))
        return generate_latest(self.registry)
