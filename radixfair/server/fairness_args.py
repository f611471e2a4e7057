"""The settings of the live fairness view and of traffic recording, declared once for both
`radixfair serve` and `radixfair router` (each config inherits them, so each flag has one help text
and one check)."""

from __future__ import annotations

from dataclasses import dataclass

from radixfair.config_flags import flag
from radixfair.metrics.live_fairness import FairnessView
from radixfair.server.trace_recorder import TraceRecorder


@dataclass(frozen=True)
class FairnessArgs:
    fairness_window: float = flag(60.0, "seconds over which /fairness and /dashboard measure service rates, "
                                        "throughput, hit rates and latencies")
    record_trace: str | None = flag(None, "append one JSONL record per request (finished or cut off) to this file, in the "
                                          "simulator's trace format (arrival, client, prompt as a chain of "
                                          "block hashes, output length), for `bench sim --trace`, `bench "
                                          "fairness --trace` and `radixfair tune`", metavar="PATH")
    record_trace_tokens: bool = flag(False, "--record-trace also stores each prompt's token ids (users' data: "
                                            "off by default, only the hashes are written)")
    record_trace_max_bytes: int = flag(256 << 20, "--record-trace rotates its file past this size: PATH becomes "
                                                  "PATH.1 (PATH.1 becomes PATH.2, ...; 3 are kept)")

    def check_fairness_args(self) -> None:
        v = self.record_trace_max_bytes
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"--record-trace-max-bytes must be an integer >= 1, got {v!r}")
        if not self.fairness_window > 0:
            raise ValueError(f"--fairness-window must be > 0, got {self.fairness_window!r}")
        if self.record_trace == "":
            raise ValueError("--record-trace is empty: give a file path")

    def fairness_view(self, max_clients: int) -> FairnessView:
        """The view `/fairness` serves: rates over `--fairness-window`, ten windows (at least ten
        minutes) of history for the chart."""
        return FairnessView(self.fairness_window, max(10 * self.fairness_window, 600.0), max_clients)

    def trace_recorder(self) -> TraceRecorder | None:
        """`--record-trace`'s recorder (opened now, so that a bad path fails at startup), or None."""
        if not self.record_trace:
            return None
        return TraceRecorder(self.record_trace, self.record_trace_tokens, self.record_trace_max_bytes)
