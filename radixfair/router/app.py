"""`create_router_app(state)`: the router's HTTP service. The same native and OpenAI generation APIs
as a worker (forwarded to the worker the policy picks, `proxy.forward`), worker management,
fanned-out operator calls, and the router's own health and metrics.

Client identity is resolved exactly as a worker resolves it (`server.auth`: API keys, identity
headers, OpenAI's `user`) and passed on in `x-client-id` with the router's trusted-proxy key
(`--worker-api-key`), so each worker's fair scheduler sees the real clients.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from radixfair.router.fairness import RouterFairness, sampling
from radixfair.router.metrics import RouterMetrics
from radixfair.router.prompt_tokens import max_new_tokens, prompt_tokens
from radixfair.router.proxy import forward, upstream_error
from radixfair.router.state import RoutedRequest, RouterState
from radixfair.server.auth import ApiKeyAuth, client_of, operator_view, require_admin
from radixfair.server.errors import APIError, install_error_handlers
from radixfair.server.fairness import dashboard
from radixfair.server.middleware import BodyLimit
from radixfair.server.version import version

GENERATION_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
LONG_PROMPT_CHARS = 4096  # longer prompts are tokenized off the event loop


class WorkerBody(BaseModel):
    url: str


def create_router_app(state: RouterState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await state.start()
        await state.ensure_tokenizer()
        try:
            async with sampling(source):
                yield
        finally:
            await state.stop()

    app = FastAPI(title="radixfair router", version=version(), lifespan=lifespan)
    app.state.radixfair = state  # `server.auth` reads the identity settings here, as on a worker
    source = RouterFairness(state)
    metrics = RouterMetrics(state)
    install_error_handlers(app)

    for route in GENERATION_ROUTES:
        app.add_api_route(route, _generation_handler(state, route), methods=["POST"])

    @app.get("/health")
    async def health() -> Response:
        if any(w.view().healthy for w in state.workers.values()):
            return Response(status_code=200)
        raise upstream_error("no healthy worker", 503)

    @app.get("/v1/models")
    @app.get("/get_model_info")
    @app.get("/model_info")
    async def model_info(request: Request) -> Response:
        return await _from_any_worker(state, request.url.path)

    @app.get("/get_server_info")
    async def server_info(request: Request) -> dict[str, Any]:
        require_admin(request)
        return {"router": state.snapshot(), "version": version()}

    @app.get("/get_loads")
    async def get_loads() -> dict[str, Any]:
        out = await _fan_out(state, "GET", "/get_load")
        return {"workers": [{"worker": url, "in_flight": state.workers[url].requests if url in state.workers else 0,
                             "load": body} for url, _, body in out]}

    @app.post("/flush_cache")
    async def flush_cache(request: Request) -> JSONResponse:
        require_admin(request)
        out = await _fan_out(state, "POST", "/flush_cache")
        ok = all(status == 200 for _, status, _ in out)
        return JSONResponse({"message": "cache flushed" if ok else "some workers did not flush",
                             "workers": [{"worker": u, "status": s, "body": b} for u, s, b in out]},
                            status_code=200 if ok else 502)

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        rid = body.get("rid") if isinstance(body, dict) else None
        client = client_of(request)
        holder = state.holders.get((client, rid)) if isinstance(rid, str) else None
        targets = [holder.url] if holder is not None else list(state.workers)
        headers = state.worker_headers(client)
        last: httpx.Response | None = None
        for url in targets:
            try:
                r = await state.client.post(url + "/abort_request", content=raw, headers=headers)
            except httpx.HTTPError:
                continue
            if r.status_code == 200 or last is None or last.status_code != 400:
                last = r
            if r.status_code in (200, 400):  # done, or the body is wrong anywhere
                break
        if last is None:
            raise upstream_error("no worker answered", 503)
        return Response(last.content, status_code=last.status_code, media_type="application/json")

    # ---- workers -------------------------------------------------------------------------------

    def add(request: Request, url: str) -> JSONResponse:
        require_admin(request)
        try:
            w, new = state.add_worker(url)
        except ValueError as e:
            raise APIError(str(e), param="url") from e
        return JSONResponse({"url": w.url, "added": new}, status_code=201 if new else 200)

    def remove(request: Request, url: str) -> JSONResponse:
        require_admin(request)
        if not state.remove_worker(url):
            raise APIError(f"url: no worker {url!r}", status=404, param="url")
        return JSONResponse({"url": url.rstrip("/"), "removed": True})

    @app.post("/workers")
    async def post_worker(body: WorkerBody, request: Request) -> JSONResponse:
        return add(request, body.url)

    @app.get("/workers")
    async def get_workers(request: Request) -> dict[str, Any]:
        workers = [w.snapshot() for w in state.workers.values()]
        if not operator_view(request):
            for w in workers:
                del w["service"]  # names clients: for operators only, as a worker's client list
        return {"workers": workers}

    @app.delete("/workers/{url:path}")
    async def delete_worker(url: str, request: Request) -> JSONResponse:
        return remove(request, unquote(url))

    @app.post("/add_worker")
    async def add_worker(url: str, request: Request) -> JSONResponse:
        return add(request, url)

    @app.post("/remove_worker")
    async def remove_worker(url: str, request: Request) -> JSONResponse:
        return remove(request, url)

    @app.get("/list_workers")
    async def list_workers() -> dict[str, Any]:
        return {"urls": list(state.workers)}

    # the live fairness view, operators only, as on a worker: the same JSON (plus the workers) and page
    @app.get("/fairness")
    async def fairness(request: Request) -> dict[str, Any]:
        require_admin(request)
        return state.fairness.report(source.fairness_snapshot(), workers=source.workers())

    app.add_api_route("/dashboard", dashboard, methods=["GET"], response_class=HTMLResponse)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        require_admin(request)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(ApiKeyAuth, keys=state.keys, admin_keys=state.args.admin_api_key)
    app.add_middleware(BodyLimit, max_bytes=state.args.max_body_bytes)
    return app


def _generation_handler(state: RouterState, path: str) -> Any:
    async def handler(request: Request) -> Response:
        arrival = time.monotonic()
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None  # the worker says what is wrong with it
        user = body.get("user") if isinstance(body, dict) and path != "/generate" else None
        client = client_of(request, user if isinstance(user, str) else None)
        tokenizer = await state.ensure_tokenizer()
        if len(raw) > LONG_PROMPT_CHARS:
            ids = await run_in_threadpool(prompt_tokens, tokenizer, path, body)
        else:
            ids = prompt_tokens(tokenizer, path, body)
        rid = body.get("rid") if isinstance(body, dict) else None
        rid = rid if isinstance(rid, str) else ""
        route = state.route_request(client, ids, max_new_tokens(path, body), rid)
        stream = isinstance(body, dict) and body.get("stream") is True
        status = 500
        try:
            response = await forward(state, request, path, raw, RoutedRequest(route, arrival), stream)
            status = response.status_code
            return response
        except APIError as e:
            status = e.status
            raise
        finally:
            state.requests[(path, status)] += 1

    return handler


async def _from_any_worker(state: RouterState, path: str) -> Response:
    """A read-only call every worker answers alike: the first healthy worker's answer."""
    for w in sorted(state.workers.values(), key=lambda w: not w.view().healthy):
        try:
            r = await state.client.get(w.url + path, headers=state.worker_headers("router"), timeout=10.0)
        except httpx.HTTPError:
            continue
        if r.status_code < 500:
            return Response(r.content, status_code=r.status_code, media_type="application/json")
    raise upstream_error("no worker answered", 503)


async def _fan_out(state: RouterState, method: str, path: str) -> list[tuple[str, int, Any]]:
    """(worker, status, JSON body) from every worker; status 0 for one that did not answer."""
    async def one(url: str) -> tuple[str, int, Any]:
        try:
            r = await state.client.request(method, url + path, headers=state.worker_headers("router"), timeout=30.0)
        except httpx.HTTPError as e:
            return url, 0, {"error": str(e)}
        try:
            return url, r.status_code, r.json()
        except ValueError:
            return url, r.status_code, None

    return list(await asyncio.gather(*(one(u) for u in list(state.workers))))
