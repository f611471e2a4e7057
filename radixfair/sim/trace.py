"""Request traces for the simulator: JSONL records and generators for the design's workloads.

A record gives either the prompt's token ids or, more compactly, a list of (prefix group, length)
segments. A group names a token stream (a document, a few-shot template, a question); its tokens are
a pure function of the group name, so every request naming the same group shares those tokens as a
prefix, traces stay small on disk, and expanding them gives the same ids on every machine. A
shorter length of a group is a prefix of a longer one (position i depends only on name and i).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

VOCAB_LO = 100  # skip the special tokens at the start of typical vocabularies
VOCAB_SIZE = 32_000
_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class TraceRecord:
    time: float  # arrival, seconds from the start of the trace
    client: str
    output_len: int  # tokens generated (the simulator ignores EOS and stops here)
    segments: tuple[tuple[str, int], ...] = ()  # (prefix group, tokens) expanded in order
    prompt: tuple[int, ...] | None = None  # explicit token ids; when given, segments are unused
    rid: str = ""

    def __post_init__(self) -> None:
        if self.prompt is None and not self.segments:
            raise ValueError(f"trace record {self.rid!r} has neither prompt ids nor segments")
        if self.output_len < 1:
            raise ValueError(f"trace record {self.rid!r}: output_len must be >= 1, got {self.output_len}")

    @property
    def prompt_len(self) -> int:
        return len(self.prompt) if self.prompt is not None else sum(n for _, n in self.segments)

    def input_ids(self, vocab_size: int = VOCAB_SIZE) -> list[int]:
        if self.prompt is not None:
            return list(self.prompt)
        out: list[int] = []
        for group, n in self.segments:
            out.extend(group_tokens(group, n, vocab_size))
        return out

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rid": self.rid, "time": self.time, "client": self.client,
                             "output_len": self.output_len}
        if self.prompt is not None:
            d["prompt"] = list(self.prompt)
        else:
            d["segments"] = [[g, n] for g, n in self.segments]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TraceRecord:
        prompt = d.get("prompt")
        return cls(time=float(d["time"]), client=str(d["client"]), output_len=int(d["output_len"]),
                   segments=tuple((str(g), int(n)) for g, n in d.get("segments", ())),
                   prompt=None if prompt is None else tuple(int(x) for x in prompt), rid=str(d.get("rid", "")))


def group_tokens(group: str, n: int, vocab_size: int = VOCAB_SIZE) -> list[int]:
    """`n` token ids of the named stream: splitmix64 of (crc32(name), position), so they do not
    depend on numpy's generator algorithms and a prefix of the stream is the same at any length."""
    seed = np.uint64(zlib.crc32(group.encode()) * 0x9E3779B97F4A7C15 & _M64)
    with np.errstate(over="ignore"):
        z = seed + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    span = vocab_size - VOCAB_LO
    return (z % np.uint64(span) + np.uint64(VOCAB_LO)).astype(np.int64).tolist()


def write_jsonl(path: str | Path, records: Iterable[TraceRecord]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), separators=(",", ":")) + "\n")


def read_jsonl(path: str | Path) -> list[TraceRecord]:
    out: list[TraceRecord] = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(TraceRecord.from_json(json.loads(line)))
                except (KeyError, ValueError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: bad trace record: {e}") from None
    return sorted(out, key=lambda r: r.time)


# ---- generators --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceConfig:
    workload: str = "docqa"  # "docqa" (long-document QA) | "fewshot"
    num_clients: int = 8
    duration: float = 60.0  # seconds of arrivals
    rate: float = 1.0  # requests/s of each well-behaved client (Poisson)
    heavy_factor: float = 1.0  # S1: client 0 sends at this multiple of the rate
    heavy_doc_factor: float = 1.0  # S2: client 0's documents (templates) are this many times longer
    docs_per_client: int = 2  # docqa: documents each client asks about
    doc_len: tuple[int, int] = (2048, 3072)  # docqa document / fewshot template tokens, inclusive
    question_len: tuple[int, int] = (16, 48)
    output_len: tuple[int, int] = (16, 64)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; choose from {', '.join(WORKLOADS)}")
        if (self.num_clients < 1 or self.duration <= 0 or self.rate <= 0 or self.heavy_factor <= 0
                or self.heavy_doc_factor <= 0):
            raise ValueError("num_clients, duration, rate, heavy_factor and heavy_doc_factor must be positive")
        for name in ("doc_len", "question_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be a range 1 <= lo <= hi, got {lo},{hi}")


WORKLOADS = ("docqa", "fewshot")


def client_names(n: int) -> tuple[str, ...]:
    width = len(str(n - 1))
    return tuple(f"c{i:0{width}d}" for i in range(n))


def generate(cfg: TraceConfig) -> list[TraceRecord]:
    """Open-loop Poisson arrivals per client; client c0 at `heavy_factor` x the rate (S1) and with
    documents `heavy_doc_factor` x as long (S2).

    docqa: each client owns `docs_per_client` documents and every request is one of them + a fresh
    question, so a client's requests share long prefixes and clients share nothing (LooGLE-like).
    fewshot: each client has one long instruction/examples template shared by all its requests.
    """
    out: list[TraceRecord] = []
    for i, client in enumerate(client_names(cfg.num_clients)):
        # one generator per client: adding clients leaves the others' traces unchanged
        rng = np.random.default_rng([cfg.seed, i])
        docs = 1 if cfg.workload == "fewshot" else cfg.docs_per_client
        doc_lens = [_draw(rng, cfg.doc_len) for _ in range(docs)]
        if i == 0 and cfg.heavy_doc_factor != 1.0:
            doc_lens = [max(1, round(n * cfg.heavy_doc_factor)) for n in doc_lens]
        rate = cfg.rate * (cfg.heavy_factor if i == 0 else 1.0)
        t = float(rng.exponential(1.0 / rate))
        k = 0
        while t < cfg.duration:
            d = int(rng.integers(docs))
            rid = f"{client}-{k}"
            prefix = f"{cfg.workload}/{cfg.seed}/{client}/{d}"
            segments = ((prefix, doc_lens[d]), (f"q/{cfg.seed}/{rid}", _draw(rng, cfg.question_len)))
            out.append(TraceRecord(time=round(t, 6), client=client, output_len=_draw(rng, cfg.output_len),
                                   segments=segments, rid=rid))
            k += 1
            t += float(rng.exponential(1.0 / rate))
    out.sort(key=lambda r: (r.time, r.client))
    return out


def _draw(rng: np.random.Generator, bounds: Sequence[int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))
