"""`OpenAI(model, base_url=..., api_key=...)`: a backend over any OpenAI-style `/v1` API (OpenAI's,
radixfair's own, another server's).

A chat model gets the program's messages (`POST /chat/completions`): a `gen` or `select` must open
an assistant message (`s += assistant(gen("x"))`), and text outside the roles is not sent. A
completion model gets the program's text (`POST /completions`), roles rendered by `chat_template`.
`is_chat_model=None` decides by the model's name, as SGLang does: names with "instruct" (OpenAI's
`gpt-3.5-turbo-instruct`), `davinci` or `babbage` are completion models.

`select` scores each choice by its tokens' prompt logprobs (`echo` with `max_tokens: 0`, the choice
methods of the native backends) where the server offers them; elsewhere (chat models, servers that
refuse `echo`, radixfair's among them) the model generates under a constraint that only the choices
match (SGLang's `regex` extension), greedily by default.

The extensions a plain OpenAI server would refuse (`top_k`, `min_p`, `ignore_eos`, `regex`, ...)
are sent only when a program sets them away from their defaults. Nothing here keeps a prefix cache:
`cache_prefix` does nothing, and API speculative execution (`num_api_spec_tokens`) is what saves
calls.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from radixfair.lang.backend.base import Backend, Continuation
from radixfair.lang.backend.http import HttpClient, api_headers
from radixfair.lang.chat_template import ChatTemplate, FixedChatTemplate, get_chat_template
from radixfair.lang.choices import ChoicesDecision, ChoicesSamplingMethod, LogprobEntry
from radixfair.lang.errors import BackendError

if TYPE_CHECKING:
    from radixfair.lang.interpreter import StreamExecutor
    from radixfair.lang.ir import GenParams

SelectMode = Literal["auto", "logprobs", "constrained"]

# a chat model's roles are its messages: nothing around their content in the program's text
PLAIN_TEMPLATE = FixedChatTemplate("plain", {role: ("", "") for role in ("system", "user", "assistant")})

_FINISH = {"stop": "stop", "length": "length", "content_filter": "abort", "tool_calls": "stop"}


def is_chat_model_name(model: str) -> bool:
    name = model.lower()
    return not ("instruct" in name or name.startswith(("davinci", "babbage")))


class OpenAI(Backend):
    def __init__(self, model: str | None = None, base_url: str = "https://api.openai.com/v1",
                 api_key: str | None = None, is_chat_model: bool | None = None,
                 chat_template: str | ChatTemplate | None = None, select_mode: SelectMode = "auto",
                 timeout: float | None = None, extra_body: dict[str, Any] | None = None,
                 client_id: str | None = None) -> None:
        """`model`: the model's id (None: the first `/models` lists). `api_key` defaults to
        `$OPENAI_API_KEY`. `chat_template` renders roles for a completion model (default: SGLang's
        `default`). `select_mode`: "logprobs" (score by prompt logprobs), "constrained" (generate one
        of the choices), or "auto" (logprobs where the server has them). `extra_body` is merged into
        every request; `client_id` is sent as `X-Client-Id` (radixfair's fair-scheduling unit)."""
        if select_mode not in ("auto", "logprobs", "constrained"):
            raise ValueError(f"select_mode: must be auto, logprobs or constrained (got {select_mode!r})")
        self.base_url = base_url.rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._http = HttpClient(self.base_url, api_headers(api_key, client_id), None, timeout)
        self.extra_body = dict(extra_body or {})
        self.model_name = model if model is not None else self._first_model()
        self.is_chat_model = is_chat_model_name(self.model_name) if is_chat_model is None else bool(is_chat_model)
        if self.is_chat_model:
            self.chat_template: ChatTemplate = PLAIN_TEMPLATE
        elif isinstance(chat_template, ChatTemplate):
            self.chat_template = chat_template
        else:
            self.chat_template = get_chat_template(chat_template or "default")
        self.select_mode: SelectMode = select_mode
        # "auto" learns once whether the server scores prompts (echo)
        self._echo: bool | None = {"auto": None, "logprobs": True, "constrained": False}[select_mode]

    def _first_model(self) -> str:
        listing = self._http.json("GET", "/models")
        data = listing.get("data") if isinstance(listing, dict) else None
        if not data:
            raise BackendError(f"GET {self.base_url}/models lists no model: pass model=...")
        return str(data[0]["id"])

    def get_model_name(self) -> str:
        return self.model_name

    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    def shutdown(self) -> None:
        self._http.close()

    # ---- requests ---------------------------------------------------------------------------------
    def _prompt(self, s: StreamExecutor, what: str) -> dict[str, Any]:
        if not self.is_chat_model:
            return {"prompt": s.text_}
        if s.cur_role != "assistant" or len(s.text_) != s.cur_role_begin_pos:
            raise ValueError(f"{what}: a chat model ({self.model_name}) answers with a whole assistant message: "
                             f"put the {what} right at the start of one (s += assistant({what}(...))), or use "
                             "a completion model (is_chat_model=False)")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in s.messages_]}

    def _path(self) -> str:
        return "/chat/completions" if self.is_chat_model else "/completions"

    def _body(self, s: StreamExecutor, params: GenParams, what: str = "gen") -> dict[str, Any]:
        params = params.with_dtype_constraint()
        body: dict[str, Any] = {"model": self.model_name, **self._prompt(s, what),
                                "max_tokens": params.max_new_tokens, "temperature": params.temperature}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.top_p != 1.0:
            body["top_p"] = params.top_p
        if params.frequency_penalty:
            body["frequency_penalty"] = params.frequency_penalty
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        # SGLang's extensions, sent only when used (a plain OpenAI server refuses unknown fields)
        if params.top_k not in (-1, 0):
            body["top_k"] = params.top_k
        if params.min_p:
            body["min_p"] = params.min_p
        if params.min_new_tokens:
            body["min_tokens"] = params.min_new_tokens
        if params.ignore_eos:
            body["ignore_eos"] = True
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)
        if params.regex is not None:
            body["regex"] = params.regex
        if params.json_schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": json.loads(params.json_schema)}}
        if params.return_logprob:
            if self.is_chat_model:
                body["logprobs"] = True
                if params.top_logprobs_num:
                    body["top_logprobs"] = params.top_logprobs_num
            else:
                body["logprobs"] = params.top_logprobs_num or 0
        return {**body, **self.extra_body}

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        out = self._http.json("POST", self._path(), body)
        if not isinstance(out, dict) or not out.get("choices"):
            raise BackendError(f"POST {self.base_url}{self._path()}: no choices in the answer: {out!r}")
        return out

    def _text(self, choice: dict[str, Any]) -> str:
        if self.is_chat_model:
            return str((choice.get("message") or {}).get("content") or "")
        return str(choice.get("text") or "")

    def _meta(self, out: dict[str, Any], choice: dict[str, Any]) -> dict[str, Any]:
        usage = out.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        finish = choice.get("finish_reason")
        return {
            "id": out.get("id"),
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
            "cached_tokens": details.get("cached_tokens", 0),
            "finish_reason": None if finish is None else {"type": _FINISH.get(finish, finish)},
            "logprobs": choice.get("logprobs"),
        }

    # ---- gen --------------------------------------------------------------------------------------
    def generate(self, s: StreamExecutor, params: GenParams) -> tuple[str, dict[str, Any]]:
        out = self._post(self._body(s, params))
        choice = out["choices"][0]
        return self._text(choice), self._meta(out, choice)

    def generate_stream(self, s: StreamExecutor, params: GenParams) -> Iterator[tuple[str, dict[str, Any]]]:
        body = {**self._body(s, params), "stream": True, "stream_options": {"include_usage": True}}
        meta: dict[str, Any] = {"prompt_tokens": 0, "completion_tokens": 0, "finish_reason": None}
        for data in self._http.sse("POST", self._path(), body):
            chunk = json.loads(data)
            error = chunk.get("error")
            if error is not None:
                message = error.get("message", error) if isinstance(error, dict) else error
                code = error.get("code") if isinstance(error, dict) else None
                raise BackendError(f"POST {self._path()}: {message}", code if isinstance(code, int) else None)
            usage = chunk.get("usage")
            if usage:
                meta = {**meta, "prompt_tokens": usage.get("prompt_tokens", 0),
                        "completion_tokens": usage.get("completion_tokens", 0)}
            for choice in chunk.get("choices") or ():
                piece = (str((choice.get("delta") or {}).get("content") or "") if self.is_chat_model
                         else str(choice.get("text") or ""))
                finish = choice.get("finish_reason")
                if finish is not None:
                    meta = {**meta, "finish_reason": {"type": _FINISH.get(finish, finish)}}
                if piece:
                    yield piece, dict(meta)
        yield "", dict(meta)  # the usage comes in the last chunk, after the text

    def speculate(self, s: StreamExecutor, params: GenParams) -> Continuation:
        """A completion with each token's text (`logprobs: 0`), so the speculation knows where the
        tokens end; a chat model's answer is a whole message and is not cut."""
        body = self._body(s, params)
        if not self.is_chat_model:
            body.setdefault("logprobs", 0)
        out = self._post(body)
        choice = out["choices"][0]
        text = self._text(choice)
        meta = self._meta(out, choice)
        return Continuation(text, _token_ends(text, choice.get("logprobs")), choice.get("finish_reason") == "stop",
                            meta)

    # ---- select -----------------------------------------------------------------------------------
    def select(self, s: StreamExecutor, choices: Sequence[str], temperature: float,
               choices_method: ChoicesSamplingMethod) -> ChoicesDecision:
        choices = list(choices)
        if not self.is_chat_model and self._echo is not False and temperature <= 1e-5:
            try:
                decision = self._select_by_logprobs(s.text_, choices, choices_method)
            except BackendError as e:
                if self._echo is True or e.status not in (400, 422):
                    raise
                self._echo = False  # the server does not score prompts: constrain instead, from now on
            else:
                self._echo = True
                return decision
        return self._select_constrained(s, choices, temperature)

    def _select_by_logprobs(self, prefix: str, choices: list[str],
                            choices_method: ChoicesSamplingMethod) -> ChoicesDecision:
        out = self._http.json("POST", "/completions", {
            "model": self.model_name, "prompt": [prefix + c for c in choices], "echo": True, "logprobs": 0,
            "max_tokens": 0, "temperature": 0, **self.extra_body})
        by_index = sorted(out.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(by_index) != len(choices):
            raise BackendError(f"POST /completions: {len(by_index)} answers for {len(choices)} prompts")
        entries = [_choice_entries(c.get("logprobs"), len(prefix)) for c in by_index]
        normalized = [_mean(e) for e in entries]
        unconditional = None
        if choices_method.requires_unconditional_logprobs:
            out = self._http.json("POST", "/completions", {
                "model": self.model_name, "prompt": choices, "echo": True, "logprobs": 0, "max_tokens": 0,
                "temperature": 0, **self.extra_body})
            alone = [_choice_entries(c.get("logprobs"), 0)
                     for c in sorted(out.get("choices") or [], key=lambda c: c.get("index", 0))]
            # the same number of entries as the conditional ones (tokenized alone, a choice can split
            # differently); a missing value counts as certain
            pad: list[LogprobEntry] = [[0.0, None, None]]
            unconditional = [(u + pad * len(e))[:len(e)] for u, e in zip(alone, entries, strict=True)]
        decision = choices_method(choices=choices, normalized_prompt_logprobs=normalized,
                                  input_token_logprobs=entries, output_token_logprobs=[[] for _ in choices],
                                  unconditional_token_logprobs=unconditional)
        meta = dict(decision.meta_info or {})
        usage = out.get("usage") or {}
        meta.update(select_mode="logprobs", prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=0)
        return ChoicesDecision(decision.decision, meta)

    def _select_constrained(self, s: StreamExecutor, choices: list[str], temperature: float) -> ChoicesDecision:
        regex = "(" + "|".join(re.escape(c) for c in choices) + ")"
        body: dict[str, Any] = {"model": self.model_name, **self._prompt(s, "select"), "regex": regex,
                                "max_tokens": max(len(c) for c in choices) + 1, "temperature": temperature,
                                **self.extra_body}
        out = self._post(body)
        choice = out["choices"][0]
        text = self._text(choice)
        if text not in choices:
            raise BackendError(f"select: the server answered {text!r}, not one of {choices!r} (it may not "
                               "support the `regex` constraint; with a completion model, select_mode='logprobs' "
                               "scores the choices instead where the server offers prompt logprobs)")
        meta = self._meta(out, choice)
        meta["select_mode"] = "constrained"
        return ChoicesDecision(text, meta)


def _token_ends(text: str, logprobs: Any) -> tuple[int, ...] | None:
    """Where each token ends in `text`, from a completion's `logprobs.tokens`; None when the tokens
    do not spell the text (a token that is part of a character, or no logprobs)."""
    tokens = (logprobs or {}).get("tokens") if isinstance(logprobs, dict) else None
    if not isinstance(tokens, list) or "".join(tokens) != text:
        return None
    ends, pos = [], 0
    for t in tokens:
        pos += len(t)
        ends.append(pos)
    return tuple(ends)


def _choice_entries(logprobs: Any, start: int) -> list[LogprobEntry]:
    """SGLang's logprob entries `[logprob, token_id, text]` of the tokens that end after `start`."""
    if not isinstance(logprobs, dict):
        raise BackendError("select: the server gave no prompt logprobs (echo)", 400)
    tokens, values, offsets = logprobs.get("tokens"), logprobs.get("token_logprobs"), logprobs.get("text_offset")
    if not tokens or values is None or offsets is None:
        raise BackendError("select: the server gave no prompt logprobs (echo)", 400)
    return [[v, None, t] for t, v, o in zip(tokens, values, offsets, strict=False) if o + len(t) > start]


def _mean(entries: Sequence[LogprobEntry]) -> float:
    values = [e[0] for e in entries if e[0] is not None]
    return sum(values) / len(values) if values else 0.0
