"""`radixfair bench router`: routing policies in front of real local workers (the default model).

N worker processes (`radixfair launch`'s `LocalFleet`) serve a multi-client shared-prefix workload
(`bench fairness`'s long-document QA trace, scaled down: each client asks short questions about its
own document, one misbehaving client at `--heavy-factor` times the others' rate), replayed open-loop
through the router under each policy. The workers run the scheduling policy the router's implies
(d2lpm: dlpm, others: lpm) and are restarted when that changes; caches are flushed between runs.
If the `sglang-router` package is importable by `--sglang-router-python` (default: this Python),
its `cache_aware` router runs in front of the same lpm workers as the row `sglang_router`.

Rows: policy, throughput (prompt + output tokens of finished requests per second of the run),
hit_rate (cached / prompt tokens), jain (over the clients backlogged in at least half the windows),
p99_latency, p99_latency_well_behaved (every client but the heavy one), retries (None where the
router does not say).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import httpx

from radixfair.bench.fairness_workload import FAIRNESS_TRACE, Arrival, Workload, make_workload
from radixfair.bench.processes import free_port, wait_healthy
from radixfair.bench.report import print_table, write_json
from radixfair.engine_args import EngineArgs
from radixfair.metrics import RequestRecord
from radixfair.metrics.fairness import fairness_report, latency_stats
from radixfair.metrics.service import W_IN, W_OUT

DEFAULT_POLICIES = ("d2lpm", "cache_aware", "round_robin")
ROUTER_KEY_CLIENT = "router"
POOL_ROOM = 768  # KV tokens for the running requests, besides the documents
GRACE_FACTOR = 1.5  # a run is cut at this times the arrivals' span; what is unfinished then is aborted


async def replay(url: str, wl: Workload, texts: list[str], cut: float) -> tuple[list[RequestRecord], float]:
    """Send every arrival at its time to `url` as text (`texts[i]` for arrival i; non-streamed, the
    client named in X-Client-Id); the records, and the seconds the run took."""
    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(cut + 60), limits=limits) as c:
        t0 = time.monotonic()

        async def one(a: Arrival, text: str) -> None:
            await asyncio.sleep(max(a.time - (time.monotonic() - t0), 0.0))
            sent = time.monotonic() - t0
            body = {"text": text, "sampling_params": {"max_new_tokens": a.max_new_tokens,
                                                                   "temperature": 0, "ignore_eos": True}}
            try:
                r = await c.post("/generate", json=body, headers={"x-client-id": a.client})
            except httpx.HTTPError:
                records.append(RequestRecord(a.client, sent, None, None, len(a.input_ids), 0, 0))
                return
            done = time.monotonic() - t0
            meta = r.json().get("meta_info", {}) if r.status_code == 200 else {}
            if r.status_code != 200:
                records.append(RequestRecord(a.client, sent, None, None, len(a.input_ids), 0, 0))
                return
            ttft = meta.get("ttft")
            first = sent + ttft if isinstance(ttft, (int, float)) else done
            records.append(RequestRecord(a.client, sent, min(first, done), done, int(meta.get("prompt_tokens", 0)),
                                         int(meta.get("cached_tokens", 0)), int(meta.get("completion_tokens", 0))))

        tasks = [asyncio.create_task(one(a, t)) for a, t in zip(wl.arrivals, texts, strict=True)]
        _, pending = await asyncio.wait(tasks, timeout=cut)
        for t in pending:
            t.cancel()  # the router sees the client leave and aborts the request at the worker
        await asyncio.gather(*tasks, return_exceptions=True)
        return records, time.monotonic() - t0


def row(policy: str, wl: Workload, records: list[RequestRecord], elapsed: float, retries: int | None,
        window: float) -> dict[str, Any]:
    done = [r for r in records if r.finish is not None]
    rep = fairness_report(records, t0=0.0, t1=wl.duration, window=window, w_in=W_IN, w_out=W_OUT,
                          clients=wl.clients)
    light = [r for r in records if r.client != wl.heavy_client]
    tokens = sum(r.prompt_tokens + r.output_tokens for r in done)

    def finite(x: float) -> float | None:
        return None if math.isnan(x) else x

    return {"policy": policy, "throughput": tokens / elapsed if elapsed else 0.0, "hit_rate": rep.hit_rate,
            "jain": finite(rep.jain), "p99_latency": finite(latency_stats(records).e2e_p99),
            "p99_latency_well_behaved": finite(latency_stats(light).e2e_p99), "retries": retries,
            "requests": len(records), "finished": len(done)}


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """`app` served by uvicorn on a free 127.0.0.1 port in a thread; its URL."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="radixfair-bench-router", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the router did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _workload(cfg: Any, url: str) -> tuple[Workload, list[str]]:
    """The trace, and each prompt as text: routers that match text (sglang-router's) and routers
    that match tokens see the same requests."""
    from radixfair.router.prompt_tokens import tokenizer_from_worker

    tok = tokenizer_from_worker(httpx.get(url + "/get_tokenizer", timeout=30).json())
    wl = make_workload(cfg, tok.vocab_size)
    return wl, [tok.decode(a.input_ids) for a in wl.arrivals]


