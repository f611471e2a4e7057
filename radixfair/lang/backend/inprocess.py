"""Backends over an engine in this process, through its typed contract (`radixfair.io_struct`):
the native API's bodies become `EngineRequest`s, the engine's `EngineOutput`s fold into
`RequestResult`s, and no HTTP is involved.

`InProcessBackend(engine)` drives an engine the caller owns; `Runtime(...)` (SGLang's name) starts
its own. The engine (and torch) is imported only here, and only when one is built.
"""

from __future__ import annotations

import json
import logging
import queue
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from radixfair.io_struct import (
    EngineOutput,
    ErrorKind,
    RequestResult,
    TokenizedRequest,
    build_requests,
    default_input_logprobs,
    result_for,
)
from radixfair.lang.backend.native import NativeBackend
from radixfair.lang.chat_template import ChatTemplate, get_chat_template, model_chat_template
from radixfair.lang.errors import BackendError

if TYPE_CHECKING:
    from radixfair.engine.engine import Engine

_STATUS = {ErrorKind.INVALID_REQUEST: 400, ErrorKind.INTERNAL: 500, ErrorKind.UNAVAILABLE: 503}


class InProcessBackend(NativeBackend):
    def __init__(self, engine: Engine, client_id: str = "default", chat_template_name: str | None = None) -> None:
        """`client_id`: whom the fair scheduler charges for this backend's requests."""
        self.engine = engine
        self.client_id = client_id
        tok = engine.tokenizer
        self.chat_template: ChatTemplate = (
            get_chat_template(chat_template_name) if chat_template_name
            else model_chat_template(tok.chat_template, tok.special_token_strings())
        )
        self._token_texts: dict[int, str] = {}

    def get_model_name(self) -> str:
        return self.engine.model_names.source

    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    def flush_cache(self) -> None:
        try:
            self.engine.flush_cache()
        except RuntimeError as e:
            raise BackendError(f"cannot flush the cache now: {e}", 400) from e

    def get_server_info(self) -> dict[str, Any]:
        from dataclasses import asdict

        e = self.engine
        return {"model_path": e.model_names.source, "max_total_tokens": e.max_total_tokens, "context_length": e.context_len,
                "engine_args": asdict(e.args), "stats": e.get_stats().to_dict()}

    # ---- the native API's bodies as engine requests -----------------------------------------------
    def _tokenized(self, body: dict[str, Any], stream: bool) -> tuple[list[TokenizedRequest], bool]:
        try:
            reqs, single = build_requests(
                body.get("text"), body.get("input_ids"), body.get("sampling_params"), body.get("rid"),
                self.client_id, bool(body.get("return_logprob", False)), body.get("logprob_start_len", -1),
                body.get("top_logprobs_num", 0), stream)
            return [self.engine.tokenize(r) for r in reqs], single
        except ValueError as e:
            raise BackendError(str(e), 400) from e

    def _generate(self, body: dict[str, Any]) -> Any:
        treqs, single = self._tokenized(body, stream=False)
        queues = []
        for treq in treqs:
            q: queue.Queue[EngineOutput] = queue.Queue()
            self._submit(treq, q)
            queues.append(q)
        text_in_logprobs = bool(body.get("return_text_in_logprobs"))
        outs = []
        for treq, q in zip(treqs, queues, strict=True):
            res = _start(treq)
            while not res.finished:
                res.add(q.get())
            _raise_error(res)
            outs.append(self._native(res, text_in_logprobs))
        return outs[0] if single and len(outs) == 1 else outs

    def _generate_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        treqs, _ = self._tokenized(body, stream=True)
        if len(treqs) != 1:
            raise BackendError("a stream takes one prompt", 400)
        treq = treqs[0]
        q: queue.Queue[EngineOutput] = queue.Queue()
        self._submit(treq, q)
        res = _start(treq)
        text_in_logprobs = bool(body.get("return_text_in_logprobs"))
        try:
            while not res.finished:
                res.add(q.get())
                _raise_error(res)
                yield self._native(res, text_in_logprobs)
        finally:
            if not res.finished:
                self.engine.abort(treq.rid)  # the reader left: free the request's KV and batch slot

    def _submit(self, treq: TokenizedRequest, q: queue.Queue[EngineOutput]) -> None:
        try:
            self.engine.submit(treq, q.put)
        except RuntimeError as e:
            raise BackendError(str(e), 503) from e

    def _native(self, res: RequestResult, text_in_logprobs: bool) -> dict[str, Any]:
        """The result in the native API's shape, as the server answers it."""
        out = res.to_dict()
        meta = out["meta_info"]
        if "input_token_logprobs" not in meta:
            return out
        lps = [x.logprob for x in res.input_logprobs if x.logprob is not None]
        if lps:
            meta["normalized_prompt_logprob"] = sum(lps) / len(lps)
        if text_in_logprobs:
            for key in ("input_token_logprobs", "output_token_logprobs"):
                meta[key] = [(e[0], e[1], self._token_text(e[1])) for e in meta[key]]
        return out

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
        return text


