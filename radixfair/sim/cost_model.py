"""Batch time as a linear model of what a forward pass does, with its provenance attached.

`t = a + b * prefill_tokens + c * decode_reqs + e * kv_tokens_read` (seconds). `a` is the fixed cost of
one pass (on a GPU: reading the weights once; on the CPU: the same plus Python/launch overhead), `b`
the compute per prompt token, `c` the per-request cost of a decode step (sampling, per-row work), `e`
the cost of reading one token's K and V in attention (each request reads its whole sequence).

Profiles are JSON files in `profiles/`; each says where its numbers come from in `"source"`, because a
simulated result is only as good as its cost model and a reader must be able to judge it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radixfair.sched.batch import BatchMode, ScheduledBatch

PROFILE_DIR = Path(__file__).with_name("profiles")
FIELDS = ("name", "a", "b_prefill_token", "c_decode_req", "e_kv_token", "source")


@dataclass(frozen=True)
class CostModel:
    name: str
    a: float  # s per pass
    b_prefill_token: float  # s per prompt token computed in a prefill pass
    c_decode_req: float  # s per request in a decode pass
    e_kv_token: float  # s per KV token read (sum of the batch's sequence lengths)
    source: str  # where the numbers come from

    def __post_init__(self) -> None:
        for f in ("a", "b_prefill_token", "c_decode_req", "e_kv_token"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"cost model {self.name!r}: {f} must be a finite number >= 0, got {v!r}")
        if not self.source.strip():
            raise ValueError(f"cost model {self.name!r} has no source: say where its numbers come from")

    def time(self, prefill_tokens: int, decode_reqs: int, kv_tokens_read: int) -> float:
        return (self.a + self.b_prefill_token * prefill_tokens + self.c_decode_req * decode_reqs
                + self.e_kv_token * kv_tokens_read)

    def batch_time(self, batch: ScheduledBatch) -> float:
        return self.time(*batch_features(batch))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        missing = [f for f in FIELDS if f not in d]
        if missing:
            raise ValueError(f"cost model is missing {', '.join(missing)}")
        return cls(name=str(d["name"]), a=float(d["a"]), b_prefill_token=float(d["b_prefill_token"]),
                   c_decode_req=float(d["c_decode_req"]), e_kv_token=float(d["e_kv_token"]),
                   source=str(d["source"]))

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in FIELDS}

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        with open(path) as f:
            return cls.from_dict(json.load(f))


def batch_features(batch: ScheduledBatch) -> tuple[int, int, int]:
    """(prefill_tokens, decode_reqs, kv_tokens_read) of a pass: what the cost model charges, and what
    `bench calibrate` regresses measured pass times on."""
    # seq_lens = prefix + extend: every token each request's attention reads this pass
    kv = int(batch.seq_lens.sum())
    if batch.mode is BatchMode.PREFILL:
        return batch.num_tokens, 0, kv
    return 0, len(batch.reqs), kv


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
