"""The expressions a program appends to its state (`s += ...`), and the sampling settings of `gen`.

An expression is data: building one sends nothing. `a + b` of two expressions (or of a string and
an expression) is an `ExprList`, so `s += "Q: " + question + gen("answer")` appends three steps
that the state's worker executes in order.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from radixfair.lang.choices import ChoicesSamplingMethod
    from radixfair.lang.interpreter import ProgramState

# What SGLang's frontend constrains typed generations to (`dtype=int`, `gen_int`, ...): the same
# expressions, so that a program gets the same values on either system.
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""


class Expr:
    """Something a program state executes: text to append, a generation, a role boundary, ..."""

    def __add__(self, other: object) -> ExprList:
        return _concat(self, as_expr(other))

    def __radd__(self, other: object) -> ExprList:
        return _concat(as_expr(other), self)


def as_expr(x: object) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, str):
        return ConstantText(x)
    raise TypeError(f"cannot append a {type(x).__name__} to a program state: use a string or an expression "
                    f"(gen, select, a role, ...); format values with str() or an f-string first")


def _concat(a: Expr, b: Expr) -> ExprList:
    left = a.exprs if isinstance(a, ExprList) else [a]
    right = b.exprs if isinstance(b, ExprList) else [b]
    return ExprList([*left, *right])


class ExprList(Expr):
    def __init__(self, exprs: Sequence[Expr]) -> None:
        self.exprs = list(exprs)

    def __repr__(self) -> str:
        return f"ExprList({self.exprs!r})"


class ConstantText(Expr):
    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"ConstantText({self.value!r})"


@dataclass(frozen=True)
class GenParams:
    """How `gen` samples: the defaults come from `run(...)`, a `gen(...)` argument overrides its field.
    SGLang's names (`max_new_tokens` is `gen`'s `max_tokens`)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool | None = None
    dtype: type | str | None = None
    regex: str | None = None
    json_schema: str | None = None

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))

    def merged(self, overrides: dict[str, Any]) -> GenParams:
        return dataclasses.replace(self, **overrides) if overrides else self

    def with_dtype_constraint(self) -> GenParams:
        """`dtype` as SGLang's frontend sends it: a regex (and, for numbers, a space or newline ends
        the value). dtype wins over an explicit regex, as in SGLang."""
        if self.dtype is None:
            return self
        dtype = self.dtype
        stop = self.stop
        if dtype in ("int", int):
            regex, stop = REGEX_INT, (*stop, " ", "\n")
        elif dtype in ("float", float):
            regex, stop = REGEX_FLOAT, (*stop, " ", "\n")
        elif dtype in ("str", str):
            regex = REGEX_STR
        elif dtype in ("bool", bool):
            regex = REGEX_BOOL
        else:
            raise ValueError(f"dtype: must be int, float, str or bool (got {dtype!r})")
        return dataclasses.replace(self, regex=regex, stop=stop, dtype=None)

    def sampling_params(self) -> dict[str, Any]:
        """The native API's `sampling_params` (constraints only when set)."""
        d: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "stop": list(self.stop),
            "stop_token_ids": list(self.stop_token_ids),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "ignore_eos": self.ignore_eos,
        }
        if self.regex is not None:
            d["regex"] = self.regex
        if self.json_schema is not None:
            d["json_schema"] = self.json_schema
        return d


def json_schema_text(schema: Any) -> str:
    """A JSON schema given as text, a dict or a pydantic model class, as the text the server takes."""
    if isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        return json.dumps(schema)
    model_json_schema = getattr(schema, "model_json_schema", None)
    if callable(model_json_schema):
        return json.dumps(model_json_schema())
    raise TypeError(f"json_schema: must be a JSON string, a dict or a pydantic model class (got {schema!r})")


class Gen(Expr):
    def __init__(self, name: str | None, overrides: dict[str, Any]) -> None:
        self.name = name
        self.overrides = {k: v for k, v in overrides.items() if v is not None}

    def __repr__(self) -> str:
        return f"Gen({self.name!r})"


class Select(Expr):
    def __init__(self, name: str | None, choices: Sequence[str], temperature: float,
                 choices_method: ChoicesSamplingMethod) -> None:
        if not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError("select: choices must be a non-empty list of strings")
        self.name = name
        self.choices = list(choices)
        self.temperature = temperature
        self.choices_method = choices_method

    def __repr__(self) -> str:
        return f"Select({self.name!r}, choices={self.choices!r})"


class RoleBegin(Expr):
    def __init__(self, role: str) -> None:
        self.role = role

    def __repr__(self) -> str:
        return f"RoleBegin({self.role!r})"


class RoleEnd(Expr):
    def __init__(self, role: str) -> None:
        self.role = role

    def __repr__(self) -> str:
        return f"RoleEnd({self.role!r})"


class VarScopeBegin(Expr):
    def __init__(self, name: str) -> None:
        self.name = name


class VarScopeEnd(Expr):
    def __init__(self, name: str) -> None:
        self.name = name


class Image(Expr):
    def __init__(self, path: str) -> None:
        self.path = path


class Video(Expr):
    def __init__(self, path: str, num_frames: int) -> None:
        self.path = path
        self.num_frames = num_frames


class CommitLazy(Expr):
    """Prefill what the state holds so far, so that the forks about to start share its KV."""


class ConcatenateAndAppend(Expr):
    """`join(mode="concate_and_append")`: append each branch's new text, in order."""

    def __init__(self, states: Sequence[ProgramState]) -> None:
        self.states = list(states)


def named_exprs(expr: Expr) -> list[str]:
    """Names of the variables `expr` will set (reading one waits for it)."""
    if isinstance(expr, ExprList):
        return [n for e in expr.exprs for n in named_exprs(e)]
    if isinstance(expr, (Gen, Select)) and expr.name is not None:
        return [expr.name]
    if isinstance(expr, VarScopeBegin):
        return [expr.name]
    return []
