"""Prometheus metrics for one app: engine gauges read at scrape time, per-client counters."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from radixfair.engine.engine import Engine

# engine stat -> (metric name, help); read from Engine.get_stats() on each scrape
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


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.gauges = {k: Gauge(name, doc, registry=self.registry) for k, (name, doc) in _GAUGES.items()}
        self.requests = Counter("radixfair_requests", "finished requests", ["client", "finish_reason"],
                                registry=self.registry)
        self.prompt_tokens = Counter("radixfair_client_prompt_tokens", "prompt tokens per client", ["client"],
                                     registry=self.registry)
        self.output_tokens = Counter("radixfair_client_output_tokens", "generated tokens per client",
                                     ["client"], registry=self.registry)

    def observe(self, client: str, out: dict[str, Any]) -> None:
        """Count one finished request's output dict."""
        meta = out.get("meta_info", {})
        fr = (meta.get("finish_reason") or {}).get("type", "unknown")
        self.requests.labels(client, fr).inc()
        self.prompt_tokens.labels(client).inc(meta.get("prompt_tokens", 0))
        self.output_tokens.labels(client).inc(meta.get("completion_tokens", 0))

    def render(self, engine: Engine) -> bytes:
        # blocking (waits on the scheduler thread): call from a threadpool handler
        stats = engine.get_stats()
        for k, g in self.gauges.items():
            g.set(float(stats[k]))
        return generate_latest(self.registry)