def _start(treq: TokenizedRequest) -> RequestResult:
    res = result_for(treq.request)
    res.input_logprobs.extend(default_input_logprobs(treq))
    return res


def _raise_error(res: RequestResult) -> None:
    if res.error is not None:
        raise BackendError(res.error.message, _STATUS.get(res.error.kind))


class Runtime:
    """SGLang's `Runtime`: a model served by this process. Its backend is `runtime.endpoint` (an
    `InProcessBackend`; no HTTP server); `set_default_backend(runtime)` and `backend=runtime` use it.

    `Runtime(model_path=None, **engine_args)`: `model_path` is a GGUF file or a Hugging Face folder
    (the default model when None); other keyword arguments are the engine's (`EngineArgs`: e.g.
    `max_total_tokens`, `dtype`, `disable_radix_cache`)."""

    def __init__(self, model_path: str | None = None, log_level: str = "error", *, client_id: str = "default",
                 chat_template_name: str | None = None, **engine_args: Any) -> None:
        from radixfair.engine.engine import Engine

        logging.getLogger("radixfair").setLevel(log_level.upper())
        model = model_path if model_path is not None else engine_args.pop("model", None)
        self.engine = Engine(model=model, **engine_args)
        self.endpoint = InProcessBackend(self.engine, client_id, chat_template_name)

    def cache_prefix(self, prefix: str) -> None:
        self.endpoint.cache_prefix(prefix)

    def flush_cache(self) -> None:
        self.endpoint.flush_cache()

    def get_server_info(self) -> dict[str, Any]:
        return self.endpoint.get_server_info()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompt: str | list[str], sampling_params: dict[str, Any] | None = None,
                 return_logprob: bool = False, logprob_start_len: int | None = None,
                 top_logprobs_num: int | None = None) -> str:
        """SGLang's `Runtime.generate`: the `/generate` answer, as a JSON string."""
        body: dict[str, Any] = {"text": prompt, "sampling_params": sampling_params, "return_logprob": return_logprob}
        if logprob_start_len is not None:
            body["logprob_start_len"] = logprob_start_len
        if top_logprobs_num is not None:
            body["top_logprobs_num"] = top_logprobs_num
        return json.dumps(self.endpoint._generate(body))

    async def async_generate(self, prompt: str, sampling_params: dict[str, Any] | None = None) -> AsyncIterator[str]:
        """SGLang's `Runtime.async_generate`: the new text of each step."""
        treqs, _ = self.endpoint._tokenized({"text": prompt, "sampling_params": sampling_params}, stream=True)
        res = _start(treqs[0])
        async for out in self.engine.generate_async(treqs[0]):
            res.add(out)
            _raise_error(res)
            if out.text:
                yield out.text

    add_request = async_generate

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
