"""`RouterState`: everything the router knows, in one object: the workers (load, health, circuit
breaker, service per client), the policy and its decisions, the queue, retries, and the requests in
flight, per client too (waiting, in flight, service over the fleet). Handlers, the health checker,
`/metrics` and the fairness view (`router.fairness`: `/fairness`, `/dashboard`) read it; `snapshot()`
is its JSON. Each request that leaves is told to the fairness view and to `--record-trace` (`left`).

Load is counted by `Dispatch`: one per request sent to a worker, finished exactly once on every
path (answer, error, timeout, disconnect, a worker that died), which hands the load back and tells
the policy (`on_finish`). A request that cannot be dispatched yet (held by `global_vtc`) waits for
`next_held`, which is asked after every finish and every change of the fleet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from radixfair.metrics.service import W_IN, W_OUT
from radixfair.router.circuit_breaker import CircuitBreaker
from radixfair.router.policies import NoHealthyWorkerError, RouteRequest, RouterPolicy, Usage, WorkerView
from radixfair.router.prompt_tokens import load_tokenizer, tokenizer_from_worker
from radixfair.router.request_queue import RequestQueue
from radixfair.router.retry import Backoff
from radixfair.router.router_args import RouterArgs, check_worker_url
from radixfair.router.worker import HealthThresholds, Worker
from radixfair.server.auth import Identity, ServerClient
from radixfair.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

MAX_SERVICE_CLIENTS = 1024  # clients with their own service total per worker; the rest add up under "other"
OTHER_CLIENT = "other"
MAX_FAIRNESS_CLIENTS = 32  # clients /fairness and /dashboard show (those with requests in the system first)
TOKENIZER_RETRY_SECS = 5.0
CLIENT_HEADER = "x-client-id"  # how the router names the client to a worker (a worker's default header)


@dataclass(eq=False)
class RoutedRequest:
    """One request at the router, from its arrival to its last byte: what the fairness view and the
    trace recorder take when it leaves (`RouterState.left`)."""

    route: RouteRequest
    arrival: float  # time.monotonic()
    # a stream's first event relayed; a whole native answer's first token at the worker (`proxy.worker_ttft`)
    first_token: float | None = None
    usage: Usage | None = None  # as the worker reported it, once the answer was complete
    ran: bool = False  # a worker took it: it answered, or its client left while it ran


class Dispatch:
    """One request at one worker. `finish` (idempotent) releases the worker's load and tells the
    policy; `ok` feeds the worker's circuit breaker (None: neither success nor failure, e.g. a 4xx
    or a client that left)."""

    def __init__(self, state: RouterState, request: RouteRequest, worker: Worker) -> None:
        self.state = state
        self.request = request
        self.worker = worker
        self.cost = len(request.input_ids) + request.max_new_tokens
        self.finished = False
        worker.requests += 1
        worker.tokens += self.cost
        worker.dispatched += 1
        worker.active[request.client_id] += 1
        state.running[request.client_id] += 1

    def finish(self, usage: Usage | None, ok: bool | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        w = self.worker
        w.requests -= 1
        w.tokens -= self.cost
        state = self.state
        decrement(w.active, self.request.client_id)
        decrement(state.running, self.request.client_id)
        if ok is not None:
            w.breaker.record(ok)
            if not ok:
                w.failed += 1
        if usage is not None:
            cost = usage.cost(state.w_in, state.w_out)
            _charge(w.service, self.request.client_id, cost)
            _charge(state.service, self.request.client_id, cost)
            state.input_tokens += usage.prompt_tokens
            state.cached_tokens += usage.cached_tokens
            state.decode_tokens += usage.completion_tokens
        try:
            state.policy.on_finish(self.request, w.view(), usage)
        finally:
            state.release_held()


def decrement(counts: Counter[str], key: str) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]  # only clients with something there are kept


def _charge(service: dict[str, float], client: str, cost: float) -> None:
    if client not in service and len(service) >= MAX_SERVICE_CLIENTS:
        client = OTHER_CLIENT
    service[client] = service.get(client, 0.0) + cost


class RouterState:
    def __init__(self, args: RouterArgs, policy: RouterPolicy, keys: Mapping[str, ServerClient] | None = None,
                 tokenizer: Tokenizer | None = None) -> None:
        self.args = args
        self.policy = policy
        self.keys = dict(keys or {})
        self.weights = {kc.client: kc.weight for kc in self.keys.values()}  # client -> its key's weight
        self.identity = Identity(args.client_id_headers(), auth=bool(self.keys), admin=bool(args.admin_api_key))
        cfg = policy.config
        self.w_in: float = getattr(cfg, "w_in", W_IN)
        self.w_out: float = getattr(cfg, "w_out", W_OUT)
        self.workers: dict[str, Worker] = {}
        self.tokenizer = tokenizer
        if tokenizer is None and args.tokenizer_path is not None:
            self.tokenizer = load_tokenizer(args.tokenizer_path)
        self.queue = RequestQueue(args.max_concurrent_requests, args.queue_size, args.queue_timeout_secs)
        self.backoff = Backoff(args.retry_initial_backoff_ms, args.retry_max_backoff_ms,
                               args.retry_backoff_multiplier, args.retry_jitter_factor)
        self.health = HealthThresholds(args.health_failure_threshold, args.health_success_threshold)
        self.retries = 0
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, status) -> requests answered
        self.stream_errors = 0  # streams that lost their worker
        self.holders: dict[tuple[str, str], Worker] = {}  # (client, rid) -> the worker serving it
        self._held: dict[RouteRequest, asyncio.Future[Worker]] = {}
        # the fleet as the fairness view sees it (`router.fairness`): per client, requests waiting for a
        # worker (the queue, or held by the policy) and in flight, service charged over all workers;
        # tokens over all answers; the costliest request routed (the U of the fairness bound)
        self.waiting: Counter[str] = Counter()
        self.running: Counter[str] = Counter()
        self.service: dict[str, float] = {}
        self.input_tokens = 0
        self.cached_tokens = 0
        self.decode_tokens = 0
        self.max_request_cost = 0.0
        self.fairness = args.fairness_view(MAX_FAIRNESS_CLIENTS)
        self.trace_recorder = args.trace_recorder()  # --record-trace
        self._tokenizer_tried = float("-inf")
        self.http: httpx.AsyncClient | None = None  # opened with the app (`start`)
        self._health_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        for url in args.worker_urls:
            self.add_worker(url)

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(self.args.request_timeout_secs, connect=10.0),
                                      limits=limits)
        self._health_task = asyncio.create_task(self._health_loop())

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        if self.http is not None:
            await self.http.aclose()
        if self.trace_recorder is not None:
            self.trace_recorder.close()

    @property
    def client(self) -> httpx.AsyncClient:
        if self.http is None:
            raise RuntimeError("the router is not started")
        return self.http

    # ---- the fleet -----------------------------------------------------------------------------

    def add_worker(self, url: str) -> tuple[Worker, bool]:
        """The worker at `url`, and whether it is new."""
        url = check_worker_url(url)
        if url in self.workers:
            return self.workers[url], False
        a = self.args
        w = self.workers[url] = Worker(url, CircuitBreaker(a.cb_failure_threshold, a.cb_success_threshold,
                                                           a.cb_timeout_duration_secs,
                                                           enabled=not a.disable_circuit_breaker))
        self.release_held()
        return w, True

    def remove_worker(self, url: str) -> bool:
        """Stop routing to `url`; requests already there finish (their `Dispatch` holds the worker)."""
        w = self.workers.pop(url.rstrip("/"), None)
        if w is None:
            return False
        self.policy.remove_worker(w.url)
        return True

    def replace_worker(self, old: str, new: str) -> None:
        """From any thread: route to `new` instead of `old` (a worker that came back elsewhere)."""
        def swap() -> None:
            self.remove_worker(old)
            self.add_worker(new)

        if self._loop is None:
            swap()
        else:
            self._loop.call_soon_threadsafe(swap)

    def views(self, exclude: Iterable[str] = ()) -> list[WorkerView]:
        """The workers as the policy sees them; `exclude` (workers a request already failed on) are
        shown unhealthy, unless that leaves none healthy."""
        views = [w.view() for w in self.workers.values()]
        skip = set(exclude)
        if skip:
            narrowed = [WorkerView(v.worker_id, v.requests, v.tokens, v.healthy and v.worker_id not in skip)
                        for v in views]
            if any(v.healthy for v in narrowed):
                return narrowed
        return views

    # ---- routing -------------------------------------------------------------------------------

    def route_request(self, client: str, input_ids: tuple[int, ...], max_new_tokens: int, rid: str = "") -> RouteRequest:
        loop = asyncio.get_running_loop()
        request = RouteRequest(client, input_ids, max_new_tokens, rid=rid, weight=self.weights.get(client, 1.0),
                               time=loop.time())
        self.max_request_cost = max(self.max_request_cost, request.estimated_cost(0, self.w_in, self.w_out))
        return request

    def left(self, r: RoutedRequest) -> None:
        """A request left the router (answered, refused, failed or abandoned): its latencies and
        hit rate go to the fairness view, and (if a worker ran it) a record to the trace: the
        tokens served, or for one cut off before its end the `max_new_tokens` it asked for (the load
        that arrived, as a worker records it). A prompt the router could not tokenize (no tokenizer
        yet) is not recorded: its record would have no blocks to share."""
        now = time.monotonic()
        client = r.route.client_id
        if r.usage is not None:
            ttft = r.first_token - r.arrival if r.first_token is not None else None
            self.fairness.observe(client, r.usage.prompt_tokens, r.usage.cached_tokens, ttft, now - r.arrival, now)
        rec = self.trace_recorder
        if rec is not None and r.ran and r.route.input_ids:
            output = r.usage.completion_tokens if r.usage is not None else r.route.max_new_tokens
            rec.record(client, r.route.input_ids, output, r.arrival)

    async def acquire(self, request: RouteRequest, exclude: Iterable[str] = ()) -> Dispatch:
        """Choose a worker and dispatch `request` there (waiting while the policy holds it). Raises
        NoHealthyWorkerError (and the policy's ClientLimitError)."""
        views = self.views(exclude)
        if not views:
            raise NoHealthyWorkerError("the router has no workers (POST /workers to add one)")
        # select and on_dispatch run back to back, with no await between: the policy's view of
        # the fleet cannot change under it
        choice = self.policy.select(request, views)
        if choice is not None:
            return self._dispatch(request, choice)
        fut: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
        self._held[request] = fut
        self.release_held()
        try:
            worker = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # dispatched in the meantime: nobody waits for the answer, so finish at once
                Dispatch(self, request, fut.result()).finish(None)
            else:
                # the policy still holds it: when it comes out, `release_held` finishes it at once
                self._held.pop(request, None)
            raise
        return Dispatch(self, request, worker)

    def _dispatch(self, request: RouteRequest, view: WorkerView) -> Dispatch:
        worker = self.workers[view.worker_id]
        self.policy.on_dispatch(request, view)
        return Dispatch(self, request, worker)

    def release_held(self) -> None:
        """Hand out what the policy holds and may send now."""
        while True:
            try:
                nxt = self.policy.next_held([w.view() for w in self.workers.values()])
            except NoHealthyWorkerError:
                return
            if nxt is None:
                return
            request, view = nxt
            worker = self.workers[view.worker_id]
            self.policy.on_dispatch(request, view)
            fut = self._held.pop(request, None)
            if fut is None or fut.done():
                # its caller left while it was held: dispatched and finished, nothing sent
                Dispatch(self, request, worker).finish(None)
                continue
            fut.set_result(worker)

    # ---- talking to workers --------------------------------------------------------------------

    def worker_headers(self, client: str) -> dict[str, str]:
        """The router's credentials, and the client it forwards for (a worker with a trusted-proxy
        key, or without keys, takes it)."""
        h = {CLIENT_HEADER: client, "content-type": "application/json"}
        if self.args.worker_api_key:
            h["authorization"] = f"Bearer {self.args.worker_api_key}"
        return h

    async def ensure_tokenizer(self) -> Tokenizer | None:
        """The model's tokenizer, fetched from the first worker that gives it (tried again every
        few seconds while none does)."""
        if self.tokenizer is not None or self.http is None:
            return self.tokenizer
        now = asyncio.get_running_loop().time()
        if now - self._tokenizer_tried < TOKENIZER_RETRY_SECS:
            return None
        self._tokenizer_tried = now
        headers = self.worker_headers("router")
        for w in list(self.workers.values()):
            try:
                r = await self.client.get(f"{w.url}/get_tokenizer", headers=headers, timeout=30.0)
                if r.status_code == 200:
                    self.tokenizer = tokenizer_from_worker(r.json())
                    logger.info("router: tokenizer fetched from %s", w.url)
                    return self.tokenizer
                # a worker without /get_tokenizer (SGLang's): its model's tokenizer, if this machine has it
                r = await self.client.get(f"{w.url}/get_model_info", headers=headers, timeout=30.0)
                path = r.json().get("tokenizer_path") if r.status_code == 200 else None
                if isinstance(path, str) and path:
                    self.tokenizer = await asyncio.to_thread(load_tokenizer, path)
                    logger.info("router: tokenizer %s, as %s names it", path, w.url)
                    return self.tokenizer
            except Exception as e:  # any worker may fail to say; routing works without tokens meanwhile
                logger.info("router: no tokenizer from %s: %s", w.url, e)
        return None

    async def check_health(self) -> None:
        """One round of health checks, all workers at once."""
        async def check(w: Worker) -> None:
            try:
                r = await self.client.get(f"{w.url}/health", timeout=self.args.health_check_timeout_secs)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if w.record_health(ok, self.health):
                logger.warning("router: worker %s is %s", w.url, "back" if w.healthy else "out (health checks fail)")
                if w.healthy:
                    self.release_held()

        await asyncio.gather(*(check(w) for w in list(self.workers.values())))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.args.health_check_interval_secs)
            try:
                await self.check_health()
            except Exception:  # the loop must outlive any one round
                logger.exception("router: health check round failed")

    # ---- reading it ----------------------------------------------------------------------------

    def in_flight(self) -> int:
        return sum(w.requests for w in self.workers.values())

    def snapshot(self) -> dict[str, Any]:
        """The router's state as JSON: per worker load, health, breaker and per-client service, the
        policy's decisions, the queue and retries."""
        index = getattr(self.policy, "index", None)
        return {
            "policy": self.policy.name,
            "workers": [{**w.snapshot(), "prefix_index_tokens": index.size(w.url) if index is not None else None}
                        for w in self.workers.values()],
            "decisions": dict(self.policy.decisions),
            "queue": {"active": self.queue.active, "waiting": self.queue.waiting, "refused": self.queue.refused},
            "retries": self.retries,
            "stream_errors": self.stream_errors,
        }
