"""API speculative execution (`@function(num_api_spec_tokens=N)`).

Behind an API with no prefix cache, every `gen` resends the whole program text. A program that
writes several short fields in a row (a character card: name, birthday, job, ...) pays that once
per field. With speculation, a `gen` that needs a call asks for up to N tokens past its own stop;
what the model wrote beyond the answer is kept. The constant text the program appends next is
compared with it, and the next `gen` is answered from it when the program went the way the model
did. Anything else (different text, other sampling settings, a constraint) drops the speculation,
and the next `gen` makes a call again (itself speculative).

A speculated answer ends where a normal call would have ended: at the first stop string, or after
`max_new_tokens` tokens when the server tells where each token ends (otherwise only when the text
is provably short enough: a token is at least one character), or where the model itself stopped.

A chat model cannot continue a half-written message, so there the unit is the assistant message,
as in SGLang: its gens wait, the message is one call of up to N tokens, and each gen's value is cut
out of the answer between the program's constant texts. An answer that does not follow them fails
the state with a clear error (no call could continue the message instead).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from radixfair.lang.ir import GenParams

if TYPE_CHECKING:
    from radixfair.lang.backend.base import Continuation
    from radixfair.lang.interpreter import StreamExecutor

# sampling settings that must be the same for a gen to take its answer from a speculation
_KEY_FIELDS = ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "ignore_eos")


def speculable(params: GenParams) -> bool:
    """Whether a gen's answer can be cut out of a longer free generation."""
    return (params.n == 1 and params.regex is None and params.json_schema is None and params.dtype is None
            and not params.stop_token_ids and params.min_new_tokens == 0 and not params.return_logprob)


def _key(params: GenParams) -> tuple[Any, ...]:
    return tuple(getattr(params, f) for f in _KEY_FIELDS)


class Speculation:
    """One state's speculated continuation of its text, and how far the program has followed it."""

    def __init__(self, num_tokens: int) -> None:
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_api_spec_tokens: must be an integer >= 1 (got {num_tokens!r})")
        self.num_tokens = num_tokens
        self._reset()

    def _reset(self) -> None:
        self.key: tuple[Any, ...] | None = None  # None: nothing speculated
        self.text = ""  # what the model wrote that the program has not reached yet
        self.ends: list[int] | None = None  # token ends in `text` (a token cut in two counts whole)
        self.finished = False
        self.prompt_tokens = 0  # the speculative call's prompt
        self.followed_tokens = 0  # speculated tokens the program has gone past

    @property
    def active(self) -> bool:
        return self.key is not None

    def drop(self, s: StreamExecutor, missed: bool = True) -> None:
        if self.active and missed:
            s.api_usage.add(spec_misses=1)
        self._reset()

    # ---- the program appends text ---------------------------------------------------------------
    def follow(self, s: StreamExecutor, text: str) -> None:
        """The program appended `text`: keep the speculation if the model wrote the same."""
        if not self.active or not text:
            return
        if self.text.startswith(text):
            self._advance(len(text))
        else:
            self.drop(s)

    def _advance(self, n: int) -> None:
        self.text = self.text[n:]
        if self.ends is not None:
            passed = sum(1 for e in self.ends if e <= n)
            self.followed_tokens += passed
            self.ends = [e - n for e in self.ends if e > n]

    # ---- a gen -----------------------------------------------------------------------------------
    def gen(self, s: StreamExecutor, params: GenParams) -> tuple[str, dict[str, Any]]:
        if not speculable(params):
            self.drop(s)
            return s.call_generate(params)
        if self.active:
            same = self.key == _key(params)
            if same:
                answer = self._answer(params)
                if answer is not None:
                    text, meta = answer
                    s.api_usage.add(spec_hits=1, input_tokens_saved=self.prompt_tokens + self.followed_tokens)
                    return text, meta
            self.drop(s, missed=not same)  # same settings: the speculation ran out, it did not miss
        cont = s.call_speculate(dataclasses.replace(
            params, max_new_tokens=max(self.num_tokens, params.max_new_tokens), stop=()))
        self._load(cont, params)
        answer = self._answer(params)
        if answer is None:
            # too little is known about the speculation to cut this gen's answer out of it
            self.drop(s, missed=False)
            return s.call_generate(params)
        text, meta = answer
        return text, {**cont.meta_info, **meta}

    def _load(self, cont: Continuation, params: GenParams) -> None:
        self.key = _key(params)
        self.text = cont.text
        self.ends = list(cont.token_ends) if cont.token_ends is not None else None
        self.finished = cont.finished
        self.prompt_tokens = int(cont.meta_info.get("prompt_tokens") or 0)
        self.followed_tokens = 0

    def _answer(self, params: GenParams) -> tuple[str, dict[str, Any]] | None:
        """The answer a normal call would give here, if the speculation holds it; consumes it."""
        text, limit = self.text, params.max_new_tokens
        stop_at, matched = -1, None
        for stop in params.stop:
            pos = text.find(stop) if stop else -1
            if pos != -1 and (stop_at == -1 or pos < stop_at):
                stop_at, matched = pos, stop
        cut: int | None = None
        finish: dict[str, Any] = {"type": "length", "length": limit}
        tokens: int | None = None
        if self.ends is not None:
            if matched is not None:
                # the tokens a server generates before the stop string is complete
                end = stop_at + len(matched)
                needed = next((i + 1 for i, e in enumerate(self.ends) if e >= end), len(self.ends))
                if needed <= limit:
                    cut, tokens, finish = stop_at, needed, {"type": "stop", "matched": matched}
            if cut is None and len(self.ends) >= limit:
                cut, tokens = self.ends[limit - 1], limit
            if cut is None and matched is None and self.finished:
                cut, tokens, finish = len(text), len(self.ends), {"type": "stop", "matched": None}
        else:
            if matched is not None and stop_at + len(matched) <= limit:
                cut, finish = stop_at, {"type": "stop", "matched": matched}
            elif matched is None and self.finished and len(text) <= limit:
                cut, finish = len(text), {"type": "stop", "matched": None}
        if cut is None:
            return None
        answer = text[:cut]
        self._advance(cut)
        meta: dict[str, Any] = {"finish_reason": finish, "speculative": True}
        if tokens is not None:
            meta["completion_tokens"] = tokens
        return answer, meta


