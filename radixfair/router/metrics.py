"""The router's Prometheus series, read from `RouterState` at scrape time (one source of truth: the
counters the router routes by are the ones it shows)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from radixfair.router.state import RouterState


class RouterCollector(Collector):
    def __init__(self, state: RouterState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s = self.state
        workers = list(s.workers.values())
        requests = CounterMetricFamily("radixfair_router_requests", "requests sent to each worker", labels=["worker"])
        in_flight = GaugeMetricFamily("radixfair_router_requests_in_flight", "requests at each worker, not finished",
                                      labels=["worker"])
        failed = CounterMetricFamily("radixfair_router_worker_failures",
                                     "requests that failed at each worker (connection error, 5xx, broken stream)",
                                     labels=["worker"])
        healthy = GaugeMetricFamily("radixfair_router_worker_healthy", "1 while health checks pass", labels=["worker"])
        breaker = GaugeMetricFamily("radixfair_router_circuit_breaker_state",
                                    "each worker's circuit breaker: 0 closed, 1 open, 2 half-open", labels=["worker"])
        index = GaugeMetricFamily("radixfair_router_prefix_index_tokens",
                                  "tokens in the router's prefix index of each worker", labels=["worker"])
        service = CounterMetricFamily("radixfair_router_client_service",
                                      "service (w_in x uncached prompt + w_out x output tokens) each worker gave "
                                      "each client", labels=["worker", "client"])
        tree = getattr(s.policy, "index", None)
        for w in workers:
            requests.add_metric([w.url], w.dispatched)
            in_flight.add_metric([w.url], w.requests)
            failed.add_metric([w.url], w.failed)
            healthy.add_metric([w.url], 1.0 if w.healthy else 0.0)
            breaker.add_metric([w.url], w.breaker.state.value)
            if tree is not None:
                index.add_metric([w.url], tree.size(w.url))
            for client, v in sorted(w.service.items()):
                service.add_metric([w.url, client], v)
        yield from (requests, in_flight, failed, healthy, breaker, service)
        if tree is not None:
            yield index
        decisions = CounterMetricFamily("radixfair_router_decisions", "routing decisions by the branch taken",
                                        labels=["policy", "branch"])
        for branch, n in sorted(s.policy.decisions.items()):
            decisions.add_metric([s.policy.name, branch], n)
        yield decisions
        responses = CounterMetricFamily("radixfair_router_responses", "answers to clients by route and status",
                                        labels=["route", "status"])
        for (route, status), n in sorted(s.requests.items()):
            responses.add_metric([route, str(status)], n)
        yield responses
        yield CounterMetricFamily("radixfair_router_retries", "requests retried on another worker", value=s.retries)
        yield CounterMetricFamily("radixfair_router_stream_errors", "streams that lost their worker",
                                  value=s.stream_errors)
        yield GaugeMetricFamily("radixfair_router_queue_waiting", "requests waiting for a place at the workers",
                                value=s.queue.waiting)
        yield CounterMetricFamily("radixfair_router_queue_refused", "requests refused with 429 by the queue",
                                  value=s.queue.refused)


class RouterMetrics:
    def __init__(self, state: RouterState) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(RouterCollector(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)
