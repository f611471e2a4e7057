"""The long-document QA trace of `bench fairness` (LooGLE-shaped, synthetic token ids).

Each client owns one document and asks many short questions about it, so every request of a client
shares the document as its prefix; different clients share nothing. Arrivals are open-loop Poisson
per client, and one misbehaving client (S1 in the design) sends `heavy_factor` times the others' rate.
Pure numpy: the same seed gives the same trace for every policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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

    def rate_of(self, client: str) -> float:
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


def default_pool_tokens(cfg: WorkloadConfig, docs_resident: int = 3, room: int = 2048) -> int:
    """A KV pool that holds `docs_resident` of the longest documents plus room for the running
    requests' questions and answers: too small for every client's document, so the scheduler's
    order decides which documents stay cached."""
    return docs_resident * cfg.doc_len[1] + room


def _draw(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))
