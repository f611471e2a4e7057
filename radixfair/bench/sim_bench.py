"""`radixfair bench sim`: scheduling policies on simulated workers (real scheduler, modelled time)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from radixfair.bench.report import print_table, write_json

TABLE_WIDTH = 140


def _f(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def print_rows(rows: Sequence[dict[str, Any]], title: str) -> None:
    print_table(
        ["policy", "tok/s", "req/s", "hit rate", "Jain", "max svc diff", "p99 e2e (s)", "makespan (s)",
         "retractions"],
        [[r["policy"], f"{r['throughput']:.0f}", f"{r['request_throughput']:.2f}", f"{r['hit_rate']:.3f}",
          _f(r["jain"], ".3f"), _f(r["max_service_diff"], ".0f"), _f(r["p99_latency"], ".1f"),
          f"{r['makespan']:.1f}", str(r["retractions"])] for r in rows],
        title=title, width=TABLE_WIDTH,
    )


def main(ns: argparse.Namespace) -> int:
    from radixfair.bench.fairness_bench import parse_policies
    from radixfair.sim.cost_model import load_profile
    from radixfair.sim.scenarios import get_scenario, run_scenario
    from radixfair.sim.trace import read_jsonl

    scenario = get_scenario(ns.scenario)
    policies = parse_policies(ns.policies)
    if ns.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {ns.workers}")
    cost = load_profile(ns.profile)
    trace = read_jsonl(ns.trace) if ns.trace else None
    t = time.perf_counter()
    rows = run_scenario(scenario, cost, policies, workers=ns.workers, seed=ns.seed, trace=trace)
    wall = time.perf_counter() - t
    print_rows(rows, f"bench sim {scenario.name}: {scenario.description}; {ns.workers} worker(s), "
                     f"cost model {cost.name}; {rows[0]['requests']} requests, {wall:.1f} s wall "
                     f"(Jain and service diff over the arrival period, {scenario.window:g} s windows)")
    write_json(ns.json, rows)
    if ns.plot:
        from radixfair.bench.fairness_plot import plot_service_rates

        plot_service_rates(rows, ns.plot)
        print(f"wrote {ns.plot}")
    return 0


def add_parser(sub: Any) -> None:
    from radixfair.sim.cost_model import available_profiles
    from radixfair.sim.scenarios import DEFAULT_POLICIES, SCENARIOS

    p = sub.add_parser("sim", help="scheduling policies on simulated workers (real scheduler, cost-model time)")
    p.add_argument("--scenario", default="misbehave-s1", choices=list(SCENARIOS))
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                   help="comma list (quantum-sweep runs its own fixed set)")
    p.add_argument("--workers", type=int, default=1, help="simulated workers, round-robin routing")
    p.add_argument("--profile", default="a100-llama3.1-8b",
                   help=f"cost model: {', '.join(available_profiles())} or a JSON path")
    p.add_argument("--trace", default=None, help="JSONL trace to replay instead of the scenario's generated one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG of each client's service rate over time")
    p.set_defaults(func=main)
