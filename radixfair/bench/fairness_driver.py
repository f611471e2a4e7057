"""Replays a `Workload` against a live Engine in real time and records what each client received.

Arrivals are open-loop: each request is submitted at its trace time whatever the engine is doing,
from one asyncio loop that also consumes every request's token stream, so the service timeline has
the time of each token as the client saw it. At `duration` the run is cut off: arrivals stop, requests
still waiting or running are aborted, and only service delivered before the cut counts.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from radixfair.bench.fairness_workload import Arrival, Workload
from radixfair.io_struct import EngineRequest, TokenizedRequest
from radixfair.metrics import RequestRecord, ServiceEvent, charged_service
from radixfair.sampling_params import SamplingParams

if TYPE_CHECKING:
    from radixfair.engine.engine import Engine


class Progress(Protocol):
    def __call__(self, elapsed: float, arrived: int, completed: int) -> None: ...


@dataclass
class RunResult:
    policy: str
    duration: float
    records: list[RequestRecord]
    events: list[ServiceEvent]  # times relative to the start of the run
    engine_stats: dict[str, Any]


@dataclass
class _Live:
    """A request as its stream reports it; becomes a RequestRecord at the end."""

    arrival: Arrival
    t_arrival: float
    prompt_tokens: int
    cached_tokens: int = 0
    output_tokens: int = 0
    first_token: float | None = None
    finish: float | None = None
    events: list[ServiceEvent] = field(default_factory=list)

    def record(self, cut: float) -> RequestRecord:
        # a stream answered while the cut-off was being applied still counts as unfinished
        first = self.first_token if self.first_token is not None and self.first_token <= cut else None
        finish = self.finish if self.finish is not None and self.finish <= cut else None
        return RequestRecord(self.arrival.client, self.t_arrival, first, finish, self.prompt_tokens,
                             self.cached_tokens if first is not None else 0, self.output_tokens)


def replay(engine: Engine, wl: Workload, policy: str, duration: float, w_in: float, w_out: float,
           progress: Progress | None = None) -> RunResult:
    return asyncio.run(_replay(engine, wl, policy, duration, w_in, w_out, progress))


async def _replay(engine: Engine, wl: Workload, policy: str, duration: float, w_in: float, w_out: float,
                  progress: Progress | None) -> RunResult:
    live: list[_Live] = []
    tasks: list[asyncio.Task[None]] = []
    t0 = time.monotonic()
    ticker = None if progress is None else asyncio.create_task(_tick(t0, duration, live, progress))
    for i, arr in enumerate(wl.arrivals):
        if arr.time >= duration:
            break
        delay = t0 + arr.time - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        params = SamplingParams(max_new_tokens=arr.max_new_tokens, temperature=0.0, ignore_eos=True)
        req = engine.tokenize(EngineRequest(input_ids=arr.input_ids, sampling_params=params, client_id=arr.client,
                                            rid=f"{policy}-{arr.client}-{i}"))
        lv = _Live(arr, time.monotonic() - t0, len(arr.input_ids))
        live.append(lv)
        tasks.append(asyncio.create_task(_consume(engine, req, lv, t0, w_in, w_out)))
    await asyncio.sleep(max(0.0, t0 + duration - time.monotonic()))
    for task in tasks:
        task.cancel()  # the stream's own cleanup aborts the request in the engine
    await asyncio.gather(*tasks, return_exceptions=True)
    if ticker is not None:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
    if progress is not None:
        progress(duration, len(live), sum(lv.finish is not None for lv in live))
    # the engine still answers the aborted requests through this loop's queues: stay until it is idle
    await asyncio.to_thread(engine.wait_idle, 120.0)
    stats = (await asyncio.to_thread(engine.get_stats)).to_dict()
    events = sorted((ev for lv in live for ev in lv.events if ev.time < duration), key=lambda e: e.time)
    return RunResult(policy, duration, [lv.record(duration) for lv in live], events, stats)


async def _consume(engine: Engine, req: TokenizedRequest, lv: _Live, t0: float, w_in: float, w_out: float) -> None:
    async for out in engine.generate_async(req):
        now = time.monotonic() - t0
        n = out.completion_tokens
        if n > lv.output_tokens:
            if lv.first_token is None:
                lv.cached_tokens = out.cached_tokens
                lv.first_token = lv.t_arrival + (out.ttft if out.ttft is not None else now - lv.t_arrival)
                # the prompt's uncached part is charged when its prefill shows (with the first token)
                uncached = lv.prompt_tokens - lv.cached_tokens
                lv.events.append(ServiceEvent(now, lv.arrival.client, charged_service(uncached, 0, w_in, w_out)))
            lv.events.append(ServiceEvent(now, lv.arrival.client, charged_service(0, n - lv.output_tokens, w_in, w_out)))
            lv.output_tokens = n
        if out.finish_reason is not None:
            if out.finish_reason.type != "abort":  # an engine-side abort is not a completion
                lv.finish = lv.t_arrival + out.e2e_latency
            return


async def _tick(t0: float, duration: float, live: list[_Live], progress: Progress) -> None:
    while True:
        elapsed = min(time.monotonic() - t0, duration)
        progress(elapsed, len(live), sum(lv.finish is not None for lv in live))
        await asyncio.sleep(0.5)