class _Workers:
    """The local workers, (re)started for the scheduling policy a router policy implies."""

    def __init__(self, n: int, engine: EngineArgs) -> None:
        self.n = n
        self.engine = engine
        self.fleet: Any = None
        self.policy: str | None = None
        self.urls: list[str] = []

    def ensure(self, schedule_policy: str) -> list[str]:
        from radixfair.router.launch import LocalFleet
        from radixfair.server.auth import ServerClient

        if self.policy == schedule_policy:
            for u in self.urls:  # the same workers: a cold cache for the next run
                httpx.post(u + "/flush_cache", timeout=60)
            return self.urls
        self.stop()
        # no keys: the bench's router names clients in X-Client-Id, which a worker without keys takes
        self.fleet = LocalFleet(self.n, replace(self.engine, schedule_policy=schedule_policy),
                                dict[str, ServerClient]())
        self.urls = self.fleet.start()
        self.policy = schedule_policy
        asyncio.run(_warm_up(self.urls))
        return self.urls

    def stop(self) -> None:
        if self.fleet is not None:
            self.fleet.stop()
            self.fleet = None
            self.policy = None


async def _warm_up(urls: list[str], rounds: int = 3, batch: int = 6) -> None:
    """Requests of the workload's shapes, straight to each worker, then a flush: a fresh worker's
    first batches run several times slower (allocator, kernel set-up), which would otherwise be
    charged to whichever policy runs first."""
    async with httpx.AsyncClient(timeout=300) as c:
        for r in range(rounds):
            await asyncio.gather(*(c.post(u + "/generate", json={
                "input_ids": [1000 + 7 * i + r + k for k in range(160)],
                "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}}) for u in urls for i in range(batch)))
        await asyncio.gather(*(c.post(u + "/flush_cache") for u in urls))


def _run_ours(policy: str, urls: list[str], wl: Workload, texts: list[str],
              cut: float) -> tuple[list[RequestRecord], float, int]:
    from radixfair.router.app import create_router_app
    from radixfair.router.router_args import RouterArgs
    from radixfair.router.serve import build_policy
    from radixfair.router.state import RouterState

    state = RouterState(RouterArgs(worker_urls=tuple(urls), policy=policy, max_concurrent_requests=1024,
                                   queue_size=4096), build_policy(policy, {}))
    with serve_in_thread(create_router_app(state)) as url:
        records, elapsed = asyncio.run(replay(url, wl, texts, cut))
    return records, elapsed, state.retries


def sglang_router_available(python: str) -> bool:
    r = subprocess.run([python, "-c", "import sglang_router"], capture_output=True)
    return r.returncode == 0


def _run_sglang_router(python: str, urls: list[str], wl: Workload, texts: list[str],
                       cut: float) -> tuple[list[RequestRecord], float]:
    port = free_port()
    proc = subprocess.Popen([python, "-m", "sglang_router.launch_router", "--worker-urls", *urls, "--policy",
                             "cache_aware", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 60, "sglang_router")
        return asyncio.run(replay(url, wl, texts, cut))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def main(ns: argparse.Namespace) -> int:
    from radixfair.router.policies import canonical_name, worker_policy

    policies = [canonical_name(p.strip()) for p in ns.policies.split(",") if p.strip()]
    cfg = replace(FAIRNESS_TRACE, num_clients=ns.clients, duration=ns.duration, rate=ns.rate,
                  heavy_factor=ns.heavy_factor, doc_len=(ns.doc_len, ns.doc_len + ns.doc_len // 2),
                  question_len=(8, 16), output_len=(ns.output_len, 2 * ns.output_len), seed=ns.seed)
    threads = max((os.cpu_count() or 1) // ns.workers, 1) if ns.num_threads is None else ns.num_threads
    # a pool for two of the longest documents and the running requests: too small for every
    # client's document, so where a router sends a client decides what stays cached
    pool = ns.max_total_tokens or 2 * cfg.doc_len[1] + POOL_ROOM
    engine = EngineArgs(model=ns.model, max_total_tokens=pool, num_threads=threads)
    workers = _Workers(ns.workers, engine)
    sglang_python = ns.sglang_router_python or sys.executable
    rows: list[dict[str, Any]] = []
    cut = ns.duration * GRACE_FACTOR
    try:
        wl: Workload | None = None
        texts: list[str] = []
        for policy in policies:
            urls = workers.ensure(worker_policy(policy))
            if wl is None:
                wl, texts = _workload(cfg, urls[0])
                print(f"workload: {len(wl.arrivals)} requests from {len(wl.clients)} clients over {wl.duration:g} s "
                      f"({wl.heavy_client} at {wl.heavy_factor:g}x), worker KV pools of {pool} tokens", flush=True)
            records, elapsed, retries = _run_ours(policy, urls, wl, texts, cut)
            rows.append(row(policy, wl, records, elapsed, retries, ns.window))
            print(f"{policy}: done", flush=True)
        if wl is not None and not ns.no_sglang_router and sglang_router_available(sglang_python):
            urls = workers.ensure("lpm")
            records, elapsed = _run_sglang_router(sglang_python, urls, wl, texts, cut)
            rows.append(row("sglang_router", wl, records, elapsed, None, ns.window))
        elif not ns.no_sglang_router:
            print(f"sglang_router: not importable by {sglang_python}; no sglang_router row", flush=True)
    finally:
        workers.stop()

    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    print_table(["policy", "throughput tok/s", "hit_rate", "jain", "p99 s", "p99 well-behaved s", "retries",
                 "finished"],
                [[r["policy"], fmt(r["throughput"], ".0f"), fmt(r["hit_rate"], ".3f"), fmt(r["jain"], ".3f"),
                  fmt(r["p99_latency"], ".2f"), fmt(r["p99_latency_well_behaved"], ".2f"), fmt(r["retries"], "d"),
                  f"{r['finished']}/{r['requests']}"] for r in rows],
                title=f"bench router: {ns.workers} workers", width=140)
    config = {k: v for k, v in vars(ns).items() if isinstance(v, (str, int, float, bool, type(None)))}
    write_json(ns.json, {"config": config, "rows": rows})
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("router", help="routing policies in front of real local workers (and sglang-router's)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES), help="comma list of router policies")
    p.add_argument("--model", default=None, help="the workers' model (default: the default model)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per policy")
    p.add_argument("--rate", type=float, default=0.15, help="requests/s of each well-behaved client")
    p.add_argument("--heavy-factor", type=float, default=4.0, help="the misbehaving client's rate over the others'")
    p.add_argument("--doc-len", type=int, default=96, help="shortest document (prefix) in tokens; the longest is 1.5x")
    p.add_argument("--output-len", type=int, default=4, help="shortest output; the longest is 2x")
    p.add_argument("--max-total-tokens", type=int, default=None,
                   help=f"each worker's KV pool (default: two of the longest documents + {POOL_ROOM})")
    p.add_argument("--num-threads", type=int, default=None, help="torch threads per worker (default: split)")
    p.add_argument("--window", type=float, default=5.0, help="seconds per fairness window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sglang-router-python", default=None,
                   help="a Python that can import sglang_router (default: this one)")
    p.add_argument("--no-sglang-router", action="store_true", help="skip the sglang_router row")
    p.add_argument("--json", default=None)
    p.set_defaults(func=main)
