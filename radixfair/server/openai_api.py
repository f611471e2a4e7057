"""The OpenAI-compatible API: `/v1/models`, `/v1/completions`, `/v1/chat/completions`."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from radixfair.io_struct import (
    EngineRequest,
    FinishReason,
    RequestLimits,
    RequestResult,
    TokenizedRequest,
    TokenLogprob,
    build_requests,
)
from radixfair.sampling_params import SamplingParams
from radixfair.server.auth import client_of
from radixfair.server.errors import APIError, engine_error, first_error, param_of
from radixfair.server.protocol import ChatCompletionRequest, CompletionRequest
from radixfair.server.state import ServerState, State
from radixfair.server.streaming import SSE_DONE, collect, error_event, merge_streams, sse

router = APIRouter()

# OpenAI names of the engine's fields, so that an error names what the caller actually sent
_RENAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "text": "prompt", "input_ids": "prompt",
            "json_schema": "response_format"}


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
        return None, []  # answered with "input_ids is empty"
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


def response_format_schema(fmt: dict[str, Any] | None) -> str | dict[str, Any] | None:
    """OpenAI's `response_format` as the engine's `json_schema`: `{"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}` constrains to the schema, `{"type": "json_object"}`
    to any JSON object, `{"type": "text"}` (or none) to nothing."""
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError("response_format: json_schema.schema must be a JSON schema object",
                           param="response_format")
        return schema
    raise APIError(f"response_format: type must be text, json_object or json_schema (got {kind!r})",
                   param="response_format")


def engine_requests(body: CompletionRequest | ChatCompletionRequest, client: str, max_tokens: int | None,
                    text: str | list[str] | None, input_ids: list[int] | list[list[int]] | None,
                    return_logprob: bool, top_logprobs_num: int,
                    limits: RequestLimits | None = None) -> list[EngineRequest]:
    """Prompt-major, `n` samples of each prompt in a row (OpenAI's choice order). Fields left out
    take the engine's defaults; an error names the field as OpenAI calls it."""
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
        "json_schema": response_format_schema(body.response_format),
        "regex": body.regex,
        "ebnf": body.ebnf,
    }
    try:
        raw = {k: v for k, v in p.items() if v is not None}
        if limits is not None:
            limits.check_sampling(raw)
        sp = SamplingParams.from_dict(raw)
        reqs, _ = build_requests(text, input_ids, sp, body.rid, client, return_logprob,
                                 top_logprobs_num=top_logprobs_num, stream=body.stream, limits=limits)
    except ValueError as e:
        msg = rename_fields(str(e))
        raise APIError(msg, param=param_of(msg, "prompt" if "prompt" in msg else None)) from e
    return reqs


def finish_reason(fr: FinishReason | None) -> str | None:
    return None if fr is None else fr.type  # "stop" | "length" | "abort"


