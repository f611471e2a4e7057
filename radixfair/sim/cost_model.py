"""Batch time as a linear model of what a forward pass does, with its provenance attached.

    t = a + b * prefill_tokens + f * prefill_seqs + g * attn_pairs + c * decode_reqs + e * kv_tokens_read

(seconds). `a` is the fixed cost of one pass (on a GPU: reading the weights once; on the CPU: the same
plus Python/launch overhead), `b` the compute per prompt token (the linear layers), `f` a per-sequence
cost in a prefill pass (its own attention call and gathers), `g` the attention compute per causal
(query, key) pair of a prefill — what makes a question over a long cached document cost more than
the same question alone —, `c` the per-request cost of a decode step (sampling, per-row work), `e` the
cost of reading one token's K and V from the pool (a decode step reads every sequence whole; a prefill
reads the cached prefixes it extends).

Profiles are JSON files in `profiles/`; each says where its numbers come from in `"source"`, because a
simulated result is only as good as its cost model and a reader must be able to judge it. `f` and `g`
are optional in a profile (0 when absent).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from radixfair.sched.batch import BatchMode, ScheduledBatch

PROFILE_DIR = Path(__file__).with_name("profiles")
REQUIRED = ("name", "a", "b_prefill_token", "c_decode_req", "e_kv_token", "source")
OPTIONAL = ("f_prefill_seq", "g_attn_pair")
COEFFICIENTS = ("a", "b_prefill_token", "f_prefill_seq", "g_attn_pair", "c_decode_req", "e_kv_token")


class BatchFeatures(NamedTuple):
    """What one pass does, in the units the cost model charges (and `bench calibrate` regresses on)."""

    prefill_tokens: int = 0  # prompt tokens computed (prefill passes)
    prefill_seqs: int = 0  # sequences in a prefill pass
    attn_pairs: int = 0  # causal (query, key) pairs of a prefill: extend * (prefix + (extend + 1) / 2)
    decode_reqs: int = 0  # requests in a decode pass
    kv_tokens_read: int = 0  # K/V read from the pool: decode, the sequence lengths; prefill, the cached prefixes

    def vector(self) -> tuple[float, ...]:
        """The design-matrix row, in `COEFFICIENTS` order (1 for the constant)."""
        return (1.0, float(self.prefill_tokens), float(self.prefill_seqs), float(self.attn_pairs),
                float(self.decode_reqs), float(self.kv_tokens_read))


@dataclass(frozen=True)
class CostModel:
    name: str
    a: float  # s per pass
    b_prefill_token: float  # s per prompt token computed in a prefill pass
    c_decode_req: float  # s per request in a decode pass
    e_kv_token: float  # s per token of K/V read from the pool (see BatchFeatures.kv_tokens_read)
    source: str  # where the numbers come from
    f_prefill_seq: float = 0.0  # s per sequence in a prefill pass
    g_attn_pair: float = 0.0  # s per causal (query, key) pair computed in a prefill pass

    def __post_init__(self) -> None:
        for f in COEFFICIENTS:
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"cost model {self.name!r}: {f} must be a finite number >= 0, got {v!r}")
        if not self.source.strip():
            raise ValueError(f"cost model {self.name!r} has no source: say where its numbers come from")

    def coefficients(self) -> tuple[float, ...]:
        return tuple(float(getattr(self, f)) for f in COEFFICIENTS)

    @functools.cached_property
    def _coefficients(self) -> tuple[float, ...]:  # a simulation asks once per batch
        return self.coefficients()

    def time(self, features: BatchFeatures) -> float:
        return sum(c * x for c, x in zip(self._coefficients, features.vector(), strict=True))

    def batch_time(self, batch: ScheduledBatch) -> float:
        return self.time(batch_features(batch))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        missing = [f for f in REQUIRED if f not in d]
        if missing:
            raise ValueError(f"cost model is missing {', '.join(missing)}")
        unknown = sorted(set(d) - set(REQUIRED) - set(OPTIONAL))
        if unknown:
            raise ValueError(f"cost model has unknown fields {', '.join(unknown)}")
        coef = {f: float(d.get(f, 0.0)) for f in COEFFICIENTS}
        return cls(name=str(d["name"]), source=str(d["source"]), **coef)

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in (*REQUIRED, *OPTIONAL)}

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        with open(path) as f:
            return cls.from_dict(json.load(f))


def batch_features(batch: ScheduledBatch) -> BatchFeatures:
    """What the cost model charges for a pass: a mixed pass is its prefill part and its decode part
    in one pass (one fixed cost `a`, both parts' per-token and per-request terms)."""
    if batch.mode is BatchMode.MIXED:
        prefill, decode = (batch_features(part) for part in batch.split_mixed())
        return BatchFeatures(*(x + y for x, y in zip(prefill, decode, strict=True)))
    if batch.mode is BatchMode.PREFILL:
        ext = batch.extend_lens
        # a causal kernel computes each query against the cached prefix and the earlier new tokens
        pairs = int((ext * batch.prefix_lens).sum() + (ext * (ext + 1) // 2).sum())
        return BatchFeatures(prefill_tokens=batch.num_tokens, prefill_seqs=len(batch.reqs), attn_pairs=pairs,
                             kv_tokens_read=int(batch.prefix_lens.sum()))
    return BatchFeatures(decode_reqs=len(batch.reqs), kv_tokens_read=int(batch.seq_lens.sum()))


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str) -> CostModel:
    """A bundled profile by name (`a100-llama3.1-8b`) or any JSON file by path."""
    p = Path(name_or_path)
    if p.suffix == ".json" and p.exists():
        return CostModel.load(p)
    bundled = PROFILE_DIR / f"{name_or_path}.json"
    if not bundled.exists():
        raise ValueError(f"unknown cost profile {name_or_path!r}; bundled: {', '.join(available_profiles())}")
    return CostModel.load(bundled)
