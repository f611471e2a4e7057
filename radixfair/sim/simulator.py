"""Deterministic discrete-event simulation of radixfair workers.

Each simulated worker is the engine's own `Scheduler` with a policy from `make_policy` and the
scheduler's own radix cache over a KV pool of slot ids (the scheduler never touches tensors, so no
fake pool is needed). Requests reach the workers through a routing policy from `make_router_policy`,
the router's own objects, fed the workers' in-flight loads and every finish. Only the executor is
replaced: it returns deterministic token ids at once, and the batch's duration comes from a
`CostModel`. So routing, admission, chunking, eviction, retraction and every policy decision are the
code that runs in production; what is modelled is only how long a pass takes.

Time is virtual. Events are arrivals (from a trace) and batch completions; ties break by a fixed
order and a sequence number, and nothing reads the wall clock, so one seed gives one result.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from radixfair.metrics.fairness import FairnessReport, RequestRecord, ServiceEvent, fairness_report
from radixfair.metrics.service import charged_service
from radixfair.router.policies import (
    PowerOfTwoConfig,
    RouterConfig,
    RouteRequest,
    RouterPolicy,
    Usage,
    WorkerView,
    canonical_name,
    make_router_policy,
)
from radixfair.sampling_params import SamplingParams
from radixfair.sched.batch import BatchOutput, ScheduledBatch
from radixfair.sched.policies import DEFAULT_POLICY, PolicyConfig, make_policy
from radixfair.sched.request import Req
from radixfair.sched.scheduler import Scheduler, SchedulerConfig
from radixfair.sim.cost_model import CostModel
from radixfair.sim.trace import VOCAB_LO, VOCAB_SIZE, TraceRecord, group_tokens

_DONE, _ARRIVE = 0, 1  # at equal times a finishing batch frees its KV before arrivals are queued


# A simulated worker's scheduler: the engine's defaults, a 16k-token KV pool, and a context cap that
# only guards against runaway traces (no model stands behind it).
SIM_SCHEDULER = SchedulerConfig(max_total_tokens=16_384, max_context_len=32_768)


@dataclass(frozen=True)
class SimConfig:
    policy: str = DEFAULT_POLICY  # the workers' scheduling policy
    num_workers: int = 1
    routing: str = "round_robin"  # the router policy (`radixfair.router.policies`)
    router_config: RouterConfig | None = None  # its settings (None: the policy's defaults)
    # per worker: the engine's own scheduler and policy settings
    scheduler: SchedulerConfig = SIM_SCHEDULER
    policy_config: PolicyConfig = field(default_factory=PolicyConfig)
    vocab_size: int = VOCAB_SIZE
    seed: int = 0  # of the fake executor's tokens
    horizon: float | None = None  # stop at this virtual time (None: run until every request finished)

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        object.__setattr__(self, "routing", canonical_name(self.routing))  # "round-robin" still reads


@dataclass
class SimWorker:
    index: int
    scheduler: Scheduler
    busy: bool = False
    batches: int = 0
    busy_time: float = 0.0
    requests: int = 0  # dispatched here in all
    # what the router counts: dispatched and not finished, and their prompt + output tokens
    inflight: int = 0
    inflight_tokens: int = 0

    @property
    def worker_id(self) -> str:
        return f"w{self.index}"

    def view(self) -> WorkerView:
        return WorkerView(self.worker_id, self.inflight, self.inflight_tokens)


@dataclass
class SimResult:
    config: SimConfig
    cost_model: str
    records: list[RequestRecord]  # trace order
    rids: list[str]
    events: list[ServiceEvent]  # charged service as it was delivered, at batch completion times
    finish_counts: dict[str, int]  # rid -> times it finished (conservation: exactly 1 each)
    makespan: float  # virtual time of the last event processed
    arrivals_end: float  # time of the last arrival
    workers: list[dict[str, Any]] = field(default_factory=list)
    router_decisions: dict[str, int] = field(default_factory=dict)  # the router policy's branch counts

    def report(self, window: float, t1: float | None = None) -> FairnessReport:
        """Fairness over [0, t1): by default the arrival period, where an overloaded system keeps
        every client backlogged; the drain after it only shows who was left waiting."""
        end = t1 if t1 is not None else self.arrivals_end
        costs = self.config.policy_config
        return fairness_report(self.records, self.events, t0=0.0, t1=end, window=window,
                               w_in=costs.w_in, w_out=costs.w_out,
                               clients=sorted({r.client for r in self.records}))


class Simulator:
    def __init__(self, trace: Sequence[TraceRecord], cost_model: CostModel, config: SimConfig | None = None) -> None:
        self.config = cfg = config or SimConfig()
        self.cost_model = cost_model
        self.trace = sorted(trace, key=lambda r: r.time)  # stable: equal times keep trace order
        # the engine's classes themselves, never copies: the point is to exercise the real decisions
        self.workers = [SimWorker(i, Scheduler(cfg.scheduler, make_policy(cfg.policy, cfg.policy_config)))
                        for i in range(cfg.num_workers)]
        router_config = cfg.router_config
        if router_config is None and cfg.routing == "power_of_two":
            router_config = PowerOfTwoConfig(seed=cfg.seed)  # one seed, one result
        self.router: RouterPolicy = make_router_policy(cfg.routing, router_config)
        self._by_id = {w.worker_id: w for w in self.workers}
        self.now = 0.0
        self._heap: list[tuple[float, int, int, int]] = []  # (time, kind, seq, payload)
        self._seq = itertools.count()
        self._inflight: dict[int, ScheduledBatch] = {}
        self._index: dict[int, int] = {}  # id(req) -> trace index
        self._reqs: list[Req | None] = [None] * len(self.trace)
        self._first: list[float | None] = [None] * len(self.trace)
        self._finish: list[float | None] = [None] * len(self.trace)
        self._finish_counts: dict[str, int] = {}
        self._events: list[ServiceEvent] = []
        self._routed: list[RouteRequest | None] = [None] * len(self.trace)
        self._placed: list[SimWorker | None] = [None] * len(self.trace)
        self._index_of_route: dict[RouteRequest, int] = {}
        self._touched: list[SimWorker] = []  # workers given requests while handling the current event
        self._segments: dict[tuple[str, int], list[int]] = {}
        # only a policy that can hold requests back has any to release after a finish
        self._holds = type(self.router).next_held is not RouterPolicy.next_held
        self._ran = False
        self._answers: dict[int, list[int]] = {}  # trace index -> its output_group stream

    def _push(self, t: float, kind: int, payload: int) -> None:
        heapq.heappush(self._heap, (t, kind, next(self._seq), payload))

    def run(self) -> SimResult:
        if self._ran:
            raise RuntimeError("a Simulator runs once; build a new one (its workers hold the old state)")
        self._ran = True
        for i, rec in enumerate(self.trace):
            self._push(rec.time, _ARRIVE, i)
        horizon = self.config.horizon
        while self._heap:
            t, kind, _, payload = self._heap[0]
            if horizon is not None and t > horizon:
                break
            heapq.heappop(self._heap)
            self.now = t
            if kind == _ARRIVE:
                self._route(payload)
            else:
                w = self.workers[payload]
                self._complete(w)
                self._touched.append(w)
            while self._touched:  # starting one may finish a dropped request and release a held one
                touched, self._touched = self._touched, []
                for w in touched:
                    if not w.busy:
                        self._start(w)
        return self._result()

    def _views(self) -> list[WorkerView]:
        return [w.view() for w in self.workers]

    def _route(self, i: int) -> None:
        rec = self.trace[i]
        rid = rec.rid or f"r{i}"
        req = Req(origin_input_ids=self._input_ids(rec),
                  sampling_params=SamplingParams(max_new_tokens=rec.output_len, ignore_eos=True),
                  rid=rid, client_id=rec.client, arrival_time=self.now)  # virtual: FCFS/VTC order by it
        self._reqs[i] = req
        self._index[id(req)] = i
        self._finish_counts[rid] = 0
        route = RouteRequest(client_id=rec.client, input_ids=tuple(req.origin_input_ids),
                             max_new_tokens=rec.output_len, rid=rid, time=self.now)
        self._routed[i] = route
        self._index_of_route[route] = i
        view = self.router.select(route, self._views())
        if view is not None:  # else the router holds it (global_vtc) and hands it out in _release_held
            self._dispatch(i, self._by_id[view.worker_id])

    def _input_ids(self, rec: TraceRecord) -> list[int]:
        """`rec.input_ids()`, with each named segment expanded once per run: a document's tokens are
        the same in every question about it."""
        if rec.prompt is not None or not rec.segments:
            return rec.input_ids(self.config.vocab_size)
        out: list[int] = []
        for seg in rec.segments:
            toks = self._segments.get(seg)
            if toks is None:
                toks = self._segments[seg] = group_tokens(seg[0], seg[1], self.config.vocab_size)
            out.extend(toks)
        return out

    def _dispatch(self, i: int, w: SimWorker) -> None:
        route, req = self._routed[i], self._reqs[i]
        assert route is not None and req is not None
        self.router.on_dispatch(route, w.view())
        self._placed[i] = w
        w.requests += 1
        w.inflight += 1
        w.inflight_tokens += len(route.input_ids) + route.max_new_tokens
        w.scheduler.add_request(req)
        self._touched.append(w)

    def _release_held(self) -> None:
        while (held := self.router.next_held(self._views())) is not None:
            route, view = held
            self._dispatch(self._index_of_route[route], self._by_id[view.worker_id])

    def _start(self, w: SimWorker) -> None:
        batch = w.scheduler.schedule()
        for req in w.scheduler.pop_dropped():  # aborted outside a batch (e.g. the pool is too small)
            self._finished(req)
        if batch is None:
            return
        dt = self.cost_model.batch_time(batch)
        w.busy = True
        w.batches += 1
        w.busy_time += dt
        self._inflight[w.index] = batch
        self._push(self.now + dt, _DONE, w.index)

    def _complete(self, w: SimWorker) -> None:
        batch = self._inflight.pop(w.index)
        w.busy = False
        before = [len(r.output_ids) for r in batch.reqs]
        finished = w.scheduler.process_output(batch, BatchOutput(next_token_ids=self._tokens(batch)))
        costs = self.config.policy_config
        for req, n0 in zip(batch.reqs, before, strict=True):
            new = len(req.output_ids) - n0
            if new <= 0:
                continue
            i = self._index[id(req)]
            uncached = 0
            if self._first[i] is None:
                # the prefill's input is charged with its first token, as RequestRecord.charged does
                self._first[i] = self.now
                uncached = len(req.origin_input_ids) - req.cached_tokens
            amount = charged_service(uncached, new, costs.w_in, costs.w_out)
            self._events.append(ServiceEvent(self.now, req.client_id, amount))
        for req in finished:
            self._finished(req)

    def _finished(self, req: Req) -> None:
        i = self._index[id(req)]
        self._finish_counts[req.rid] += 1
        if self._finish[i] is None:
            self._finish[i] = self.now
        route, w = self._routed[i], self._placed[i]
        assert route is not None and w is not None
        w.inflight -= 1
        w.inflight_tokens -= len(route.input_ids) + route.max_new_tokens
        del self._index_of_route[route]
        self.router.on_finish(route, w.view(), Usage(len(req.origin_input_ids), req.cached_tokens,
                                                     len(req.output_ids)))
        if self._holds:
            self._release_held()

    def _tokens(self, batch: ScheduledBatch) -> list[int]:
        """A token per sampling request: the record's `output_group` stream where it names one (so a
        later turn quoting the answer hits the cache), else a pure function of (seed, request,
        position). Replayable either way, and never EOS (the trace fixes every output length)."""
        span = self.config.vocab_size - VOCAB_LO
        out: list[int] = []
        for req, s in zip(batch.reqs, batch.sample, strict=True):
            if not s:
                out.append(-1)
                continue
            i = self._index[id(req)]
            rec = self.trace[i]
            if rec.output_group:
                stream = self._answers.get(i)
                if stream is None:
                    stream = self._answers[i] = group_tokens(rec.output_group, rec.output_len, self.config.vocab_size)
                out.append(stream[min(len(req.output_ids), len(stream) - 1)])
                continue
            h = (i * 0x9E3779B1 + len(req.output_ids) * 0x85EBCA77
                 + self.config.seed * 0xC2B2AE3D) & 0xFFFFFFFF
            out.append(VOCAB_LO + (h ^ (h >> 15)) % span)
        return out

    def _result(self) -> SimResult:
        records: list[RequestRecord] = []
        rids: list[str] = []
        for i, rec in enumerate(self.trace):
            req = self._reqs[i]
            if req is None:  # arrives after the horizon
                continue
            rids.append(req.rid)
            records.append(RequestRecord(client=rec.client, arrival=rec.time, first_token=self._first[i],
                                         finish=self._finish[i], prompt_tokens=len(req.origin_input_ids),
                                         cached_tokens=req.cached_tokens, output_tokens=len(req.output_ids)))
        stats = []
        for w in self.workers:
            s = w.scheduler.stats()
            stats.append({"requests": w.requests, "batches": w.batches, "busy_time": w.busy_time, "hit_rate": s.hit_rate,
                          "prefill_tokens": s.prefill_tokens, "decode_tokens": s.decode_tokens,
                          "retractions": s.retractions})
        return SimResult(config=self.config, cost_model=self.cost_model.name, records=records, rids=rids,
                         events=self._events, finish_counts=dict(self._finish_counts), makespan=self.now,
                         arrivals_end=self.trace[-1].time if self.trace else 0.0, workers=stats,
                         router_decisions=dict(self.router.decisions))
