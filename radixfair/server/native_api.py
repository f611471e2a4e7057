"""SGLang's native API: `/generate` and the runtime endpoints its frontend and tools call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from radixfair.io_struct import TokenizedRequest, build_requests, result_for
from radixfair.server.auth import client_of, operator_view, require_admin
from radixfair.server.errors import APIError, engine_error, error_body, first_error, param_of
from radixfair.server.native_stream import StreamEncoder, TokenText, native_result
from radixfair.server.protocol import AbortRequest, GenerateRequest
from radixfair.server.state import ServerState, State
from radixfair.server.streaming import SSE_DONE, collect, error_event, merge_streams
from radixfair.server.version import version

HEALTH_GENERATE_TIMEOUT_S = 20.0

router = APIRouter()


@router.get("/health")
async def health(state: State) -> Response:
    if not state.engine.alive:
        return JSONResponse(error_body("the engine is not running", "service_unavailable", code=503), 503)
    return Response(status_code=200)


@router.get("/health_generate")
async def health_generate(request: Request, state: State) -> Response:
    if not state.engine.alive:
        return JSONResponse(error_body("the engine is not running", "service_unavailable", code=503), 503)
    eos = state.engine.eos_token_ids
    reqs, _ = build_requests(input_ids=[eos[0] if eos else 0], client_id="health", stream=False,
                             sampling_params={"max_new_tokens": 1, "temperature": 0, "ignore_eos": True})
    treqs = await state.tokenize(reqs)
    try:
        results = await asyncio.wait_for(collect(state, treqs, "health", request, record=False),
                                         HEALTH_GENERATE_TIMEOUT_S)
    except asyncio.TimeoutError:
        return JSONResponse(error_body("generation timed out", "service_unavailable", code=503), 503)
    if results[0].error is not None or not results[0].output_ids:
        return JSONResponse(error_body("generation failed", "service_unavailable", code=503), 503)
    return Response(status_code=200)


@router.get("/get_model_info")
@router.get("/model_info")
async def get_model_info(state: State) -> dict[str, Any]:
    # SGLang's frontend picks its chat template by matching `model_path`: the model's name, never a
    # path; radixfair's frontend renders roles with the model's own template and special tokens
    names = state.engine.model_names
    tok = state.engine.tokenizer
    return {"model_path": names.source, "tokenizer_path": names.source, "served_model_name": names.served,
            "is_generation": True, "chat_template": tok.chat_template, "special_tokens": tok.special_token_strings()}


@router.get("/get_server_info")
@router.get("/server_info")
def get_server_info(request: Request, state: State) -> dict[str, Any]:
    # sync handler: get_stats waits on the scheduler thread, so it runs in the threadpool
    engine = state.engine
    args = asdict(engine.args)
    operator = operator_view(request)
    if not operator:
        args.pop("client_weights")  # names clients: for operators only
    info = dict(args)
    if operator:
        info["model_file"] = engine.model_path  # the resolved file or folder: a detail of this machine
    info.update(model_path=engine.model_names.source, served_model_name=engine.model_names.served,
                max_total_tokens=engine.max_total_tokens,
                context_length=engine.context_len, device=str(engine.device), dtype=str(engine.dtype),
                vocab_size=engine.model_config.vocab_size, version=version(), auth=state.auth,
                stats=engine.get_stats().to_dict())
    # the arguments the engine was started with, as `Engine(**engine_args)` takes them (e.g. for
    # `radixfair bench serve` to build the same engine in-process); the keys above are resolved values
    info["engine_args"] = args
    return info


@router.get("/metrics")
def prometheus_metrics(request: Request, state: State) -> Response:
    # sync handler: reading the stats waits on the scheduler thread
    require_admin(request)
    return Response(state.metrics.render(state.engine.get_stats()),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/get_load")
def get_load(state: State) -> dict[str, Any]:
    s = state.engine.get_stats()
    return {"num_running_reqs": s.running, "num_waiting_reqs": s.waiting, "num_reqs": s.running + s.waiting,
            "num_used_tokens": s.used_tokens, "max_total_tokens": s.max_total_tokens}


@router.post("/flush_cache")
def flush_cache(request: Request, state: State) -> Response:
    require_admin(request)
    try:
        state.engine.flush_cache()
    except RuntimeError as e:
        raise APIError(f"cannot flush the cache now: {e}") from e
    return JSONResponse({"message": "cache flushed"})


@router.post("/concate_and_append_request")
async def concate_and_append_request() -> dict[str, Any]:
    # SGLang's frontend calls this after `join(mode="concate_and_append")` to join the branches' KV
    # caches. SGLang's own server no longer has it and neither does this one: the frontend has
    # already appended the branches' text, and the next request finds that text's prefix cached.
    return {"success": True}


@router.post("/abort_request")
async def abort_request(body: AbortRequest, request: Request, state: State) -> dict[str, Any]:
    # request ids are per client: one can abort only its own, and learns nothing of anyone else's
    if not state.engine.abort(body.rid, client_of(request)):
        raise APIError(f"rid: no request {body.rid!r} of yours is in flight", status=404, param="rid")
    return {"rid": body.rid}


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request, state: State) -> Response:
    state.check_alive()
    if body.text is not None and body.input_ids is not None:
        raise APIError("give exactly one of text or input_ids", param="text")
    client = client_of(request)
    try:
        reqs, single = build_requests(body.text, body.input_ids, body.sampling_dicts(), body.rid, client,
                                      body.return_logprob, body.logprob_start_len, body.top_logprobs_num,
                                      body.stream, state.engine.limits)
    except ValueError as e:
        raise APIError(str(e), param=param_of(str(e))) from e
    with state.admission.admit(client, len(reqs)) as ticket:
        treqs = await state.tokenize(reqs)
        token_text = state.token_text if body.return_text_in_logprobs else None
        if body.stream:
            state.check_rids(treqs)
            return ticket.stream(_native_stream(state, treqs, client, token_text))
        results = await collect(state, treqs, client, request)
    err = first_error(results)
    if err is not None:
        raise engine_error(err)
    out = [native_result(r, token_text) for r in results]
    return JSONResponse(out[0] if single and len(out) == 1 else out)


async def _native_stream(state: ServerState, treqs: list[TokenizedRequest], client: str,
                         token_text: TokenText | None) -> AsyncIterator[bytes]:
    """SGLang's stream: each chunk carries one request's cumulative text and meta_info (or only what
    is new, with --incremental-streaming-output)."""
    encoders = [StreamEncoder(result_for(t.request), state.incremental_streaming_output, token_text,
                              i if len(treqs) > 1 else None) for i, t in enumerate(treqs)]
    async with aclosing(merge_streams(state, treqs, client)) as stream:
        async for i, out in stream:
            enc = encoders[i]
            enc.res.add(out)
            if out.error is not None:
                yield error_event(engine_error(out.error), enc.index)
                continue
            yield b"data: " + enc.chunk(out).encode() + b"\n\n"
    yield SSE_DONE
