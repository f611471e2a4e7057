"""FastAPI app factory: `create_app(engine, api_keys)`.

Every handler is a thin adapter: it turns a request body into `Engine.make_requests(...)`, then
reads `Engine.async_generate` streams. The engine owns validation (its `ValueError`s name the bad
field and become 400s) and scheduling; the server owns HTTP framing, auth and client identity.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import asdict, dataclass
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from radixfair.engine.engine import Engine
from radixfair.sched.request import Req
from radixfair.server import openai_api
from radixfair.server.metrics import ServerMetrics
from radixfair.server.protocol import AbortRequest, ChatCompletionRequest, CompletionRequest, GenerateRequest

logger = logging.getLogger(__name__)

CLIENT_HEADERS = ("x-client-id", "x-gateway-inference-fairness-id")
OPEN_PATHS = frozenset({"/health"})  # load balancers probe it without credentials
DEFAULT_CLIENT = "default"
HEALTH_GENERATE_TIMEOUT_S = 20.0
DEFAULT_MAX_BODY_BYTES = 8 << 20


@dataclass(frozen=True)
class ServerClient:
    """Who an API key belongs to; `weight` is its share under the fair policies (vtc, dlpm)."""

    client: str
    weight: float = 1.0


class APIError(Exception):
    """A client error with OpenAI's error shape."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type_
        self.code = code


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: int | str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code or e.status), status_code=e.status)


def param_of(message: str, default: str | None = None) -> str | None:
    """The field a validation message names: SamplingParams writes 'field: ...'."""
    head, sep, _ = message.partition(":")
    if sep and head.isidentifier():
        return head
    return default


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def public(out: dict[str, Any], token_text: Callable[[int], str] | None = None) -> dict[str, Any]:
    """A result dict as the native API returns it: the engine's internal keys dropped; with
    `token_text`, each logprob entry's third element is its token's text (`return_text_in_logprobs`)."""
    res = {k: v for k, v in out.items() if k not in ("finished", "index")}
    meta = res.get("meta_info")
    if not meta or "input_token_logprobs" not in meta:
        return res
    meta = res["meta_info"] = dict(meta)
    # SGLang: the mean over the prompt positions that have a logprob (the first one has none)
    lps = [lp for lp, _, _ in meta["input_token_logprobs"] if lp is not None]
    if lps:
        meta["normalized_prompt_logprob"] = sum(lps) / len(lps)
    if token_text is not None:
        def entry(e: Any) -> tuple[Any, int, str]:
            return (e[0], e[1], token_text(e[1]))
        for key in ("input_token_logprobs", "output_token_logprobs"):
            meta[key] = [entry(e) for e in meta[key]]
        for key in ("input_top_logprobs", "output_top_logprobs"):
            if key in meta:
                meta[key] = [None if top is None else [entry(e) for e in top] for top in meta[key]]
    return res


async def merge_streams(engine: Engine, reqs: list[Req],
                        stream: bool = True) -> AsyncGenerator[tuple[int, dict[str, Any]], None]:
    """Outputs of several requests as they come, tagged with the request's index (with
    `stream=False`, only each request's final output).

    Leaving early (client gone, error) cancels the pumps; each `async_generate` is closed, and
    its `finally` aborts the request so its KV is released and the scheduler stops working for it.
    """
    q: asyncio.Queue[tuple[int, dict[str, Any] | None]] = asyncio.Queue()

    async def pump(i: int, req: Req) -> None:
        try:
            # async_generate is an async generator (annotated as an iterator); closing it runs its
            # abort-on-exit `finally` even when this pump is cancelled between two outputs
            gen = cast(AsyncGenerator[dict[str, Any], None], engine.async_generate(req, stream))
            async with aclosing(gen):
                async for out in gen:
                    q.put_nowait((i, out))
                    if out["finished"]:
                        _observe(engine, req.client_id, out)
        finally:
            q.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    try:
        live = len(tasks)
        while live:
            i, out = await q.get()
            if out is None:
                live -= 1
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(engine: Engine, reqs: list[Req], request: Request) -> list[dict[str, Any]]:
    """Final outputs of `reqs`, aborting them all if the HTTP client disconnects first."""
    finals: list[dict[str, Any]] = [{} for _ in reqs]

    async def run() -> None:
        async with aclosing(merge_streams(engine, reqs, stream=False)) as stream:
            async for i, out in stream:
                if out["finished"]:
                    finals[i] = out

    task = asyncio.create_task(run())
    try:
        # a non-streaming handler is not cancelled when its client goes away; poll for it so that
        # an abandoned long generation does not keep its KV and batch slot
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                break
        await task
    finally:
        if not task.done():
            task.cancel()
    return finals


