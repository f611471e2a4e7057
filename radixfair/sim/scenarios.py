"""Named simulator scenarios: a trace, worker settings and a measurement window, fixed so that a
scenario's name alone reproduces its table."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from radixfair.metrics.fairness import latency_stats
from radixfair.router.policies import worker_policy
from radixfair.sim.cost_model import CostModel
from radixfair.sim.simulator import SIM_SCHEDULER, SimConfig, SimResult, Simulator
from radixfair.sim.trace import WORKLOADS, TraceConfig, TraceRecord, generate

DEFAULT_POLICIES = ("fcfs", "lpm", "vtc", "dlpm")
# the distributed scenarios compare router policies, each over the workers' policy it implies
DEFAULT_ROUTER_POLICIES = ("d2lpm", "cache_aware", "round_robin", "least_load", "global_vtc")
QUANTA = (256.0, 1024.0, 4096.0, 16384.0)
# a pool of ~3 of the longest documents (3,072 tokens) plus room for the running requests
_WORKER = SimConfig(scheduler=replace(SIM_SCHEDULER, max_total_tokens=3 * 3072 + 2048, max_running_requests=64))


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    trace: TraceConfig
    sim: SimConfig
    window: float  # seconds per service window of the fairness report
    workloads: tuple[str, ...] = ()  # run once per workload on the same settings; () -> (trace.workload,)
    # clients-scale: one trace per client count, every one at `total_rate` requests/s per worker in all
    # (client c0 counts `heavy_factor` shares of it)
    client_counts: tuple[int, ...] = ()
    total_rate: float | None = None
    # per-workload request rate per client, where the trace's `rate` would leave the worker with idle
    # time: a fairness index means something only while every client is backlogged
    workload_rates: tuple[tuple[str, float], ...] = ()
    # distributed: the policies are router policies (radixfair.router.policies), each run over the
    # workers' scheduling policy it implies, and without --workers the scenario sweeps worker_counts
    distributed: bool = False
    worker_counts: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        if self.client_counts and (self.total_rate is None or self.total_rate <= 0):
            raise ValueError(f"scenario {self.name!r}: client_counts needs a total_rate > 0")
        if any(n < 1 for n in self.client_counts):
            raise ValueError(f"scenario {self.name!r}: client counts must be >= 1")
        if any(r <= 0 for _, r in self.workload_rates):
            raise ValueError(f"scenario {self.name!r}: workload rates must be > 0")
        if not self.worker_counts or any(n < 1 for n in self.worker_counts):
            raise ValueError(f"scenario {self.name!r}: worker counts must be >= 1")

    def rate(self, workload: str) -> float:
        return dict(self.workload_rates).get(workload, self.trace.rate)


# S1 on long-document QA: 8 clients with 2 documents of 2-3k tokens each, client c0 at 4x the rate.
# Sized on the A100 profile so that LPM keeps up only by serving c0's cached documents (its Jain falls
# to ~0.85) while a pool of ~3 documents per worker makes locality worth ~15% throughput; measured
# with the bundled profile, not tuned per policy.
_S1 = Scenario(
    name="misbehave-s1",
    description="long-document QA, 8 clients, c0 sends 4x the others' rate (S1)",
    trace=TraceConfig(workload="docqa", num_clients=8, duration=60.0, rate=2.0, heavy_factor=4.0,
                      docs_per_client=2),
    sim=_WORKER,
    window=5.0,
    workloads=("docqa", "fewshot"),
)

# S2: every client at the same request rate, but c0's documents (few-shot templates) are 4x longer, so
# per request it asks for ~4x the prefill work; fair policies should give it the others' share of
# service, not 4x. Documents of 1-1.5k tokens (c0: 4-6k) keep the same pool as S1 meaningful.
# Few-shot requests mostly hit the cache (one template per client), so at 3 requests/s per client
# LPM and DLPM keep up, nobody is backlogged and the service shares only mirror demand (c0's long
# template misses more often); 8 requests/s overloads the worker under every policy.
_S2 = Scenario(
    name="misbehave-s2",
    description="long-document QA, 8 clients at equal rates, c0's documents 4x longer (S2)",
    trace=TraceConfig(workload="docqa", num_clients=8, duration=60.0, rate=3.0, heavy_doc_factor=4.0,
                      docs_per_client=2, doc_len=(1024, 1536)),
    sim=_WORKER,
    window=5.0,
    workloads=("docqa", "fewshot"),
    workload_rates=(("fewshot", 8.0),),
)

# 5 -> 50 clients sharing one fixed arrival rate (c0 still at 4x a client's share): as the clients
# multiply, their documents stop fitting in the pool together, locality thins out, and a fair policy
# has more backlogged clients to balance.
_SCALE = Scenario(
    name="clients-scale",
    description="long-document QA, 5 to 50 clients at a fixed total rate, c0 at 4x a client's share",
    trace=TraceConfig(workload="docqa", num_clients=8, duration=30.0, rate=1.0, heavy_factor=4.0,
                      docs_per_client=2),
    sim=_WORKER,
    window=5.0,
    client_counts=(5, 10, 20, 50),
    total_rate=16.0,
)

# The D²LPM paper's distributed experiments: S1 and S2 on each of the five workloads, the clients'
# requests routed over 1, 2, 4 and 8 workers. Each worker is offered what one worker is offered in
# misbehave-s1/s2 (the trace's rate scales with the workers), so that c0's share overloads a worker
# it piles onto while the others' requests fit. Arrivals last 15 s, not 60: the 8-worker run of all
# five workloads and five policies (25 simulations of ~2.6k requests each) must fit in two minutes on
# a small CPU; 2.5 s windows keep six of them for the fairness figures.
_DIST_S1 = replace(_S1, name="dist-s1", description="S1 routed over several workers: 8 clients, c0 at 4x the others' "
                                                     "rate, each worker offered misbehave-s1's load",
                   trace=replace(_S1.trace, duration=15.0), window=2.5, workloads=WORKLOADS, distributed=True,
                   worker_counts=(1, 2, 4, 8))
_DIST_S2 = replace(_S2, name="dist-s2", description="S2 routed over several workers: 8 clients at equal rates, c0's "
                                                     "documents 4x longer, each worker offered misbehave-s2's load",
                   trace=replace(_S2.trace, duration=15.0), window=2.5, workloads=WORKLOADS, distributed=True,
                   worker_counts=(1, 2, 4, 8))

SCENARIOS: dict[str, Scenario] = {
    "misbehave-s1": _S1,
    "misbehave-s2": _S2,
    "dist-s1": _DIST_S1,
    "dist-s2": _DIST_S2,
    "clients-scale": _SCALE,
    # the same trace, DLPM's quantum against LPM and VTC (the locality/fairness trade-off)
    "quantum-sweep": replace(_S1, name="quantum-sweep", description="misbehave-s1 with DLPM at several quanta",
                             workloads=()),
}


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}") from None


def default_policies(scenario: Scenario) -> tuple[str, ...]:
    return DEFAULT_ROUTER_POLICIES if scenario.distributed else DEFAULT_POLICIES


def variants(scenario: Scenario, policies: Sequence[str]) -> list[tuple[str, SimConfig]]:
    """(label, config) per run: the policies, or for quantum-sweep lpm, vtc and dlpm at each quantum;
    in a distributed scenario the router policies, each over the workers' policy it implies."""
    if scenario.distributed:
        return [(p, replace(scenario.sim, routing=p, policy=worker_policy(p))) for p in policies]
    if scenario.name == "quantum-sweep":
        out = [(p, replace(scenario.sim, policy=p)) for p in ("lpm", "vtc")]
        return out + [(f"dlpm Q={int(q)}", replace(scenario.sim, policy="dlpm",
                                                   policy_config=replace(scenario.sim.policy_config, dlpm_quantum=q)))
                      for q in QUANTA]
    return [(p, replace(scenario.sim, policy=p)) for p in policies]


