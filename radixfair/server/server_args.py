"""`radixfair serve`'s own settings (the engine's are `EngineArgs`), each flag declared once here."""

from __future__ import annotations

from dataclasses import dataclass

from radixfair.config_flags import flag
from radixfair.server.fairness_args import FairnessArgs

DEFAULT_MAX_BODY_BYTES = 8 << 20
DEFAULT_CLIENT_ID_HEADERS = "x-client-id,x-gateway-inference-fairness-id"


@dataclass(frozen=True)
class ServerArgs(FairnessArgs):
    host: str = flag("127.0.0.1", "bind address; the default serves this machine only")
    port: int = flag(30000, "TCP port")
    api_key: str | None = flag(None, "require 'Authorization: Bearer KEY'", exclusive="auth")
    api_keys: str | None = flag(None, 'JSON {"KEY": {"client": "alice", "weight": 2}}: per-key client identity; '
                                      '"trusted_proxy": true lets that key name the client in --client-id-header',
                                metavar="FILE", exclusive="auth")
    admin_api_key: tuple[str, ...] = flag((), "an operator key: needed for /flush_cache, /metrics and the client "
                                              "list of /get_server_info (closed to all when API keys are on and "
                                              "no operator key is set)", metavar="KEY")
    client_id_header: str = flag(DEFAULT_CLIENT_ID_HEADERS,
                                 "headers that name the client, first found wins, comma-separated; 'none' ignores "
                                 "identity headers. Trust them only behind a proxy that sets them")
    max_body_bytes: int = flag(DEFAULT_MAX_BODY_BYTES, "larger request bodies are refused with 413")
    max_queued_requests: int = flag(4096, "requests held beyond what the running batch takes "
                                          "(--max-running-requests); past it, 429 with Retry-After")
    max_requests_per_client: int = flag(1024, "requests (prompts x n) one client may have in flight, waiting or "
                                              "running; past it, 429 with Retry-After")
    max_connections: int = flag(1024, "open HTTP connections; past it, new requests get 503")
    read_timeout: float = flag(30.0, "seconds a client may take to send a request's headers, and its body; "
                                     "past it the connection is closed (408 once the headers are in)")
    max_metric_clients: int = flag(32, "clients with their own Prometheus series (those charged the most "
                                       "service); the rest are added up under client=\"other\". Also the "
                                       "clients /fairness and /dashboard show (those with requests in the "
                                       "system first)")
    incremental_streaming_output: bool = flag(False, "native /generate streams send only what is new in each "
                                                     "chunk (text, output_ids, logprobs), not SGLang's cumulative "
                                                     "text and meta_info")
    log_requests: bool = flag(False, "log one line per finished request: client, prompt/cached/output tokens, "
                                     "finish reason, latency")
    log_requests_level: int = flag(0, "what --log-requests adds: 0 nothing, 1 the sampling parameters, 2 the prompt "
                                      "and output text cut to 256 characters each, 3 the whole text",
                                   choices=(0, 1, 2, 3))

    def __post_init__(self) -> None:
        minimums = {"max_body_bytes": 1, "max_queued_requests": 0, "max_requests_per_client": 1,
                    "max_connections": 1, "max_metric_clients": 1}
        for name, low in minimums.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")
        if not self.read_timeout > 0:
            raise ValueError(f"--read-timeout must be > 0, got {self.read_timeout!r}")
        self.check_fairness_args()

    def client_id_headers(self) -> tuple[str, ...]:
        return client_id_headers(self.client_id_header)


def client_id_headers(spec: str) -> tuple[str, ...]:
    """`--client-id-header`'s headers, lower-case, in the order they are tried; () when turned off."""
    text = spec.strip().lower()
    if text in ("", "none"):
        return ()
    return tuple(h.strip() for h in text.split(",") if h.strip())