# engine -> its metrics: apps over one engine share the counters, and they go with the engine
_METRICS: weakref.WeakKeyDictionary[Engine, ServerMetrics] = weakref.WeakKeyDictionary()


def metrics_for(engine: Engine) -> ServerMetrics:
    if engine not in _METRICS:
        _METRICS[engine] = ServerMetrics(engine.args.w_in, engine.args.w_out)
    return _METRICS[engine]


def _observe(engine: Engine, client: str, out: dict[str, Any]) -> None:
    m = _METRICS.get(engine)
    if m is not None:
        m.observe(client, out)


def engine_error(out: dict[str, Any]) -> str | None:
    """The message of a request the engine refused after submission (e.g. a duplicate rid)."""
    meta = out.get("meta_info", {})
    fr = meta.get("finish_reason") or {}
    if fr.get("type") == "abort" and meta.get("error"):
        return str(meta["error"])
    return None


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` (by Content-Length, or as it streams in) is a
    413. The body is read before the app runs (every body here is one JSON document), then replayed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        too_big = length.isdigit() and int(length) > self.max_bytes
        chunks: list[bytes] = []
        size, more = 0, not too_big
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            too_big = size > self.max_bytes
            if too_big:
                break
        if too_big:
            body = error_body(f"the request body is larger than the server's limit of {self.max_bytes} bytes",
                              code=413)
            await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # e.g. http.disconnect, for `request.is_disconnected()`
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


def create_app(engine: Engine, api_keys: dict[str, ServerClient] | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="radixfair", version=_version())
    keys = dict(api_keys or {})
    metrics = metrics_for(engine)
    model_name = engine.model_path
    token_texts: dict[int, str] = {}  # bounded by the vocabulary

    def token_text(tid: int) -> str:
        if tid not in token_texts:
            token_texts[tid] = engine.tokenizer.decode([tid], skip_special_tokens=False)
        return token_texts[tid]

    def check_model(model: str | None) -> None:
        """OpenAI's `model` must be an id `/v1/models` lists (or left out)."""
        if model is not None and model != model_name:
            raise APIError(f"model: '{model}' is not served here; /v1/models lists '{model_name}'",
                           status=404, param="model", code="model_not_found")

    # ---- errors: OpenAI's shape everywhere, 4xx for anything the client got wrong --------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        parts, param = [], None
        for err in e.errors():
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            if err.get("type") == "json_invalid":
                parts.append(f"the body is not valid JSON: {err.get('msg')}")
                continue
            field = ".".join(loc) or "body"
            param = param or (loc[0] if loc else None)
            parts.append(f"{field}: {err.get('msg')}")
        return JSONResponse(error_body("; ".join(parts) or "invalid request", param=param, code=400),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), code=e.status_code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error")
        return JSONResponse(error_body(f"internal error: {e}", "internal_server_error", code=500),
                            status_code=500)

    # ---- auth and client identity ------------------------------------------------------------------
    def key_client(token: str) -> ServerClient | None:
        # compare against every key, in constant time each, so timing tells nothing about the keys
        found = None
        for k, client in keys.items():
            if hmac.compare_digest(token.encode(), k.encode()):
                found = client
        return found

    @app.middleware("http")
    async def _prepare(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        request.state.key_client = None
        if request.method == "POST" and "json" not in request.headers.get("content-type", ""):
            # `curl -d '{...}'` sends a form content type; every POST body here is JSON, so read it
            # as JSON rather than answering a puzzling "expected an object"
            request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
            request.scope["headers"].append((b"content-type", b"application/json"))
        if keys and request.url.path not in OPEN_PATHS:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            client = key_client(token.strip()) if scheme.lower() == "bearer" else None
            if client is None:
                return JSONResponse(
                    error_body("invalid or missing API key (send 'Authorization: Bearer KEY')",
                               "authentication_error", code=401),
                    status_code=401, headers={"WWW-Authenticate": "Bearer"},
                )
            request.state.key_client = client
        return await call_next(request)

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)  # outermost: before auth and parsing

    def client_of(request: Request, user: str | None = None) -> str:
        """An API key's client wins (a caller cannot claim to be someone else), then the headers,
        then OpenAI's `user` field."""
        kc: ServerClient | None = request.state.key_client
        if kc is not None:
            return kc.client
        for h in CLIENT_HEADERS:
            v = request.headers.get(h, "").strip()
            if v:
                return v
        return user or DEFAULT_CLIENT

    def make(**kw: Any) -> list[Req]:
        try:
            return engine.make_requests(**kw)
        except ValueError as e:
            raise APIError(str(e), param=param_of(str(e))) from e

    # ---- native API ------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate(request: Request) -> Response:
        reqs = make(prompt=None, input_ids=[engine.eos_token_ids[0] if engine.eos_token_ids else 0],
                    sampling_params={"max_new_tokens": 1, "temperature": 0, "ignore_eos": True},
                    client_id="health")
        try:
            outs = await asyncio.wait_for(collect(engine, reqs, request), HEALTH_GENERATE_TIMEOUT_S)
        except TimeoutError:
            return JSONResponse(error_body("generation timed out", "service_unavailable", code=503), 503)
        if engine_error(outs[0]) or not outs[0].get("output_ids"):
            return JSONResponse(error_body("generation failed", "service_unavailable", code=503), 503)
        return Response(status_code=200)

    @app.get("/get_model_info")
    async def get_model_info() -> dict[str, Any]:
        return {"model_path": engine.model_path, "tokenizer_path": engine.model_path, "is_generation": True}

    @app.get("/get_server_info")
    def get_server_info() -> dict[str, Any]:
        # sync handler: get_stats waits on the scheduler thread, so it runs in the threadpool
        info = asdict(engine.args)
        info.update(model_path=engine.model_path, max_total_tokens=engine.max_total_tokens,
                    context_length=engine.context_len, device=str(engine.device), dtype=str(engine.dtype),
                    vocab_size=engine.model_config.vocab_size, version=_version(), auth=bool(keys),
                    stats=engine.get_stats())
        # the arguments the engine was started with, as `Engine(**engine_args)` takes them (e.g. for
        # `radixfair bench serve` to build the same engine in-process); the keys above are resolved values
        info["engine_args"] = asdict(engine.args)
        return info

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(metrics.render(engine), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/get_load")
    def get_load() -> dict[str, Any]:
        s = engine.get_stats()
        return {"num_running_reqs": s["running"], "num_waiting_reqs": s["waiting"],
                "num_reqs": s["running"] + s["waiting"],
                "num_used_tokens": s["max_total_tokens"] - s["free_slots"],
                "max_total_tokens": s["max_total_tokens"]}

    @app.post("/flush_cache")
    def flush_cache() -> Response:
        try:
            engine.flush_cache()
        except RuntimeError as e:
            raise APIError(f"cannot flush the cache now: {e}") from e
        return JSONResponse({"message": "cache flushed"})

    @app.post("/abort_request")
    async def abort_request(body: AbortRequest) -> dict[str, Any]:
        engine.abort(body.rid)
        return {"rid": body.rid}

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        if body.text is not None and body.input_ids is not None:
            raise APIError("give exactly one of text or input_ids", param="text")
        reqs = make(prompt=body.text, sampling_params=body.sampling_params, input_ids=body.input_ids,
                    return_logprob=body.return_logprob, logprob_start_len=body.logprob_start_len,
                    top_logprobs_num=body.top_logprobs_num, client_id=client_of(request), rid=body.rid)
        single = isinstance(body.text, str) or (
            body.input_ids is not None and bool(body.input_ids) and isinstance(body.input_ids[0], int))
        text_fn = token_text if body.return_text_in_logprobs else None
        if body.stream:
            return StreamingResponse(_native_stream(reqs, text_fn), media_type="text/event-stream")
        outs = await collect(engine, reqs, request)
        for out in outs:
            msg = engine_error(out)
            if msg:
                raise APIError(msg, param=param_of(msg, "rid" if "request id" in msg else None))
        results = [public(o, text_fn) for o in outs]
        return JSONResponse(results[0] if single and len(results) == 1 else results)

    async def _native_stream(reqs: list[Req], text_fn: Callable[[int], str] | None) -> AsyncIterator[bytes]:
        async with aclosing(merge_streams(engine, reqs)) as stream:
            async for i, out in stream:
                chunk = public(out, text_fn)
                if len(reqs) > 1:
                    chunk["index"] = i  # SGLang tags batch-stream chunks with the prompt's index
                yield sse(chunk)
        yield SSE_DONE

    # ---- OpenAI API --------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": int(time.time()), "owned_by": "radixfair",
            "root": engine.model_path, "max_model_len": engine.context_len,
        }]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        if body.echo:
            raise APIError("echo is not supported", param="echo")
        if body.logprobs is not None and not 0 <= body.logprobs <= 20:
            raise APIError(f"logprobs: must be in [0, 20] (got {body.logprobs})", param="logprobs")
        prompt, ids = openai_api.split_prompt(body.prompt)
        reqs = make_openai(body, request, prompt=prompt, input_ids=ids, max_tokens=body.max_tokens,
                           return_logprob=body.logprobs is not None, top_logprobs_num=body.logprobs or 0)
        oa = openai_api.Completion(engine, reqs, model_name, body.n, chat=False)
        if body.stream:
            return StreamingResponse(oa.stream(include_usage=_usage_wanted(body)), media_type="text/event-stream")
        return JSONResponse(oa.response(await collect(engine, reqs, request)))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
            raise APIError(f"top_logprobs: must be in [0, 20] (got {body.top_logprobs})", param="top_logprobs")
        try:
            text = engine.tokenizer.apply_chat_template(openai_api.normalize_messages(body.messages))
        except ValueError as e:
            raise APIError(str(e), param="messages") from e
        except Exception as e:  # a template error on this input (e.g. roles it rejects) is the caller's
            raise APIError(f"messages: the chat template failed: {e}", param="messages") from e
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        reqs = make_openai(body, request, prompt=text, input_ids=None, max_tokens=max_tokens,
                           return_logprob=body.logprobs, top_logprobs_num=body.top_logprobs or 0)
        oa = openai_api.Completion(engine, reqs, model_name, body.n, chat=True)
        if body.stream:
            return StreamingResponse(oa.stream(include_usage=_usage_wanted(body)), media_type="text/event-stream")
        return JSONResponse(oa.response(await collect(engine, reqs, request)))

    def make_openai(body: CompletionRequest | ChatCompletionRequest, request: Request, *, prompt: Any,
                    input_ids: Any, max_tokens: int | None, return_logprob: bool,
                    top_logprobs_num: int) -> list[Req]:
        params = openai_api.sampling_params(body, max_tokens)
        try:
            return engine.make_requests(prompt, params, input_ids, return_logprob, -1, top_logprobs_num,
                                        client_of(request, body.user), body.rid)
        except ValueError as e:
            msg = openai_api.rename_fields(str(e))
            raise APIError(msg, param=param_of(msg, "prompt" if "prompt" in msg else None)) from e

    return app


def _usage_wanted(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("radixfair")
    except PackageNotFoundError:
        return "0"