# ---- chat models: one call per assistant message --------------------------------------------------
class DeferredGen(NamedTuple):
    """A gen inside an assistant message of a chat model, waiting for the message's one call."""

    offset: int  # where its value goes in the message's content (the constant text around it is known)
    name: str | None
    params: GenParams


class MessageMismatch(ValueError):
    """The model's message did not follow the program's constant text."""


def fill_message(answer: str, content: str, gens: Sequence[DeferredGen]) -> list[str]:
    """Each deferred gen's value, cut out of the model's whole message `answer`: the program's text
    `content` (the message without the gens' values) must appear in it around them. A value ends at
    its first stop string, else where the next constant text begins, else with the message."""
    values: list[str] = []
    pos, done = 0, 0  # in `answer`, in `content`
    for i, g in enumerate(gens):
        const = content[done:g.offset]
        if not answer.startswith(const, pos):
            raise MessageMismatch(f"expected {const!r} at {answer[pos:pos + len(const) + 16]!r}")
        pos, done = pos + len(const), g.offset
        following = content[g.offset:gens[i + 1].offset] if i + 1 < len(gens) else content[g.offset:]
        ends = [p for p in (answer.find(stop, pos) for stop in g.params.stop if stop) if p != -1]
        if ends:
            end = min(ends)
        elif following:
            end = answer.find(following, pos)
            if end == -1:
                raise MessageMismatch(f"{following!r} does not follow {g.name!r} in {answer[pos:]!r}")
        elif i + 1 < len(gens):
            raise MessageMismatch(f"{g.name!r} and {gens[i + 1].name!r} have no text or stop between them")
        else:
            end = len(answer)
        values.append(answer[pos:end])
        pos = end
    const = content[done:]
    if not answer.startswith(const, pos):
        raise MessageMismatch(f"expected {const!r} at {answer[pos:pos + len(const) + 16]!r}")
    return values
