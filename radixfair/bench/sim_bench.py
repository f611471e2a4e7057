"""`radixfair bench sim`: scheduling policies on simulated workers (real scheduler, modelled time)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from radixfair.bench.report import print_table, write_json

TABLE_WIDTH = 140


def _f(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def print_rows(rows: Sequence[dict[str, Any]], title: str) -> None:
    print_table(
        ["workload", "clients", "policy", "tok/s", "req/s", "hit rate", "Jain", "max svc diff", "p99 e2e (s)",
         "makespan (s)", "retractions"],
        [[r["workload"], str(r["clients"]), r["policy"], f"{r['throughput']:.0f}", f"{r['request_throughput']:.2f}", f"{r['hit_rate']:.3f}",
          _f(r["jain"], ".3f"), _f(r["max_service_diff"], ".0f"), _f(r["p99_latency"], ".1f"),
          f"{r['makespan']:.1f}", str(r["retractions"])] for r in rows],
        title=title, width=TABLE_WIDTH,
    )


def print_distributed_rows(rows: Sequence[dict[str, Any]], title: str) -> None:
    print_table(
        ["workload", "workers", "policy", "worker policy", "tok/s", "hit rate", "Jain", "max svc diff",
         "p99 e2e (s)", "p99 well-behaved (s)", "load spread", "makespan (s)"],
        [[r["workload"], str(r["workers"]), r["policy"], r["worker_policy"], f"{r['throughput']:.0f}",
          f"{r['hit_rate']:.3f}", _f(r["jain"], ".3f"), _f(r["max_service_diff"], ".0f"), _f(r["p99_latency"], ".1f"),
          _f(r["p99_latency_well_behaved"], ".1f"), f"{r['load_spread']:.2f}", f"{r['makespan']:.1f}"] for r in rows],
        title=title, width=TABLE_WIDTH,
    )


def _requests(rows: Sequence[dict[str, Any]]) -> str:
    """Requests per trace: one number, or one per trace where the scenario runs several."""
    per = {(r["workload"], r["clients"], r["workers"]): r["requests"] for r in rows}
    return str(next(iter(per.values()))) if len(per) == 1 else "+".join(map(str, per.values()))


def parse_router_policies(spec: str) -> list[str]:
    from radixfair.router.policies import canonical_name

    names = [canonical_name(p.strip()) for p in spec.split(",") if p.strip()]
    if not names:
        raise ValueError("--policies is empty")
    return list(dict.fromkeys(names))


def main(ns: argparse.Namespace) -> int:
    from radixfair.bench.fairness_bench import parse_policies
    from radixfair.sim.cost_model import load_profile
    from radixfair.sim.scenarios import default_policies, get_scenario, run_scenario
    from radixfair.sim.trace import read_jsonl

    scenario = get_scenario(ns.scenario)
    if ns.arrival is not None or ns.cv is not None:
        arrival = ns.arrival or ("gamma" if ns.cv is not None else scenario.trace.arrival)
        if arrival == "poisson" and ns.cv not in (None, 1.0):
            raise ValueError("--cv sets the burstiness of --arrival gamma; Poisson arrivals have cv 1")
        scenario = replace(scenario, trace=replace(scenario.trace, arrival=arrival,
                                                   cv=scenario.trace.cv if ns.cv is None else ns.cv))
    if ns.disable_row_share:
        sim = scenario.sim
        scenario = replace(scenario, sim=replace(sim, policy_config=replace(sim.policy_config, row_share=False)))
    spec = ns.policies or ",".join(default_policies(scenario))
    policies = parse_router_policies(spec) if scenario.distributed else parse_policies(spec)
    if ns.workers is not None and ns.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {ns.workers}")
    workers = ns.workers if ns.workers is not None or scenario.distributed else 1
    cost = load_profile(ns.profile)
    trace = read_jsonl(ns.trace) if ns.trace else None
    if ns.trace_out:
        if trace is not None:
            raise ValueError("--trace-out writes the scenario's generated traces; it does not go with --trace")
        for path in write_traces(scenario, ns.trace_out, workers, ns.seed, workloads=_workloads(ns)):
            print(f"wrote {path}")
    t = time.perf_counter()
    workloads = _workloads(ns)
    from tqdm import tqdm

    with tqdm(desc=f"bench sim {scenario.name}", unit="run", mininterval=0.5 if sys.stderr.isatty() else 30.0) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        rows = run_scenario(scenario, cost, policies, workers=workers, seed=ns.seed, trace=trace,
                            workloads=workloads, progress=progress)
    wall = time.perf_counter() - t
    counts = ",".join(str(n) for n in dict.fromkeys(r["workers"] for r in rows))
    title = (f"bench sim {scenario.name}: {scenario.description}; {counts} worker(s), "
             f"cost model {cost.name}; {_requests(rows)} requests, {wall:.1f} s wall "
             f"(Jain and service diff over the arrival period, {scenario.window:g} s windows)")
    if scenario.distributed:
        print_distributed_rows(rows, title)
    else:
        print_rows(rows, title)
    write_json(ns.json, rows)
    if ns.plot:
        if scenario.distributed:
            plot_workers(rows, ns.plot)
        elif scenario.client_counts:
            plot_client_scale(rows, ns.plot)
        elif scenario.name == "quantum-sweep":
            plot_quantum_sweep(rows, ns.plot)
        else:
            from radixfair.bench.fairness_plot import plot_service_rates

            plot_service_rates(rows, ns.plot)
        print(f"wrote {ns.plot}")
    return 0


def _workloads(ns: argparse.Namespace) -> list[str] | None:
    return [w.strip() for w in ns.workloads.split(",") if w.strip()] if ns.workloads else None


def write_traces(scenario: Any, path: str, workers: int | None = 1, seed: int = 0,
                 workloads: Sequence[str] | None = None) -> list[str]:
    """The scenario's generated traces as JSONL, the files `--trace` (here and in `bench calibrate`)
    replays. One trace goes to `path`; several get their workload (and client count, or worker count
    for a sweep: `workers` None) before the suffix."""
    from radixfair.sim.scenarios import trace_configs
    from radixfair.sim.trace import generate, write_jsonl

    counts = (workers,) if workers is not None else scenario.worker_counts
    runs = [(n, t) for n in counts for t in trace_configs(scenario, n, seed, workloads)]
    p = Path(path)
    out = []
    for n, tcfg in runs:
        target = p
        if len(runs) > 1:
            tag = tcfg.workload + (f".{tcfg.num_clients}clients" if scenario.client_counts else "")
            tag += f".{n}workers" if len(counts) > 1 else ""
            target = p.with_name(f"{p.stem}.{tag}{p.suffix or '.jsonl'}")
        write_jsonl(target, generate(tcfg))
        out.append(str(target))
    return out


def plot_quantum_sweep(rows: Sequence[dict[str, Any]], path: str) -> None:
    """quantum-sweep: throughput against fairness (Jain's index; the largest service gap between
    backlogged clients), DLPM's quanta as a line from VTC's end to LPM's (the DLPM paper's Figure 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dlpm = sorted((r for r in rows if r["policy"].startswith("dlpm")), key=lambda r: r["dlpm_quantum"])
    ends = [r for r in rows if not r["policy"].startswith("dlpm")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, key, xlabel in ((axes[0], "jain", "Jain's index (service, arrival period)"),
                            (axes[1], "max_service_diff", "max service difference (tokens, lower is fairer)")):
        xs = [float("nan") if r[key] is None else r[key] for r in dlpm]
        ax.plot(xs, [r["throughput"] for r in dlpm], marker="o", color="tab:green", label="dlpm")
        for r, x in zip(dlpm, xs, strict=True):
            ax.annotate(f"Q={int(r['dlpm_quantum'])}", (x, r["throughput"]), textcoords="offset points",
                        xytext=(5, -11), fontsize=8)
        for r, color in zip(ends, ("tab:red", "tab:blue", "tab:gray", "tab:orange"), strict=False):
            ax.scatter([float("nan") if r[key] is None else r[key]], [r["throughput"]], s=60, marker="s",
                       color=color, label=r["policy"], zorder=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("throughput (tokens/s)")
        ax.grid(alpha=0.3)
    axes[1].invert_xaxis()  # fairer to the right in both panels
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{rows[0]['scenario']} ({rows[0]['workload']}): cost model {rows[0]['cost_model']}, "
                 f"{rows[0]['workers']} worker(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_client_scale(rows: Sequence[dict[str, Any]], path: str) -> None:
    """clients-scale: Jain and throughput against the number of clients, a line per policy (and
    workload), drawn from the JSON rows alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict[str, Any]]] = {}
    multi = len({r["workload"] for r in rows}) > 1
    for r in rows:
        series.setdefault(f"{r['policy']} ({r['workload']})" if multi else r["policy"], []).append(r)
    fig, (ax_j, ax_t) = plt.subplots(1, 2, figsize=(12, 4.2))
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r["clients"])
        xs = [r["clients"] for r in rs]
        ax_j.plot(xs, [float("nan") if r["jain"] is None else r["jain"] for r in rs], marker="o", label=label)
        ax_t.plot(xs, [r["throughput"] for r in rs], marker="o", label=label)
    for ax, ylabel in ((ax_j, "Jain's index (service, arrival period)"), (ax_t, "throughput (tokens/s)")):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(sorted({r["clients"] for r in rows}), [str(n) for n in sorted({r["clients"] for r in rows})])
        ax.set_xlabel("clients (fixed total request rate)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"{rows[0]['scenario']}: cost model {rows[0]['cost_model']}, {rows[0]['workers']} worker(s)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_workers(rows: Sequence[dict[str, Any]], path: str) -> None:
    """Distributed scenarios: p99 latency of the well-behaved clients (top) and Jain's index
    (bottom) against the number of workers, a line per router policy, a column per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    counts = sorted({r["workers"] for r in rows})
    fig, axes = plt.subplots(2, len(workloads), figsize=(3.6 * len(workloads) + 1, 6.4), squeeze=False)
    for col, wl in enumerate(workloads):
        for p in policies:
            rs = sorted((r for r in rows if r["workload"] == wl and r["policy"] == p), key=lambda r: r["workers"])
            label = f"{p} ({rs[0]['worker_policy']} workers)" if rs else p
            xs = [r["workers"] for r in rs]
            nan = float("nan")
            axes[0][col].plot(xs, [nan if r["p99_latency_well_behaved"] is None else r["p99_latency_well_behaved"]
                                   for r in rs], marker="o", label=label)
            axes[1][col].plot(xs, [nan if r["jain"] is None else r["jain"] for r in rs], marker="o", label=label)
        axes[0][col].set_title(wl)
        axes[0][col].set_yscale("log")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
            ax.set_xticks(counts, [str(n) for n in counts])
            ax.grid(alpha=0.3)
        axes[1][col].set_xlabel("workers")
    axes[0][0].set_ylabel("p99 latency, well-behaved clients (s)")
    axes[1][0].set_ylabel("Jain's index (service, arrival period)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{rows[0]['scenario']}: cost model {rows[0]['cost_model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(sub: Any) -> None:
    from radixfair.sim.cost_model import available_profiles
    from radixfair.sim.scenarios import DEFAULT_POLICIES, DEFAULT_ROUTER_POLICIES, SCENARIOS

    p = sub.add_parser("sim", help="scheduling policies on simulated workers (real scheduler, cost-model time)")
    p.add_argument("--scenario", default="misbehave-s1", choices=list(SCENARIOS))
    p.add_argument("--policies", default=None,
                   help=f"comma list of worker scheduling policies (default {','.join(DEFAULT_POLICIES)}; "
                        f"quantum-sweep runs its own fixed set), or for dist-s1/dist-s2 of router policies "
                        f"(default {','.join(DEFAULT_ROUTER_POLICIES)}; also power_of_two), each over the "
                        f"workers' policy it implies: d2lpm -> dlpm, global_vtc -> vtc, others -> lpm")
    p.add_argument("--workers", type=int, default=None,
                   help="simulated workers (default 1, routed round-robin; dist-s1/dist-s2 sweep 1, 2, 4 and 8)")
    p.add_argument("--profile", default="a100-llama3.1-8b",
                   help=f"cost model: {', '.join(available_profiles())} or a JSON path")
    p.add_argument("--workloads", default=None,
                   help="comma list of docqa,fewshot,tot,judge,chat (default: the scenario's; misbehave-s1/s2 run "
                        "docqa,fewshot, dist-s1/s2 all five)")
    p.add_argument("--trace", default=None, help="JSONL trace to replay instead of the scenario's generated one")
    p.add_argument("--trace-out", default=None, metavar="PATH",
                   help="also write the scenario's generated trace(s) as JSONL (several: PATH.<workload>.jsonl)")
    p.add_argument("--arrival", default=None, choices=["poisson", "gamma"],
                   help="arrival process of the generated traces (default: the scenario's, Poisson)")
    p.add_argument("--cv", type=float, default=None,
                   help="coefficient of variation of Gamma inter-arrival gaps (implies --arrival gamma; 1 = Poisson)")
    p.add_argument("--disable-row-share", action="store_true",
                   help="the workers' vtc and dlpm without a guaranteed share of the batch's rows per client "
                        "(the engine flag of the same name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG of each client's service rate over time (dist-s1/s2: p99 of "
                                                 "the well-behaved clients and Jain against the workers)")
    p.set_defaults(func=main)
