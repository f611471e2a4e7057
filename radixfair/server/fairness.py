"""`GET /fairness` and `GET /dashboard`: the live fairness view of this worker, for operators.

`/fairness` is the JSON (`radixfair.metrics.live_fairness`, README "Fairness dashboard"); the
dashboard is one page shipped in `static/` that polls it. Both need the operator key when keys are
configured. A browser cannot send a Bearer header when it opens a URL, so `/dashboard` opened
without the key answers 401/403 with a small page that asks for the key, keeps it in the tab's
session storage and fetches the dashboard again with `Authorization: Bearer` (never in a URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from radixfair.metrics.live_fairness import FairnessSnapshot, FairnessSource, fairness_bound
from radixfair.server.auth import require_admin
from radixfair.server.errors import APIError
from radixfair.server.state import State

if TYPE_CHECKING:
    from radixfair.engine.engine import Engine
    from radixfair.server.state import ServerState

logger = logging.getLogger(__name__)

router = APIRouter()

_NO_STORE = {"Cache-Control": "no-store"}


class EngineFairness:
    """A `FairnessSource` over one engine: its stats, read on the scheduler thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        a = engine.args
        self.bound = fairness_bound(a.schedule_policy, a.w_in, a.w_out, a.dlpm_quantum, engine.context_len,
                                    a.max_running_requests)

    def fairness_snapshot(self) -> FairnessSnapshot:
        s = self.engine.get_stats()
        a = self.engine.args
        return FairnessSnapshot(
            time=time.monotonic(), policy=s.policy or a.schedule_policy,
            quantum=a.dlpm_quantum if a.schedule_policy == "dlpm" else None, balance=s.balance, bound=self.bound,
            input_tokens=s.input_tokens, cached_tokens=s.cached_tokens, decode_tokens=s.decode_tokens,
            kv_used=s.used_tokens / s.max_total_tokens if s.max_total_tokens else 0.0, clients=s.clients,
            weights=dict(a.client_weights))


def source_of(state: ServerState) -> FairnessSource:
    if state.fairness_source is None:
        state.fairness_source = EngineFairness(state.engine)
    return state.fairness_source


@contextlib.asynccontextmanager
async def every(interval_s: float, step: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    """Runs `step` every `interval_s` seconds while the context is open (an app's lifespan). A step
    that fails is logged and the loop goes on: it must outlive any one round."""

    async def loop() -> None:
        while True:
            try:
                await step()
            except Exception:
                logger.exception("periodic step failed")
            await asyncio.sleep(interval_s)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def sampling(app: FastAPI) -> AsyncIterator[None]:
    """App lifespan: read the engine every `FairnessView.interval_s` so that the service-over-time history
    exists before anyone opens the dashboard; close the trace recorder at shutdown."""
    state: ServerState = app.state.radixfair

    async def step() -> None:
        if state.engine.alive:
            try:
                state.fairness.sample(await run_in_threadpool(source_of(state).fairness_snapshot))
            except Exception as e:  # the engine stopping between the check and the read
                logger.debug("fairness sample skipped: %s", e)

    try:
        async with every(state.fairness.interval_s, step):
            yield
    finally:
        if state.trace_recorder is not None:
            state.trace_recorder.close()


@router.get("/fairness")
def fairness(request: Request, state: State) -> dict[str, Any]:
    require_admin(request)
    state.check_alive()
    # the sampler's latest reading (at most one interval old): a long forward pass holds the
    # scheduler thread for seconds on a CPU, and the dashboard must not hang on it. Read afresh
    # (a sync handler: it waits on the scheduler thread) only before the first sample.
    snap = state.fairness.latest
    return state.fairness.report(snap if snap is not None else source_of(state).fairness_snapshot())


@cache
def page(name: str) -> str:
    return resources.files("radixfair.server").joinpath("static", name).read_text(encoding="utf-8")


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard(request: Request) -> HTMLResponse:
    try:
        require_admin(request)
    except APIError as e:
        if "text/html" not in request.headers.get("accept", ""):
            raise  # the key page's own fetch: the JSON error, which it shows
        return HTMLResponse(page("dashboard_key.html"), status_code=e.status, headers=_NO_STORE)
    return HTMLResponse(page("dashboard.html"), headers=_NO_STORE)
