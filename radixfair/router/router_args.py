"""`radixfair router`'s own settings, each flag declared once here; the routing policies' settings
(`--cache-threshold`, `--balance-abs-threshold`, ...) are their configs' (`policies/config.py`).
Names follow sgl-router's where the concept is the same."""

from __future__ import annotations

from dataclasses import dataclass

from radixfair.config_flags import flag
from radixfair.router.policies import DEFAULT_ROUTER_POLICY, ROUTER_POLICIES
from radixfair.server.fairness_args import FairnessArgs
from radixfair.server.server_args import DEFAULT_CLIENT_ID_HEADERS, DEFAULT_MAX_BODY_BYTES, client_id_headers

DEFAULT_ROUTER_PORT = 30080


@dataclass(frozen=True)
class RouterArgs(FairnessArgs):
    worker_urls: tuple[str, ...] = flag((), "the workers to route to (http://host:port); more can be added at run "
                                            "time (POST /workers)", metavar="URL", many=True)
    policy: str = flag(DEFAULT_ROUTER_POLICY, "routing policy", choices=tuple(ROUTER_POLICIES))
    host: str = flag("127.0.0.1", "bind address; the default serves this machine only")
    port: int = flag(DEFAULT_ROUTER_PORT, "TCP port")
    api_key: str | None = flag(None, "require 'Authorization: Bearer KEY' from clients", exclusive="auth")
    api_keys: str | None = flag(None, 'JSON {"KEY": {"client": "alice", "weight": 2}}: per-key client identity, as '
                                      "a worker's --api-keys", metavar="FILE", exclusive="auth")
    admin_api_key: tuple[str, ...] = flag((), "an operator key: needed for worker management, /flush_cache and "
                                              "/metrics when API keys are on", metavar="KEY")
    client_id_header: str = flag(DEFAULT_CLIENT_ID_HEADERS,
                                 "headers that name the client, first found wins, comma-separated; 'none' ignores "
                                 "identity headers (as a worker's flag)")
    worker_api_key: str | None = flag(None, "the key the router sends to the workers: one marked "
                                            '"trusted_proxy": true in their --api-keys, so that they take the '
                                            "client the router names", none_means="none (workers without keys)")
    tokenizer_path: str | None = flag(None, "the model's tokenizer (.gguf file, Hugging Face folder or cached repo "
                                            "id)", none_means="fetched from the first worker that answers")
    max_body_bytes: int = flag(DEFAULT_MAX_BODY_BYTES, "larger request bodies are refused with 413")
    request_timeout_secs: float = flag(1800.0, "seconds the router waits on a worker for each part of an answer "
                                                "(the status line, each chunk of a stream); past it the attempt "
                                                "fails and is retried as a connection error")
    health_check_interval_secs: float = flag(10.0, "seconds between health checks of each worker (GET /health)")
    health_check_timeout_secs: float = flag(5.0, "seconds a health check may take before it counts as failed")
    health_failure_threshold: int = flag(3, "failed health checks in a row that take a worker out of routing")
    health_success_threshold: int = flag(2, "passed health checks in a row that bring it back")
    retry_max_retries: int = flag(5, "retries of a request on another worker after a connection error, a 5xx or a "
                                     "429 (streams: only before their first byte)")
    retry_initial_backoff_ms: float = flag(50.0, "wait before the first retry")
    retry_max_backoff_ms: float = flag(30000.0, "longest wait between retries")
    retry_backoff_multiplier: float = flag(1.5, "each retry waits this many times longer than the last")
    retry_jitter_factor: float = flag(0.2, "each wait is randomized by up to this fraction either way")
    disable_retries: bool = flag(False, "never retry a request")
    cb_failure_threshold: int = flag(10, "failures in a row that open a worker's circuit breaker (no requests "
                                         "routed to it)")
    cb_success_threshold: int = flag(3, "successes in a row, after the breaker half-opens, that close it")
    cb_timeout_duration_secs: float = flag(60.0, "seconds an open breaker waits before it lets a request try")
    disable_circuit_breaker: bool = flag(False, "never take a worker out for failed requests")
    max_concurrent_requests: int = flag(256, "requests the router has at the workers at once; more wait in the queue")
    queue_size: int = flag(100, "requests that may wait for a slot; past it, 429")
    queue_timeout_secs: float = flag(60.0, "seconds a request may wait for a slot before it gets 429")

    def __post_init__(self) -> None:
        positive = ("port", "max_body_bytes", "request_timeout_secs", "health_check_interval_secs",
                    "health_check_timeout_secs", "health_failure_threshold", "health_success_threshold",
                    "retry_backoff_multiplier", "cb_failure_threshold", "cb_success_threshold",
                    "max_concurrent_requests", "queue_timeout_secs")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {v!r}")
        for name in ("retry_max_retries", "retry_initial_backoff_ms", "retry_max_backoff_ms", "queue_size",
                     "cb_timeout_duration_secs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {v!r}")
        if not 0 <= self.retry_jitter_factor <= 1:
            raise ValueError(f"--retry-jitter-factor must be in [0, 1], got {self.retry_jitter_factor!r}")
        for url in self.worker_urls:
            check_worker_url(url)
        self.check_fairness_args()

    def client_id_headers(self) -> tuple[str, ...]:
        return client_id_headers(self.client_id_header)


def check_worker_url(url: str) -> str:
    """A worker's base URL, as given (http or https, a host, no query): or a ValueError naming it."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"worker url {url!r}: expected http://host:port")
    return url.rstrip("/")