class Completion:
    """One OpenAI (chat) completion over its engine requests: prompt-major, `n` samples per prompt."""

    def __init__(self, state: ServerState, treqs: list[TokenizedRequest], client: str, n: int, chat: bool) -> None:
        self.state = state
        self.treqs = treqs
        self.client = client
        self.n = max(1, n)
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    # ---- usage and logprobs -------------------------------------------------------------------
    def usage(self, results: list[RequestResult]) -> dict[str, Any]:
        # a prompt sampled n times is billed (and cached) once, as OpenAI counts it
        firsts = results[:: self.n]
        prompt = sum(r.prompt_tokens for r in firsts)
        cached = sum(r.cached_tokens for r in firsts)
        completion = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def logprobs(self, lps: Sequence[TokenLogprob], wanted: bool) -> dict[str, Any] | None:
        if not wanted:
            return None
        tok = self.state.token_text
        if self.chat:
            content = []
            for x in lps:
                t = tok(x.token_id)
                content.append({
                    "token": t, "logprob": x.logprob, "bytes": list(t.encode()),
                    "top_logprobs": [{"token": tok(tid), "logprob": tl, "bytes": list(tok(tid).encode())}
                                     for tl, tid in (x.top or ())],
                })
            return {"content": content}
        tokens = [tok(x.token_id) for x in lps]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [x.logprob for x in lps],
            "top_logprobs": [None if x.top is None else {tok(tid): tl for tl, tid in x.top} for x in lps],
            "text_offset": offsets,
        }

    # ---- whole response -----------------------------------------------------------------------
    def response(self, results: list[RequestResult]) -> dict[str, Any]:
        choices = []
        for i, res in enumerate(results):
            choice: dict[str, Any] = {"index": i, "logprobs": self.logprobs(res.output_logprobs, res.return_logprob),
                                      "finish_reason": finish_reason(res.finish_reason)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": res.text}
            else:
                choice["text"] = res.text
            choices.append(choice)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.state.model_name,
                "choices": choices, "usage": self.usage(results)}

    # ---- streaming ----------------------------------------------------------------------------
    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                               "created": self.created, "model": self.state.model_name, "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        return obj

    async def stream(self, include_usage: bool = False) -> AsyncIterator[bytes]:
        results = [RequestResult(t.rid) for t in self.treqs]
        if self.chat:
            yield sse(self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None} for i in range(len(self.treqs))]))
        async with aclosing(merge_streams(self.state, self.treqs, self.client)) as outs:
            async for i, out in outs:
                results[i].add(out)
                if out.error is not None:
                    yield error_event(engine_error(out.error, rename_fields), i)
                    continue
                fr = finish_reason(out.finish_reason)
                if not out.text and fr is None:
                    continue  # a token that decoded to no text yet (a partial UTF-8 sequence)
                wanted = self.treqs[i].request.return_logprob
                choice: dict[str, Any] = {"index": i, "logprobs": self.logprobs(out.output_logprobs, wanted),
                                          "finish_reason": fr}
                if self.chat:
                    choice["delta"] = {"content": out.text} if out.text else {}
                else:
                    choice["text"] = out.text
                yield sse(self._chunk([choice]))
        if include_usage:
            yield sse(self._chunk([], self.usage(results)))
        yield SSE_DONE


def _usage_wanted(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


async def _respond(state: ServerState, body: CompletionRequest | ChatCompletionRequest, request: Request,
                   reqs: list[EngineRequest], client: str, chat: bool) -> Response:
    with state.admission.admit(client, len(reqs)) as ticket:
        treqs = await state.tokenize(reqs, rename_fields)
        oa = Completion(state, treqs, client, body.n, chat=chat)
        if body.stream:
            state.check_rids(treqs)
            return ticket.stream(oa.stream(include_usage=_usage_wanted(body)))
        results = await collect(state, treqs, client, request)
    err = first_error(results)
    if err is not None:
        raise engine_error(err, rename_fields)
    return JSONResponse(oa.response(results))


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "radixfair",
            "root": state.engine.model_names.source, "max_model_len": state.engine.context_len}


@router.get("/v1/models")
async def list_models(state: State) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/v1/models/{model:path}")  # a repo id has a slash in it
async def retrieve_model(model: str, state: State) -> dict[str, Any]:
    state.check_model(model)
    return _model_card(state)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: State) -> Response:
    state.check_alive()
    state.check_model(body.model)
    if body.echo:
        raise APIError("echo is not supported", param="echo")
    if body.logprobs is not None and not 0 <= body.logprobs <= 20:
        raise APIError(f"logprobs: must be in [0, 20] (got {body.logprobs})", param="logprobs")
    text, ids = split_prompt(body.prompt)
    client = client_of(request, body.user)
    reqs = engine_requests(body, client, body.max_tokens, text, ids, body.logprobs is not None, body.logprobs or 0,
                           state.engine.limits)
    return await _respond(state, body, request, reqs, client, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           state: State) -> Response:
    state.check_alive()
    state.check_model(body.model)
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
        raise APIError(f"top_logprobs: must be in [0, 20] (got {body.top_logprobs})", param="top_logprobs")
    try:
        messages = normalize_messages(body.messages)
    except ValueError as e:
        raise APIError(str(e), param="messages") from e
    text = await state.render_chat(messages)  # off the event loop
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    client = client_of(request, body.user)
    reqs = engine_requests(body, client, max_tokens, text, None, body.logprobs, body.top_logprobs or 0,
                           state.engine.limits)
    return await _respond(state, body, request, reqs, client, chat=True)