def trace_configs(scenario: Scenario, workers: int = 1, seed: int = 0,
                  workloads: Sequence[str] | None = None) -> list[TraceConfig]:
    """The scenario's traces: one per workload (and, for clients-scale, per client count)."""
    # more workers serve proportionally more load, so each stays as loaded as the single one
    base = replace(scenario.trace, seed=seed)
    out = []
    for wl in tuple(workloads or ()) or scenario.workloads or (base.workload,):
        if not scenario.client_counts:
            out.append(replace(base, workload=wl, rate=scenario.rate(wl) * workers))
            continue
        assert scenario.total_rate is not None
        for n in scenario.client_counts:
            per_client = scenario.total_rate * workers / (n - 1 + base.heavy_factor)
            out.append(replace(base, workload=wl, num_clients=n, rate=per_client))
    return out


def run_scenario(scenario: Scenario, cost_model: CostModel, policies: Sequence[str] | None = None,
                 workers: int | None = None, seed: int = 0, trace: Sequence[TraceRecord] | None = None,
                 workloads: Sequence[str] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """One JSON row per policy (variant), trace and worker count, every policy on the same trace.
    `workers` None: the scenario's worker counts. A given `trace` replaces the generated ones (it is
    run once per worker count, labelled with the scenario's first workload). `progress(done, total)`
    is called after each simulation."""
    policies = default_policies(scenario) if policies is None else policies
    counts = (workers,) if workers is not None else scenario.worker_counts
    runs = []
    for n in counts:
        tcfgs = trace_configs(scenario, n, seed, workloads)
        runs += [(n, t) for t in (tcfgs[:1] if trace is not None else tcfgs)]
    # a workload's rows together, by worker count
    first = {wl: i for i, wl in enumerate(dict.fromkeys(t.workload for _, t in runs))}
    runs.sort(key=lambda run: first[run[1].workload])
    total = len(runs) * len(variants(scenario, policies))
    rows: list[dict[str, Any]] = []
    for n, tcfg in runs:
        records = list(trace) if trace is not None else generate(tcfg)
        for label, cfg in variants(scenario, policies):
            result = Simulator(records, cost_model, replace(cfg, num_workers=n, seed=seed)).run()
            rows.append(summarize(scenario, label, result, heavy_factor=tcfg.heavy_factor, workload=tcfg.workload,
                                  heavy_doc_factor=tcfg.heavy_doc_factor,
                                  num_clients=None if trace is not None else tcfg.num_clients))
            if progress is not None:
                progress(len(rows), total)
    return rows


def summarize(scenario: Scenario, label: str, result: SimResult, heavy_factor: float = 1.0,
              workload: str | None = None, heavy_doc_factor: float = 1.0,
              num_clients: int | None = None) -> dict[str, Any]:
    """`num_clients`: the clients of the generated trace (some may have sent nothing in a short one);
    None: the clients the records name."""
    rep = result.report(window=scenario.window)
    done = [r for r in result.records if r.finish is not None]
    tokens = sum(r.prompt_tokens + r.output_tokens for r in done)
    span = result.makespan or 1.0
    clients = list(rep.windows.clients)
    row = {
        "scenario": scenario.name,
        "policy": label,
        "workload": workload or scenario.trace.workload,
        "clients": num_clients if num_clients is not None else len(clients),
        "throughput": tokens / span,  # prompt + output tokens per virtual second, until drained
        "jain": _num(rep.jain),
        "max_service_diff": _num(rep.service_difference.max),
        "p99_latency": _num(rep.overall_latency.e2e_p99),
        "hit_rate": rep.hit_rate,
        "request_throughput": len(done) / span,
        "requests": len(result.records),
        "completed": len(done),
        "makespan": result.makespan,
        "cost_model": result.cost_model,
        "workers": result.config.num_workers,
        "dlpm_quantum": result.config.policy_config.dlpm_quantum,
        "retractions": sum(w["retractions"] for w in result.workers),
        "heavy_client": clients[0] if clients else "",
        "heavy_factor": heavy_factor,
        "heavy_doc_factor": heavy_doc_factor,
        # for the plot (same shape as bench fairness rows)
        "timeline": {"edges": rep.windows.edges.tolist(),
                     "service": {c: rep.windows.service[:, j].tolist() for j, c in enumerate(clients)}},
    }
    if scenario.distributed:
        row.update(distributed_figures(result, clients[0] if clients else ""))
    return row


def distributed_figures(result: SimResult, heavy: str) -> dict[str, Any]:
    """What a distributed row adds: the workers' policy, the latency of the clients other than the
    misbehaving one, and how evenly the router spread the work."""
    calm = latency_stats(r for r in result.records if r.client != heavy)
    busy = [w["busy_time"] for w in result.workers]
    mean_busy = sum(busy) / len(busy)
    return {
        "worker_policy": result.config.policy,
        "p99_latency_well_behaved": _num(calm.e2e_p99),
        "p50_latency_well_behaved": _num(calm.e2e_p50),
        "worker_requests": [w["requests"] for w in result.workers],
        "worker_busy_time": busy,
        # the busiest worker's busy time over the mean: 1 is an even spread, N all on one of N workers
        "load_spread": max(busy) / mean_busy if mean_busy > 0 else 1.0,
        "router_decisions": dict(result.router_decisions),
    }


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x
