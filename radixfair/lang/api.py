"""The language's primitives, with SGLang's names and signatures, so that an SGLang program runs with
`import radixfair as sgl`."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from radixfair.lang.choices import ChoicesSamplingMethod, token_length_normalized
from radixfair.lang.config import global_config
from radixfair.lang.ir import (
    Expr,
    ExprList,
    Gen,
    Image,
    RoleBegin,
    RoleEnd,
    Select,
    Video,
    as_expr,
    json_schema_text,
)
from radixfair.lang.program import SglFunction, resolve_backend


def function(func: Callable[..., Any] | None = None, num_api_spec_tokens: int | None = None) -> Any:
    """`@function` (or `@function(...)`) makes `func(s, ...)` a program."""
    if func is not None:
        return SglFunction(func, num_api_spec_tokens=num_api_spec_tokens)

    def decorator(f: Callable[..., Any]) -> SglFunction:
        return SglFunction(f, num_api_spec_tokens=num_api_spec_tokens)

    return decorator


def set_default_backend(backend: Any) -> None:
    """The backend `run`, `run_batch`, `cache`, `flush_cache` and `get_server_info` use by default."""
    global_config.default_backend = backend


def flush_cache(backend: Any = None) -> bool:
    """Empty the backend's prefix cache; False when there is no backend."""
    if backend is None and global_config.default_backend is None:
        return False
    resolve_backend(backend).flush_cache()
    return True


def get_server_info(backend: Any = None) -> dict[str, Any] | None:
    if backend is None and global_config.default_backend is None:
        return None
    return resolve_backend(backend).get_server_info()


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
    dtype: type | str | None = None,
    choices: list[str] | None = None,
    choices_method: ChoicesSamplingMethod | None = None,
    regex: str | None = None,
    json_schema: Any = None,
) -> Expr:
    """Generate text into the variable `name`. Arguments left None take the program's defaults (the
    sampling arguments of `run`). `choices` makes it a `select`; `regex`, `json_schema` and `dtype`
    (int, float, str, bool) constrain the output."""
    if choices:
        return Select(name, choices, 0.0 if temperature is None else temperature,
                      choices_method or token_length_normalized)
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as e:
            raise ValueError(f"gen: regex {regex!r} is not a valid regular expression: {e}") from e
    return Gen(name, {
        "max_new_tokens": max_tokens, "min_new_tokens": min_tokens, "n": n,
        "stop": None if stop is None else ((stop,) if isinstance(stop, str) else tuple(stop)),
        "stop_token_ids": None if stop_token_ids is None else tuple(stop_token_ids),
        "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
        "frequency_penalty": frequency_penalty, "presence_penalty": presence_penalty, "ignore_eos": ignore_eos,
        "return_logprob": return_logprob, "logprob_start_len": logprob_start_len,
        "top_logprobs_num": top_logprobs_num, "return_text_in_logprobs": return_text_in_logprobs,
        "dtype": dtype, "regex": regex,
        "json_schema": None if json_schema is None else json_schema_text(json_schema),
    })


def gen_int(name: str | None = None, max_tokens: int | None = None, n: int | None = None,
            stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
            temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
            min_p: float | None = None, frequency_penalty: float | None = None,
            presence_penalty: float | None = None, ignore_eos: bool | None = None,
            return_logprob: bool | None = None, logprob_start_len: int | None = None,
            top_logprobs_num: int | None = None, return_text_in_logprobs: bool | None = None) -> Expr:
    """`gen` of an integer."""
    return gen(name, max_tokens, None, n, stop, stop_token_ids, temperature, top_p, top_k, min_p,
               frequency_penalty, presence_penalty, ignore_eos, return_logprob, logprob_start_len,
               top_logprobs_num, return_text_in_logprobs, dtype=int)


def gen_string(name: str | None = None, max_tokens: int | None = None, n: int | None = None,
               stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
               temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
               min_p: float | None = None, frequency_penalty: float | None = None,
               presence_penalty: float | None = None, ignore_eos: bool | None = None,
               return_logprob: bool | None = None, logprob_start_len: int | None = None,
               top_logprobs_num: int | None = None, return_text_in_logprobs: bool | None = None) -> Expr:
    """`gen` of a double-quoted string of letters, digits and spaces."""
    return gen(name, max_tokens, None, n, stop, stop_token_ids, temperature, top_p, top_k, min_p,
               frequency_penalty, presence_penalty, ignore_eos, return_logprob, logprob_start_len,
               top_logprobs_num, return_text_in_logprobs, dtype=str)


def select(name: str | None = None, choices: Sequence[str] | None = None, temperature: float = 0.0,
           choices_method: ChoicesSamplingMethod = token_length_normalized) -> Expr:
    """Append the choice the model finds most likely here (by `choices_method`), into `name`."""
    if choices is None:
        raise ValueError("select: give the choices")
    return Select(name, choices, temperature, choices_method)


def image(expr: str) -> Expr:
    """An image input; radixfair's models take text only, so running it is an error."""
    return Image(expr)


def video(path: str, num_frames: int) -> Expr:
    return Video(path, num_frames)


def _role(role: str, expr: object = None) -> Expr:
    if expr is None:
        return ExprList([RoleBegin(role), RoleEnd(role)])
    return ExprList([RoleBegin(role), as_expr(expr), RoleEnd(role)])


def system(expr: object = None) -> Expr:
    """A system message around `expr`, in the served model's chat template."""
    return _role("system", expr)


def user(expr: object = None) -> Expr:
    return _role("user", expr)


def assistant(expr: object = None) -> Expr:
    return _role("assistant", expr)


def system_begin() -> Expr:
    return RoleBegin("system")


def system_end() -> Expr:
    return RoleEnd("system")


def user_begin() -> Expr:
    return RoleBegin("user")


def user_end() -> Expr:
    return RoleEnd("user")


def assistant_begin() -> Expr:
    return RoleBegin("assistant")


def assistant_end() -> Expr:
    return RoleEnd("assistant")


def Runtime(*args: Any, **kwargs: Any) -> Any:
    """A model served by this process (imports the engine, and torch, only when called)."""
    from radixfair.lang.backend.inprocess import Runtime as _Runtime

    return _Runtime(*args, **kwargs)
