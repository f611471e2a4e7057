"""Request traces for the simulator: JSONL records and generators for the design's workloads.

A record gives either the prompt's token ids or, more compactly, a list of (prefix group, length)
segments, or (what `radixfair serve --record-trace` writes) a chain of block hashes: the prompt cut
into `block_size`-token blocks, each named by a hash of every token up to its end, as vLLM's
prefix-cache block hashes are. Two prompts share a block hash exactly when they share every token up
to that block's end, so replaying each hash as a segment of that name keeps the recorded prompts'
shared prefixes shared (to the block) without storing the prompts. A group names a token stream (a document, a few-shot template, a question); its tokens are
a pure function of the group name, so every request naming the same group shares those tokens as a
prefix, traces stay small on disk, and expanding them gives the same ids on every machine. A
shorter length of a group is a prefix of a longer one (position i depends only on name and i).
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

VOCAB_LO = 100  # skip the special tokens at the start of typical vocabularies
VOCAB_SIZE = 32_000
BLOCK_SIZE = 16  # tokens per hashed block of a recorded prompt (vLLM's default block size)
_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class TraceRecord:
    time: float  # arrival, seconds from the start of the trace
    client: str
    output_len: int  # tokens generated (the simulator ignores EOS and stops here)
    segments: tuple[tuple[str, int], ...] = ()  # (prefix group, tokens) expanded in order
    prompt: tuple[int, ...] | None = None  # explicit token ids; when given, segments are unused
    rid: str = ""
    # the token stream the simulator's stand-in executor answers with (`group_tokens(output_group,
    # output_len)`); a later record that quotes the answer as a segment of that name then finds it in
    # the cache, as a chat client sending back the model's own reply does. "": arbitrary tokens.
    output_group: str = ""
    # > 0: the segments are the prompt's block-hash chain (`block_hashes`), written as such
    block_size: int = 0

    def __post_init__(self) -> None:
        if self.prompt is None and not self.segments:
            raise ValueError(f"trace record {self.rid!r} has neither prompt ids nor segments")
        if self.output_len < 1:
            raise ValueError(f"trace record {self.rid!r}: output_len must be >= 1, got {self.output_len}")
        if self.block_size < 0:
            raise ValueError(f"trace record {self.rid!r}: block_size must be >= 0, got {self.block_size}")

    @classmethod
    def recorded(cls, time: float, client: str, input_ids: Sequence[int], output_len: int, rid: str = "",
                 keep_tokens: bool = False, block_size: int = BLOCK_SIZE) -> TraceRecord:
        """A served request as a trace record: its prompt as a block-hash chain, and its token ids
        too with `keep_tokens`."""
        hashes = block_hashes(input_ids, block_size)
        n = len(input_ids)
        segments = tuple((h, min(block_size, n - i * block_size)) for i, h in enumerate(hashes))
        return cls(time=time, client=client, output_len=output_len, segments=segments,
                   prompt=tuple(input_ids) if keep_tokens else None, rid=rid, block_size=block_size)

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
        if self.block_size:
            d["prompt_len"] = sum(n for _, n in self.segments)
            d["block_size"] = self.block_size
            d["blocks"] = [g for g, _ in self.segments]
            if self.prompt is not None:
                d["prompt"] = list(self.prompt)
        elif self.prompt is not None:
            d["prompt"] = list(self.prompt)
        else:
            d["segments"] = [[g, n] for g, n in self.segments]
        if self.output_group:
            d["output_group"] = self.output_group
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TraceRecord:
        prompt = d.get("prompt")
        segments = tuple((str(g), int(n)) for g, n in d.get("segments", ()))
        block_size = 0
        if "blocks" in d:
            block_size, n, blocks = int(d["block_size"]), int(d["prompt_len"]), [str(b) for b in d["blocks"]]
            if block_size < 1 or n < 1 or len(blocks) != -(-n // block_size):
                raise ValueError(f"{len(blocks)} blocks of {block_size} tokens do not make a prompt of {n} tokens")
            segments = tuple((h, min(block_size, n - i * block_size)) for i, h in enumerate(blocks))
        return cls(time=float(d["time"]), client=str(d["client"]), output_len=int(d["output_len"]),
                   segments=segments,
                   prompt=None if prompt is None else tuple(int(x) for x in prompt), rid=str(d.get("rid", "")),
                   output_group=str(d.get("output_group", "")), block_size=block_size)


def block_hashes(ids: Sequence[int], block_size: int = BLOCK_SIZE) -> list[str]:
    """The prompt's blocks of `block_size` tokens (the last may be shorter), each named by a hash
    chained over the previous block's: a block's hash covers every token up to its end."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    out: list[str] = []
    prev = b""
    for i in range(0, len(ids), block_size):
        block = ids[i:i + block_size]
        prev = hashlib.blake2b(prev + struct.pack(f"<{len(block)}q", *block), digest_size=8).digest()
        out.append(prev.hex())
    return out


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
    workload: str = "docqa"  # one of WORKLOADS
    num_clients: int = 8
    duration: float = 60.0  # seconds of arrivals
    rate: float = 1.0  # requests/s of each well-behaved client (on average, for every workload)
    heavy_factor: float = 1.0  # S1: client 0 sends at this multiple of the rate
    heavy_doc_factor: float = 1.0  # S2: client 0's documents (templates, problems, material) are this many times longer
    docs_per_client: int = 2  # docqa/judge: documents (judged material) each client asks about
    doc_len: tuple[int, int] = (2048, 3072)  # docqa document / fewshot template / tot problem / judge material /
    # chat system prompt tokens, inclusive
    question_len: tuple[int, int] = (16, 48)  # docqa question / chat user message
    output_len: tuple[int, int] = (16, 64)
    seed: int = 0
    arrival: str = "poisson"  # "poisson" | "gamma" (gaps Gamma-distributed with coefficient of variation `cv`)
    cv: float = 1.0  # gamma: burstiness; 1 is Poisson, > 1 burstier, < 1 more regular
    tot_branches: int = 3  # tot: k thoughts per level, two levels -> k + k*k requests per program
    thought_len: tuple[int, int] = (32, 96)  # tot: tokens of one thought
    candidate_len: tuple[int, int] = (64, 256)  # judge: tokens of the judged candidate text
    turns: tuple[int, int] = (2, 6)  # chat: turns per conversation, inclusive
    think_time: float = 2.0  # chat: mean user think time (exponential) after a turn's expected completion
    token_time: float = 0.02  # chat/tot: expected seconds per output token, to place a follow-up request

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; choose from {', '.join(WORKLOADS)}")
        if (self.num_clients < 1 or self.duration <= 0 or self.rate <= 0 or self.heavy_factor <= 0
                or self.heavy_doc_factor <= 0):
            raise ValueError("num_clients, duration, rate, heavy_factor and heavy_doc_factor must be positive")
        if self.arrival not in ARRIVALS or self.cv <= 0:
            raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)} and cv > 0, got {self.arrival!r}, {self.cv}")
        if self.tot_branches < 1 or self.think_time < 0 or self.token_time < 0:
            raise ValueError("tot_branches must be >= 1 and think_time, token_time >= 0")
        for name in ("doc_len", "question_len", "output_len", "thought_len", "candidate_len", "turns"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be a range 1 <= lo <= hi, got {lo},{hi}")


WORKLOADS = ("docqa", "fewshot", "tot", "judge", "chat")
ARRIVALS = ("poisson", "gamma")


def client_names(n: int) -> tuple[str, ...]:
    width = len(str(n - 1))
    return tuple(f"c{i:0{width}d}" for i in range(n))


def generate(cfg: TraceConfig) -> list[TraceRecord]:
    """Open-loop arrivals per client (Poisson, or Gamma with `cv`); client c0 at `heavy_factor` x the
    rate (S1) and with documents `heavy_doc_factor` x as long (S2).

    docqa: each client owns `docs_per_client` documents and every request is one of them + a fresh
    question, so a client's requests share long prefixes and clients share nothing (LooGLE-like).
    fewshot: each client has one long instruction/examples template shared by all its requests.
    judge: like docqa with `docs_per_client` long rubric + material blocks, each judgment = one of them
    + a fresh candidate text (`candidate_len`).
    tot: programs arrive; each = a problem prefix, `tot_branches` first-level thoughts extending it,
    and `tot_branches` second-level thoughts extending each first-level one (k + k*k requests).
    chat: conversations arrive; turn t's prompt = turn t-1's prompt + its output + a new user
    message, arriving after turn t-1's expected completion and a think time.
    Session-shaped workloads (tot, chat) start sessions at a rate that keeps `rate` requests/s.
    """
    gen = {"docqa": _docqa, "fewshot": _docqa, "judge": _docqa, "tot": _tot, "chat": _chat}[cfg.workload]
    out: list[TraceRecord] = []
    for i, client in enumerate(client_names(cfg.num_clients)):
        # one generator per client: adding clients leaves the others' traces unchanged
        rng = np.random.default_rng([cfg.seed, i])
        out.extend(gen(cfg, rng, i, client))
    out.sort(key=lambda r: (r.time, r.client, r.rid))
    return out


def _doc_lens(cfg: TraceConfig, rng: np.random.Generator, i: int, n: int) -> list[int]:
    lens = [_draw(rng, cfg.doc_len) for _ in range(n)]
    if i == 0 and cfg.heavy_doc_factor != 1.0:
        lens = [max(1, round(x * cfg.heavy_doc_factor)) for x in lens]
    return lens


def _arrivals(cfg: TraceConfig, rng: np.random.Generator, rate: float) -> Iterator[float]:
    """Arrival times in [0, duration) of a renewal process at `rate` per second."""
    t = _gap(cfg, rng, rate)
    while t < cfg.duration:
        yield t
        t += _gap(cfg, rng, rate)


def _gap(cfg: TraceConfig, rng: np.random.Generator, rate: float) -> float:
    if cfg.arrival == "poisson":
        return float(rng.exponential(1.0 / rate))
    shape = 1.0 / (cfg.cv * cfg.cv)  # mean shape * scale = 1 / rate, CV = 1 / sqrt(shape)
    return float(rng.gamma(shape, 1.0 / (rate * shape)))


def _rate(cfg: TraceConfig, i: int) -> float:
    return cfg.rate * (cfg.heavy_factor if i == 0 else 1.0)


def _docqa(cfg: TraceConfig, rng: np.random.Generator, i: int, client: str) -> list[TraceRecord]:
    docs = 1 if cfg.workload == "fewshot" else cfg.docs_per_client
    doc_lens = _doc_lens(cfg, rng, i, docs)
    tail = cfg.candidate_len if cfg.workload == "judge" else cfg.question_len
    out = []
    for k, t in enumerate(_arrivals(cfg, rng, _rate(cfg, i))):
        d = int(rng.integers(docs))
        rid = f"{client}-{k}"
        prefix = f"{cfg.workload}/{cfg.seed}/{client}/{d}"
        segments = ((prefix, doc_lens[d]), (f"q/{cfg.seed}/{rid}", _draw(rng, tail)))
        out.append(TraceRecord(time=round(t, 6), client=client, output_len=_draw(rng, cfg.output_len),
                               segments=segments, rid=rid))
    return out


def _tot(cfg: TraceConfig, rng: np.random.Generator, i: int, client: str) -> list[TraceRecord]:
    k = cfg.tot_branches
    out = []
    for p, t in enumerate(_arrivals(cfg, rng, _rate(cfg, i) / (k + k * k))):
        pid = f"{client}-p{p}"
        problem = (f"tot/{cfg.seed}/{pid}", _doc_lens(cfg, rng, i, 1)[0])
        for b in range(k):
            thought = (f"t/{cfg.seed}/{pid}/{b}", _draw(rng, cfg.thought_len))
            first_out = _draw(rng, cfg.output_len)
            out.append(TraceRecord(time=round(t, 6), client=client, output_len=first_out,
                                   segments=(problem, thought), rid=f"{pid}-{b}"))
            # the second level follows its branch's expected completion
            t2 = round(t + first_out * cfg.token_time, 6)
            for c in range(k):
                step = (f"t/{cfg.seed}/{pid}/{b}/{c}", _draw(rng, cfg.thought_len))
                out.append(TraceRecord(time=t2, client=client, output_len=_draw(rng, cfg.output_len),
                                       segments=(problem, thought, step), rid=f"{pid}-{b}-{c}"))
    return out


def _chat(cfg: TraceConfig, rng: np.random.Generator, i: int, client: str) -> list[TraceRecord]:
    system = (f"chat/{cfg.seed}/{client}", _doc_lens(cfg, rng, i, 1)[0])
    mean_turns = (cfg.turns[0] + cfg.turns[1]) / 2
    out = []
    for v, t in enumerate(_arrivals(cfg, rng, _rate(cfg, i) / mean_turns)):
        cid = f"{client}-v{v}"
        segments: tuple[tuple[str, int], ...] = (system,)
        for turn in range(_draw(rng, cfg.turns)):
            if t >= cfg.duration:
                break
            rid = f"{cid}-{turn}"
            segments = (*segments, (f"u/{cfg.seed}/{rid}", _draw(rng, cfg.question_len)))
            n_out = _draw(rng, cfg.output_len)
            answer = f"a/{cfg.seed}/{rid}"
            out.append(TraceRecord(time=round(t, 6), client=client, output_len=n_out, segments=segments, rid=rid,
                                   output_group=answer))
            # the next turn's history holds this turn's answer (its token stream stands for the output)
            segments = (*segments, (answer, n_out))
            t += n_out * cfg.token_time + (float(rng.exponential(cfg.think_time)) if cfg.think_time else 0.0)
    return out


def _draw(rng: np.random.Generator, bounds: Sequence[int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))
