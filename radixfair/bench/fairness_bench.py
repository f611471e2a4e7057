"""`radixfair bench fairness`: scheduling policies under an overloaded long-document QA workload.

Every client has its own document and sends short questions about it (open-loop Poisson); one client
sends `--heavy-factor` times the others' rate, and the KV pool holds only about three documents, so a
policy must choose between serving the documents it has cached (locality) and serving every client
(fairness). Each policy gets a fresh engine on the same trace; after `--duration` seconds of arrivals
the run is cut off (no drain): throughput and latency count completed requests, the service timeline
counts the tokens delivered before the cut.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from radixfair.bench.fairness_driver import RunResult, replay
from radixfair.bench.fairness_workload import (
    FAIRNESS_TRACE,
    Workload,
    default_pool_tokens,
    make_workload,
    workload_from_trace,
)
from radixfair.bench.report import print_table, write_json
from radixfair.config_flags import add_flags, flag_values
from radixfair.engine_args import EngineArgs
from radixfair.metrics import as_plain, fairness_report

DEFAULT_POLICIES = "fcfs,lpm,vtc,dlpm"
# The engine settings this benchmark takes as flags; the KV pool (`--max-total-tokens`) is its own,
# sized from the documents.
ENGINE_FLAGS = ("model", "dtype", "max_running_requests", "w_in", "w_out", "dlpm_quantum", "num_threads")
# DLPM is fair over intervals long against a round (every client's quantum). A default-length run on
# a CPU serves each client less than one round at the engine's quantum, so no fairness could show;
# a quantum under one document's prefill gives several rounds (README, "bench fairness").
DLPM_QUANTUM = 1024.0
TABLE_WIDTH = 160


def parse_policies(spec: str) -> list[str]:
    """Names from a comma list, checked against the registered policies before any engine starts."""
    from radixfair.sched.policies import POLICIES

    names = [p.strip() for p in spec.split(",") if p.strip()]
    if not names:
        raise ValueError("--policies is empty")
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown schedule policy {', '.join(map(repr, unknown))} for bench fairness; "
                         f"this build has: {', '.join(POLICIES)}")
    return list(dict.fromkeys(names))


def _range(spec: str) -> tuple[int, int]:
    parts = [int(x) for x in spec.split(",")]
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected N or LO,HI, got {spec!r}")
    return parts[0], parts[1]


def engine_kwargs(ns: argparse.Namespace, pool: int) -> dict[str, Any]:
    # the policies charge with the same w_in / w_out the metrics count
    return dict(flag_values(EngineArgs, ns, only=ENGINE_FLAGS), max_total_tokens=pool, random_seed=ns.seed)


def run_policy(policy: str, wl: Workload, kw: dict[str, Any], ns: argparse.Namespace) -> RunResult:
    from tqdm import tqdm

    from radixfair.engine.engine import Engine

    engine = Engine(schedule_policy=policy, **kw)
    try:
        # one-time costs (first forward, allocator warm-up) should not land in the first window
        engine.generate(input_ids=wl.arrivals[0].input_ids[:32],
                        sampling_params={"max_new_tokens": 2, "temperature": 0.0, "ignore_eos": True})
        engine.flush_cache()
        # redirected to a file, a bar redrawn every 0.1 s would bury the tables
        interval = 0.5 if sys.stderr.isatty() else 30.0
        with tqdm(total=round(ns.duration), desc=f"{policy:>10}", unit="s", disable=not ns.progress,
                  mininterval=interval,
                  bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total}s {postfix}") as bar:

            def progress(elapsed: float, arrived: int, completed: int) -> None:
                bar.n = min(round(elapsed), bar.total)
                bar.set_postfix_str(f"{completed}/{arrived} requests done")

            return replay(engine, wl, policy, ns.duration, ns.w_in, ns.w_out, progress)
    finally:
        engine.shutdown()


def analyze(run: RunResult, wl: Workload, window: float, w_in: float, w_out: float) -> dict[str, Any]:
    """One JSON row: the headline figures, per-client detail and the service timeline for the plot."""
    rep = fairness_report(run.records, run.events, t0=0.0, t1=run.duration, window=window, w_in=w_in,
                          w_out=w_out, clients=wl.clients)
    done = [r for r in run.records if r.finish is not None]
    tokens = sum(r.prompt_tokens + r.output_tokens for r in done)
    lat = as_plain(rep.latency)
    clients: dict[str, Any] = {}
    for c in wl.clients:
        mine = [r for r in run.records if r.client == c]
        clients[c] = {
            "arrival_rate": wl.rate_of(c),
            "arrived": len(mine),
            "completed": sum(r.finish is not None for r in mine),
            "service": rep.total_service[c],
            "backlogged_windows": int(rep.windows.backlogged[:, wl.clients.index(c)].sum()),
            **lat[c],
        }
    overall = rep.overall_latency
    return {
        "policy": run.policy,
        "throughput": tokens / run.duration,  # prompt + output tokens of completed requests per second
        "output_throughput": sum(r.output_tokens for r in done) / run.duration,
        "request_throughput": len(done) / run.duration,
        "hit_rate": rep.hit_rate,
        "jain": _num(rep.jain),
        "jain_clients": len(rep.backlogged_rates),
        "max_service_diff": _num(rep.service_difference.max),
        "avg_service_diff": _num(rep.service_difference.mean),
        "p50_latency": _num(overall.e2e_p50),
        "p99_latency": _num(overall.e2e_p99),
        "p99_ttft": _num(overall.ttft_p99),
        "arrived": len(run.records),
        "completed": len(done),
        "duration": run.duration,
        "window": window,
        "w_in": w_in,
        "w_out": w_out,
        "heavy_client": wl.heavy_client,
        "heavy_factor": wl.heavy_factor,
        "retractions": run.engine_stats.get("retractions"),
        "evicted_tokens": run.engine_stats.get("evicted_tokens"),
        "max_total_tokens": run.engine_stats.get("max_total_tokens"),
        "clients": clients,
        "timeline": {
            "edges": rep.windows.edges.tolist(),
            "service": {c: rep.windows.service[:, j].tolist() for j, c in enumerate(wl.clients)},
        },
    }


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def _f(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def print_summary(rows: Sequence[dict[str, Any]], wl: Workload) -> None:
    print_table(
        ["policy", "tok/s", "req/s", "hit rate", "Jain", "max svc diff", "avg svc diff", "p50 e2e (s)",
         "p99 e2e (s)", "done/arrived"],
        [[r["policy"], f"{r['throughput']:.0f}", f"{r['request_throughput']:.2f}", f"{r['hit_rate']:.3f}",
          _f(r["jain"], ".3f") + f" ({r['jain_clients']})", _f(r["max_service_diff"], ".0f"),
          _f(r["avg_service_diff"], ".0f"), _f(r["p50_latency"], ".1f"), _f(r["p99_latency"], ".1f"),
          f"{r['completed']}/{r['arrived']}"] for r in rows],
        title="bench fairness (Jain over the backlogged clients, their count in brackets; service in "
              f"charged tokens per {rows[0]['window']:g} s window)",
        width=TABLE_WIDTH,
    )
    print_table(
        ["client", *[r["policy"] for r in rows]],
        [[f"{c} ({wl.rate_of(c):g}/s)",
          *[_client_cell(r["clients"][c]) for r in rows]] for c in wl.clients],
        title="per client: charged service · e2e p50/p99 s (completed/arrived)",
        width=TABLE_WIDTH,
    )


def _client_cell(c: dict[str, Any]) -> str:
    return (f"{c['service']:.0f} · {_f(c['e2e_p50'], '.1f')}/{_f(c['e2e_p99'], '.1f')} "
            f"({c['completed']}/{c['arrived']})")


def main(ns: argparse.Namespace) -> int:
    from radixfair.engine.loaders import inspect_model

    policies = parse_policies(ns.policies)
    vocab = inspect_model(ns.model).config.vocab_size
    if ns.trace:
        from radixfair.sim.trace import read_jsonl

        wl = workload_from_trace(read_jsonl(ns.trace), vocab, ns.duration)
    else:
        duration = FAIRNESS_TRACE.duration if ns.duration is None else ns.duration
        wl = make_workload(replace(
            FAIRNESS_TRACE, num_clients=ns.clients, duration=duration, rate=ns.rate, heavy_factor=ns.heavy_factor,
            doc_len=ns.doc_len, question_len=ns.question_len, output_len=ns.output_len, seed=ns.seed), vocab)
    ns.duration = wl.duration  # the driver and the progress bar read it
    if ns.window <= 0 or ns.window > ns.duration:
        raise ValueError(f"--window must be in (0, {ns.duration:g}] (the run's duration), got {ns.window}")
    pool = ns.max_total_tokens or default_pool_tokens(wl)
    kw = engine_kwargs(ns, pool)
    light = f"the rest at {wl.rate:.3g}/s" + (" on average" if ns.trace else "")
    print(f"{len(wl.arrivals)} requests in {ns.duration:g} s from {len(wl.clients)} clients "
          f"({wl.heavy_client} at {wl.rate_of(wl.heavy_client):.3g}/s, {light}); prompts "
          f"{wl.doc_len[0]}-{wl.doc_len[1]} tokens{' (with questions)' if ns.trace else ''}, KV pool {pool} "
          f"tokens, DLPM quantum {ns.dlpm_quantum:g}; cut off at {ns.duration:g} s (no drain)")
    rows = []
    t = time.perf_counter()
    for policy in policies:
        run = run_policy(policy, wl, kw, ns)
        row = analyze(run, wl, ns.window, ns.w_in, ns.w_out)
        row["dlpm_quantum"] = ns.dlpm_quantum
        rows.append(row)
    print(f"{len(policies)} policies in {time.perf_counter() - t:.0f} s")
    print_summary(rows, wl)
    write_json(ns.json, rows)
    if ns.plot:
        from radixfair.bench.fairness_plot import plot_service_rates

        plot_service_rates(rows, ns.plot)
        print(f"wrote {ns.plot}")
    return 0


def add_parser(sub: Any) -> None:
    d = FAIRNESS_TRACE
    p = sub.add_parser("fairness", help="scheduling policies under an overloaded multi-client document-QA load")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help=f"comma list (default {DEFAULT_POLICIES})")
    p.add_argument("--clients", type=int, default=d.num_clients)
    p.add_argument("--duration", type=float, default=None,
                   help=f"seconds of arrivals per policy; then cut off (default {d.duration:g}; with --trace, its span)")
    p.add_argument("--trace", default=None, metavar="JSONL",
                   help="replay a simulator trace (`bench sim --trace-out`) instead of the built-in workload; "
                        "--clients, --rate, --heavy-factor and the length ranges then do not apply")
    p.add_argument("--rate", type=float, default=d.rate, help="requests/s of each well-behaved client")
    p.add_argument("--heavy-factor", type=float, default=d.heavy_factor, help="rate multiple of client c0")
    p.add_argument("--doc-len", type=_range, default=d.doc_len, help="document tokens, LO,HI")
    p.add_argument("--question-len", type=_range, default=d.question_len, help="question tokens, LO,HI")
    p.add_argument("--output-len", type=_range, default=d.output_len, help="output tokens, LO,HI")
    p.add_argument("--window", type=float, default=10.0, help="seconds per service window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG of each client's service rate over time")
    engine = p.add_argument_group("engine")
    engine.add_argument("--max-total-tokens", type=int, default=None,
                        help="KV pool size (default: 3 of the longest documents + 2048)")
    add_flags(engine, EngineArgs, only=ENGINE_FLAGS,
              defaults={"max_running_requests": 64, "dlpm_quantum": DLPM_QUANTUM})
    p.set_defaults(func=main)
