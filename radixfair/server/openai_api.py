"""OpenAI-compatible adapters: request bodies -> SGLang sampling params, results -> OpenAI objects."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from radixfair.sched.request import Req
from radixfair.server.protocol import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from radixfair.engine.engine import Engine

# OpenAI names of the engine's fields, so that an error names what the caller actually sent
_RENAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


def rename_fields(message: str) -> str:
    for ours, theirs in _RENAMES.items():
        if message.startswith(ours + ":"):
            return theirs + message[len(ours):]
    return message


def split_prompt(prompt: Any) -> tuple[str | list[str] | None, list[int] | list[list[int]] | None]:
    """OpenAI's `prompt` is text, a list of texts, token ids, or a list of token-id lists."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], str):
        return None, prompt
    if isinstance(prompt, list) and not prompt:
        return None, []  # the engine answers with "input_ids is empty"
    return prompt, None


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages with `content` as plain text (parts of type "text" are joined)."""
    if not messages:
        raise ValueError("messages: give at least one message")
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise ValueError(f"messages[{i}].role: must be a string")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ValueError(f"messages[{i}].content: only text parts are supported")
                texts.append(str(part.get("text", "")))
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: must be a string or a list of text parts")
        out.append({**m, "content": content})
    return out


def sampling_params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None) -> dict[str, Any]:
    """SGLang sampling params from an OpenAI body; None means "the engine's default"."""
    p: dict[str, Any] = {
        "max_new_tokens": max_tokens,
        "min_new_tokens": body.min_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty,
        "stop": body.stop,
        "stop_token_ids": body.stop_token_ids,
        "ignore_eos": body.ignore_eos,
        "skip_special_tokens": body.skip_special_tokens,
        "seed": body.seed,
        "n": body.n,
    }
    return {k: v for k, v in p.items() if v is not None}


def finish_reason(out: dict[str, Any]) -> str | None:
    fr = out.get("meta_info", {}).get("finish_reason")
    if not fr:
        return None
    return str(fr.get("type"))  # "stop" | "length" | "abort"


class Completion:
    """One OpenAI (chat) completion over `reqs`: prompt-major, `n` samples per prompt."""

    def __init__(self, engine: Engine, reqs: list[Req], model: str, n: int, chat: bool) -> None:
        self.engine = engine
        self.reqs = reqs
        self.model = model
        self.n = max(1, n)
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    # ---- usage and logprobs -------------------------------------------------------------------
    def usage(self, outs: list[dict[str, Any]]) -> dict[str, Any]:
        # a prompt sampled n times is billed (and cached) once, as OpenAI counts it
        metas = [o.get("meta_info", {}) for o in outs]
        prompt = sum(m.get("prompt_tokens", 0) for i, m in enumerate(metas) if i % self.n == 0)
        cached = sum(m.get("cached_tokens", 0) for i, m in enumerate(metas) if i % self.n == 0)
        completion = sum(m.get("completion_tokens", 0) for m in metas)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _tok(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    def logprobs(self, out: dict[str, Any], start: int = 0) -> dict[str, Any] | None:
        meta = out.get("meta_info", {})
        if "output_token_logprobs" not in meta:
            return None
        lps = meta["output_token_logprobs"][start:]
        tops = (meta.get("output_top_logprobs") or [None] * len(meta["output_token_logprobs"]))[start:]
        if self.chat:
            content = []
            for (lp, tid, _), top in zip(lps, tops, strict=False):
                tok = self._tok(tid)
                content.append({
                    "token": tok, "logprob": lp, "bytes": list(tok.encode()),
                    "top_logprobs": [{"token": self._tok(t), "logprob": tl, "bytes": list(self._tok(t).encode())}
                                     for tl, t, _ in (top or [])],
                })
            return {"content": content}
        tokens = [self._tok(tid) for _, tid, _ in lps]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp for lp, _, _ in lps],
            "top_logprobs": [None if top is None else {self._tok(t): tl for tl, t, _ in top} for top in tops],
            "text_offset": offsets,
        }

    # ---- whole response -----------------------------------------------------------------------
    def response(self, outs: list[dict[str, Any]]) -> dict[str, Any]:
        choices = []
        for i, out in enumerate(outs):
            choice: dict[str, Any] = {"index": i, "logprobs": self.logprobs(out), "finish_reason": finish_reason(out)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": out.get("text", "")}
            else:
                choice["text"] = out.get("text", "")
            choices.append(choice)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(outs)}

    # ---- streaming ----------------------------------------------------------------------------
    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                               "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        return obj

    async def stream(self, include_usage: bool = False) -> AsyncIterator[bytes]:
        from radixfair.server.app import SSE_DONE, merge_streams, sse

        sent_text = [0] * len(self.reqs)
        sent_lps = [0] * len(self.reqs)
        finals: list[dict[str, Any]] = [{} for _ in self.reqs]
        if self.chat:
            yield sse(self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None} for i in range(len(self.reqs))]))
        async with aclosing(merge_streams(self.engine, self.reqs)) as outs:
            async for i, out in outs:
                text = out.get("text", "")
                delta = text[sent_text[i]:]
                sent_text[i] = len(text)
                fr = finish_reason(out) if out["finished"] else None
                lp = self.logprobs(out, sent_lps[i])
                sent_lps[i] = len(out.get("meta_info", {}).get("output_token_logprobs", []))
                if not delta and fr is None:
                    continue  # a token that decoded to no text yet (a partial UTF-8 sequence)
                choice: dict[str, Any] = {"index": i, "logprobs": lp, "finish_reason": fr}
                if self.chat:
                    choice["delta"] = {"content": delta} if delta else {}
                else:
                    choice["text"] = delta
                yield sse(self._chunk([choice]))
                if out["finished"]:
                    finals[i] = out
        if include_usage:
            yield sse(self._chunk([], self.usage(finals)))
        yield SSE_DONE
