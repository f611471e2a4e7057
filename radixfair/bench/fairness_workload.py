"""The long-document QA trace of `bench fairness` (LooGLE-shaped, synthetic token ids).

Each client owns one document and asks many short questions about it, so every request of a client
shares the document as its prefix; different clients share nothing. Arrivals are open-loop Poisson
per client, and one misbehaving client (S1 in the design) sends `heavy_factor` times the others' rate.
Pure numpy: the same seed gives the same trace for every policy. `workload_from_trace` takes a
simulator trace instead (any of its workloads), so one JSONL file runs in the simulator and here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from radixfair.sim.trace import TraceRecord


@dataclass(frozen=True)
class WorkloadConfig:
    num_clients: int = 8
    duration: float = 90.0  # seconds of arrivals
    rate: float = 1.0  # requests/s of each well-behaved client
    heavy_factor: float = 4.0  # the misbehaving client's rate multiple
    doc_len: tuple[int, int] = (1024, 1536)  # inclusive ranges of token counts
    question_len: tuple[int, int] = (16, 32)
    output_len: tuple[int, int] = (16, 32)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_clients < 2:
            raise ValueError(f"need at least 2 clients to measure fairness, got {self.num_clients}")
        if self.duration <= 0 or self.rate <= 0 or self.heavy_factor <= 0:
            raise ValueError("duration, rate and heavy factor must be positive")
        for name in ("doc_len", "question_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be a range 1 <= lo <= hi, got {lo},{hi}")


@dataclass(frozen=True)
class Arrival:
    time: float  # seconds after the start of the run
    client: str
    input_ids: list[int]  # the client's document + a question
    max_new_tokens: int


@dataclass(frozen=True)
class Workload:
    config: WorkloadConfig
    clients: tuple[str, ...]
    heavy_client: str
    documents: dict[str, list[int]]
    arrivals: list[Arrival]  # sorted by time
    rates: dict[str, float] | None = None  # measured per-client rates (a replayed trace); None: from config

    def rate_of(self, client: str) -> float:
        if self.rates is not None:
            return self.rates.get(client, 0.0)
        factor = self.config.heavy_factor if client == self.heavy_client else 1.0
        return self.config.rate * factor


def client_names(n: int) -> tuple[str, ...]:
    width = len(str(n - 1))
    return tuple(f"c{i:0{width}d}" for i in range(n))


def make_workload(cfg: WorkloadConfig, vocab_size: int) -> Workload:
    lo = min(100, vocab_size // 4)  # skip the special tokens at the start of typical vocabularies
    clients = client_names(cfg.num_clients)
    heavy = clients[0]
    documents: dict[str, list[int]] = {}
    arrivals: list[Arrival] = []
    for i, client in enumerate(clients):
        # one generator per client, so adding clients or lengthening the run leaves the existing
        # clients' documents and early arrivals unchanged
        rng = np.random.default_rng([cfg.seed, i])
        doc = rng.integers(lo, vocab_size, _draw(rng, cfg.doc_len)).tolist()
        documents[client] = doc
        rate = cfg.rate * (cfg.heavy_factor if client == heavy else 1.0)
        t = float(rng.exponential(1.0 / rate))
        while t < cfg.duration:
            question = rng.integers(lo, vocab_size, _draw(rng, cfg.question_len)).tolist()
            arrivals.append(Arrival(t, client, doc + question, _draw(rng, cfg.output_len)))
            t += float(rng.exponential(1.0 / rate))
    arrivals.sort(key=lambda a: (a.time, a.client))
    return Workload(cfg, clients, heavy, documents, arrivals)


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
    arrivals = sorted((Arrival(r.time, r.client, r.input_ids(vocab_size), r.output_len) for r in kept),
                      key=lambda a: (a.time, a.client))
    documents = {c: next(a.input_ids for a in arrivals if a.client == c) for c in clients}
    heavy = max(clients, key=lambda c: (counts[c], c == clients[0]))
    rates = {c: counts[c] / duration for c in clients}
    light = [rates[c] for c in clients if c != heavy] or [rates[heavy]]
    lens = [len(a.input_ids) for a in arrivals]
    cfg = WorkloadConfig(num_clients=len(clients), duration=duration, rate=float(np.mean(light)),
                         heavy_factor=rates[heavy] / float(np.mean(light)), doc_len=(min(lens), max(lens)),
                         output_len=(min(a.max_new_tokens for a in arrivals), max(a.max_new_tokens for a in arrivals)))
    return Workload(cfg, clients, heavy, documents, arrivals, rates)


def default_pool_tokens(cfg: WorkloadConfig, docs_resident: int = 3, room: int = 2048) -> int:
    """A KV pool that holds `docs_resident` of the longest documents plus room for the running
    requests' questions and answers: too small for every client's document, so the scheduler's
    order decides which documents stay cached."""
    return docs_resident * cfg.doc_len[1] + room


def _draw(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))
