"""Per-request sampling parameters with SGLang's names, validated on construction and immutable
after it (the engine derives a clipped copy rather than changing a caller's object)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

# Keep room for models with 128k context; the engine checks against its own limits too.
MAX_NEW_TOKENS_LIMIT = 1 << 20
GREEDY_TEMPERATURE = 1e-5
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


def is_utf8(text: str) -> bool:
    """False for a string that cannot be encoded, i.e. one with a lone surrogate ("\\ud800"), which
    JSON can carry but no tokenizer or response can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# The output constraints (structured outputs), SGLang's names; a request may give at most one.
CONSTRAINT_FIELDS = ("regex", "json_schema", "ebnf")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: whole vocabulary
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | Sequence[str] = ()  # stored as a tuple
    stop_token_ids: Sequence[int] = ()  # stored as a tuple
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    n: int = 1
    # structured outputs: the output must match a regex, a JSON schema (as a JSON string; an object is
    # accepted and serialized) or an EBNF grammar
    regex: str | None = None
    json_schema: str | dict[str, Any] | None = None  # stored as a string
    ebnf: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json_schema, dict):
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        for name, value in (("stop", stop), ("stop_token_ids", self.stop_token_ids)):
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{name}: must be a list (got {value!r})")
            object.__setattr__(self, name, tuple(value))
        self.validate()

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        """Build from a JSON-style dict; unknown keys are an error (they are usually typos)."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"sampling_params must be an object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        # SGLang's frontend sends every field it knows, unset ones as null or empty (regex,
        # json_schema, stop_regex=[]): those ask for nothing, so only fields with a value must be known
        d = {k: v for k, v in d.items() if v is not None and not (isinstance(v, (list, dict)) and not v)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    @cached_property
    def stop_token_set(self) -> frozenset[int]:
        return frozenset(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        # dividing logits by a vanishing temperature overflows; it means argmax anyway (as in SGLang)
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(field, text) of the output constraint, if any: ("regex", "[0-9]+"), ("json_schema", "{...}")."""
        for name in CONSTRAINT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                return name, value
        return None

    @property
    def has_penalties(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0

    def validate(self) -> None:
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"{name}: {msg} (got {getattr(self, name)!r})")

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        check(is_int(self.max_new_tokens), "max_new_tokens", "must be an integer")
        check(0 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT, "max_new_tokens",
              f"must be in [0, {MAX_NEW_TOKENS_LIMIT}]")
        check(is_int(self.min_new_tokens) and self.min_new_tokens >= 0, "min_new_tokens", "must be an int >= 0")
        check(self.min_new_tokens <= self.max_new_tokens, "min_new_tokens", "must be <= max_new_tokens")
        check(is_num(self.temperature) and self.temperature >= 0, "temperature", "must be a number >= 0")
        check(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1), "top_k", "must be -1 or >= 1")
        check(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        check(is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
              "must be in [-2, 2]")
        check(is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
              "must be in [-2, 2]")
        check(is_num(self.repetition_penalty) and 0 < self.repetition_penalty <= 2, "repetition_penalty",
              "must be in (0, 2]")
        check(all(isinstance(s, str) and s for s in self.stop), "stop",
              "must be a non-empty string or a list of non-empty strings")
        check(len(self.stop) <= 16, "stop", "at most 16 stop strings")
        check(all(is_utf8(s) for s in self.stop), "stop", "must be valid Unicode (no lone surrogates)")
        check(all(is_int(t) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids", "must be a list of token ids >= 0")
        check(isinstance(self.ignore_eos, bool), "ignore_eos", "must be a boolean")
        # torch's generators take 64 bits; past them the sampler itself would raise, mid-batch
        check(self.seed is None or (is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX), "seed",
              f"must be an integer in [{SEED_MIN}, {SEED_MAX}]")
        check(isinstance(self.skip_special_tokens, bool), "skip_special_tokens", "must be a boolean")
        # special tokens are decoded as a fast tokenizer does (no spaces added around them), which is
        # what `true` gives with fast tokenizers in SGLang and transformers; `false` asks for more
        check(self.spaces_between_special_tokens is True, "spaces_between_special_tokens",
              "only true is supported: special tokens are decoded as fast tokenizers decode them")
        check(is_int(self.n) and 1 <= self.n <= 128, "n", "must be an integer in [1, 128]")
        given = [name for name in CONSTRAINT_FIELDS if getattr(self, name) is not None]
        for name in given:
            check(isinstance(getattr(self, name), str) and getattr(self, name) != "", name,
                  "must be a non-empty string" + (" or a JSON object" if name == "json_schema" else ""))
        if len(given) > 1:
            raise ValueError(f"{given[0]}: give at most one of {', '.join(CONSTRAINT_FIELDS)} (got {' and '.join(given)})")
        if self.json_schema is not None:
            assert isinstance(self.json_schema, str)  # __post_init__ serialized an object
            try:
                schema = json.loads(self.json_schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema: not valid JSON ({e})") from e
            check(isinstance(schema, (dict, bool)), "json_schema", "must be a JSON object (a schema)")
