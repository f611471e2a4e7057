"""Replay `bench fairness`'s workload (or any simulator trace) against a running server over HTTP,
open-loop, each request as its client (`X-Client-Id`), so that `radixfair serve --record-trace`
records that traffic. Used for the `radixfair tune` benchmark in the README.

    python benchmarks/replay_http.py --url http://127.0.0.1:30000 [--trace T.jsonl] [--duration 40]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import replace

import httpx

from radixfair.bench.fairness_workload import FAIRNESS_TRACE, Workload, make_workload, workload_from_trace
from radixfair.sim.trace import read_jsonl


async def replay(url: str, wl: Workload, duration: float, drain: float) -> tuple[int, int, int]:
    """(completed, failed, cut): requests still running `drain` s after the last arrival are cut
    off, as `bench fairness` cuts its run (the server records them with the output they asked for)."""
    ok = failed = 0
    async with httpx.AsyncClient(base_url=url, timeout=None,
                                 limits=httpx.Limits(max_connections=1000)) as http:
        t0 = time.monotonic()

        async def one(i: int) -> None:
            nonlocal ok, failed
            a = wl.arrivals[i]
            body = {"input_ids": a.input_ids, "sampling_params": {"max_new_tokens": a.max_new_tokens,
                                                                   "temperature": 0, "ignore_eos": True}}
            r = await http.post("/generate", json=body, headers={"x-client-id": a.client})
            if r.status_code == 200:
                ok += 1
            else:
                failed += 1

        tasks = []
        for i, a in enumerate(wl.arrivals):
            if a.time >= duration:
                break
            await asyncio.sleep(max(0.0, t0 + a.time - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, t0 + duration + drain - time.monotonic()))
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return ok, failed, len(pending)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--trace", default=None, help="a simulator trace (default: bench fairness's own workload)")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals")
    p.add_argument("--clients", type=int, default=FAIRNESS_TRACE.num_clients)
    p.add_argument("--rate", type=float, default=FAIRNESS_TRACE.rate, help="requests/s of each light client")
    p.add_argument("--doc-len", default=None, help="document tokens LO,HI (default bench fairness's)")
    p.add_argument("--drain", type=float, default=0.0, help="seconds to wait after the last arrival, then cut off")
    p.add_argument("--vocab-size", type=int, default=49152, help="the served model's (SmolLM2: 49152)")
    ns = p.parse_args()
    if ns.trace:
        wl = workload_from_trace(read_jsonl(ns.trace), ns.vocab_size, ns.duration)
    else:
        cfg = replace(FAIRNESS_TRACE, duration=ns.duration, num_clients=ns.clients, rate=ns.rate)
        if ns.doc_len:
            lo, hi = (int(x) for x in ns.doc_len.split(","))
            cfg = replace(cfg, doc_len=(lo, hi))
        wl = make_workload(cfg, ns.vocab_size)
    ok, failed, cut = asyncio.run(replay(ns.url, wl, ns.duration, ns.drain))
    print(f"replayed {ok + failed + cut} requests over {ns.duration:g} s: {ok} completed, {failed} failed, "
          f"{cut} cut off")


if __name__ == "__main__":
    main()
