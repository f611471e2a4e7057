"""The long-document QA trace of `bench fairness` (LooGLE-shaped, synthetic token ids).

Each client owns one document and asks many short questions about it, so every request of a client
shares the document as its prefix; different clients share nothing. Arrivals are open-loop Poisson
per client, and one misbehaving client (S1 in the design) sends `heavy_factor` times the others' rate.
The trace is the simulator's own `docqa` workload (`radixfair.sim.trace`) with one document per
client, so the same seed gives the same trace for every policy, and `workload_from_trace` takes any
simulator trace instead: one JSONL file runs in the simulator and here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from radixfair.sim.trace import TraceConfig, TraceRecord, client_names, generate

# the documented workload; the command's flags replace some of these
FAIRNESS_TRACE = TraceConfig(workload="docqa", num_clients=8, duration=90.0, rate=1.0, heavy_factor=4.0,
                             docs_per_client=1, doc_len=(1024, 1536), question_len=(16, 32), output_len=(16, 32))


@dataclass(frozen=True)
class Arrival:
    time: float  # seconds after the start of the run
    client: str
    input_ids: list[int]  # the client's document + a question
    max_new_tokens: int


@dataclass(frozen=True)
class Workload:
    clients: tuple[str, ...]
    heavy_client: str
    arrivals: list[Arrival]  # sorted by time
    duration: float  # seconds of arrivals
    rates: dict[str, float]  # requests/s per client: as configured, or as a replayed trace holds them
    rate: float  # of the well-behaved clients (a replayed trace: their mean)
    heavy_factor: float  # the heavy client's rate over `rate`
    doc_len: tuple[int, int]  # document tokens, inclusive range (a replayed trace: whole prompts)

    def rate_of(self, client: str) -> float:
        return self.rates.get(client, 0.0)


def make_workload(cfg: TraceConfig, vocab_size: int) -> Workload:
    """`cfg`'s trace (`FAIRNESS_TRACE` with the command's settings), prompts expanded for a model's
    vocabulary."""
    if cfg.num_clients < 2:
        raise ValueError(f"need at least 2 clients to measure fairness, got {cfg.num_clients}")
    records = generate(cfg)
    if not records:
        raise ValueError(f"no request arrives within {cfg.duration:g} s")
    clients = client_names(cfg.num_clients)
    rates = {c: cfg.rate * (cfg.heavy_factor if i == 0 else 1.0) for i, c in enumerate(clients)}
    return Workload(clients, clients[0], _arrivals(records, vocab_size), cfg.duration, rates, cfg.rate,
                    cfg.heavy_factor, cfg.doc_len)


def workload_from_trace(records: Sequence[TraceRecord], vocab_size: int, duration: float | None = None) -> Workload:
    """A simulator trace (`bench sim --trace-out`) as this benchmark's workload: its arrivals up to
    `duration` (default: the trace's span), prompts expanded for this model's vocabulary. The client
    sending the most requests is the heavy one; rates are what the trace holds."""
    if not records:
        raise ValueError("the trace has no records")
    span = max(r.time for r in records)
    duration = duration if duration is not None else span + 1e-9
    kept = [r for r in records if r.time < duration]
    if not kept:
        raise ValueError(f"no trace record arrives before {duration:g} s")
    counts = Counter(r.client for r in kept)
    clients = tuple(sorted(counts))
    arrivals = _arrivals(kept, vocab_size)
    heavy = max(clients, key=lambda c: (counts[c], c == clients[0]))
    rates = {c: counts[c] / duration for c in clients}
    light = float(np.mean([rates[c] for c in clients if c != heavy] or [rates[heavy]]))
    lens = [len(a.input_ids) for a in arrivals]
    return Workload(clients, heavy, arrivals, duration, rates, light, rates[heavy] / light, (min(lens), max(lens)))


def default_pool_tokens(wl: Workload, docs_resident: int = 3, room: int = 2048) -> int:
    """A KV pool that holds `docs_resident` of the longest documents plus room for the running
    requests' questions and answers: too small for every client's document, so the scheduler's
    order decides which documents stay cached."""
    return docs_resident * wl.doc_len[1] + room


def _arrivals(records: Sequence[TraceRecord], vocab_size: int) -> list[Arrival]:
    return sorted((Arrival(r.time, r.client, r.input_ids(vocab_size), r.output_len) for r in records),
                  key=lambda a: (a.time, a.client))
