"""The simulator routes through the router's own policy objects: conservation under every policy,
cache_aware's known failure and D²LPM on the same trace, and the distributed scenarios."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import radixfair.router.policies as router_pkg
import radixfair.sched.policies as policies_pkg
from radixfair.metrics.fairness import latency_stats
from radixfair.router.policies import GlobalVTCConfig, RouterPolicy, worker_policy
from radixfair.sim import SIM_SCHEDULER, SimConfig, Simulator, load_profile, write_jsonl
from radixfair.sim.scenarios import get_scenario, run_scenario
from radixfair.sim.trace import TraceConfig, TraceRecord, generate

SMALL = TraceConfig(workload="docqa", num_clients=4, duration=6.0, rate=2.0, heavy_factor=4.0,
                    docs_per_client=2, doc_len=(512, 768), question_len=(8, 16), output_len=(4, 12))
SMALL_SIM = SimConfig(scheduler=replace(SIM_SCHEDULER, max_total_tokens=3 * 768 + 1024, max_running_requests=16))
A100 = load_profile("a100-llama3.1-8b")


def _sim(routing: str, workers: int = 2, trace: list[TraceRecord] | None = None, **kw: object) -> Simulator:
    cfg = replace(SMALL_SIM, routing=routing, policy=worker_policy(routing), num_workers=workers, **kw)
    return Simulator(trace if trace is not None else generate(replace(SMALL, rate=2.0 * workers)), A100, cfg)


@pytest.mark.parametrize("routing", sorted(router_pkg.ROUTER_POLICIES))
def test_simulator_routes_with_the_router_classes_and_conserves_requests(routing: str) -> None:
    extra = {"router_config": GlobalVTCConfig(max_worker_requests=4)} if routing == "global_vtc" else {}
    sim = _sim(routing, workers=3, **extra)
    # the very classes the HTTP router uses, not look-alikes in radixfair.sim
    assert type(sim.router) is router_pkg.ROUTER_POLICIES[routing]
    assert isinstance(sim.router, RouterPolicy) and type(sim.router).__module__ == f"radixfair.router.policies.{routing}"
    assert type(sim.workers[0].scheduler.policy) is policies_pkg.POLICIES[worker_policy(routing)]
    res = sim.run()
    assert len(res.records) == len(sim.trace) and all(n == 1 for n in res.finish_counts.values())
    assert all(r.finish is not None for r in res.records)
    assert sum(w.requests for w in sim.workers) == len(sim.trace)
    for w in sim.workers:  # the router's counts are released on every finish
        assert w.inflight == 0 and w.inflight_tokens == 0 and w.scheduler.is_idle()
        w.scheduler.check_invariant()
    if routing == "global_vtc":
        assert res.router_decisions["held"] > 0  # the hold queue was exercised
    if routing in ("d2lpm", "global_vtc"):
        assert not sim.router._inflight  # type: ignore[attr-defined]
    if routing != "round_robin":
        assert sum(w["requests"] for w in res.workers) == len(sim.trace)


def test_routing_names_and_the_old_spelling() -> None:
    assert SimConfig(routing="round-robin").routing == "round_robin"
    with pytest.raises(ValueError, match="unknown router policy"):
        SimConfig(routing="random")


def _hot_client_trace() -> list[TraceRecord]:
    """Two workers; four light clients (2 requests/s each) and, from t=0.5 s, a hot client c0 at 40
    requests/s, every one asking about its own 1k-token document with 128-255 output tokens."""
    rng = np.random.default_rng(0)
    out: list[TraceRecord] = []
    for c, rate in [("c0", 40.0)] + [(f"c{i}", 2.0) for i in range(1, 5)]:
        t, k = (0.5 if c == "c0" else 0.0), 0
        while True:
            t += rng.exponential(1 / rate)
            if t >= 10.0:
                break
            out.append(TraceRecord(time=round(t, 6), client=c, output_len=int(rng.integers(128, 256)),
                                   segments=((f"doc/{c}", 1024), (f"q/{c}/{k}", int(rng.integers(8, 24)))),
                                   rid=f"{c}-{k}"))
            k += 1
    return sorted(out, key=lambda r: (r.time, r.rid))


def test_cache_aware_lets_a_hot_client_starve_its_neighbours_and_d2lpm_does_not() -> None:
    trace = _hot_client_trace()
    cfg = replace(SimConfig(), scheduler=replace(SIM_SCHEDULER, max_total_tokens=4 * 1024 + 2048,
                                                 max_running_requests=32), num_workers=2)
    p99 = {}
    for routing in ("cache_aware", "d2lpm"):
        sim = Simulator(trace, A100, replace(cfg, routing=routing, policy=worker_policy(routing)))
        res = sim.run()
        p99[routing] = (latency_stats(r for r in res.records if r.client != "c0").e2e_p99,
                        latency_stats(r for r in res.records if r.client == "c0").e2e_p99)
        if routing == "cache_aware":
            # c0's requests follow its prefix onto one worker until sgl-router's imbalance test fires
            # and sends every request, anyone's, to the least loaded worker
            assert res.router_decisions["imbalance"] > 0
    calm, hot = p99["cache_aware"]
    assert calm >= hot  # the light clients wait as long as the client that floods
    calm_d2, hot_d2 = p99["d2lpm"]
    # under D2LPM the light clients wait less than the flooding one, and half as long as under cache_aware
    assert calm_d2 < 0.75 * hot_d2 and calm_d2 <= 0.5 * calm, p99


SMALL_DIST = replace(get_scenario("dist-s1"), trace=replace(SMALL, duration=4.0), sim=SMALL_SIM, window=1.0,
                     worker_counts=(1, 2))
DIST_KEYS = {"scenario", "workload", "policy", "worker_policy", "workers", "throughput", "hit_rate", "jain",
             "max_service_diff", "p99_latency", "p99_latency_well_behaved", "worker_requests", "worker_busy_time",
             "load_spread"}


def test_distributed_scenario_rows_sweep_and_same_seed_same_json(tmp_path: Path) -> None:
    from radixfair.bench.sim_bench import plot_workers

    policies = ["d2lpm", "cache_aware", "power_of_two", "global_vtc"]
    rows = run_scenario(SMALL_DIST, A100, policies, workloads=["docqa", "chat"], seed=3)
    assert [(r["workload"], r["workers"], r["policy"]) for r in rows] == [
        (wl, n, p) for wl in ("docqa", "chat") for n in (1, 2) for p in policies]
    assert all(set(r) >= DIST_KEYS for r in rows)
    assert [r["worker_policy"] for r in rows[:4]] == ["dlpm", "lpm", "lpm", "vtc"]
    for r in rows:
        assert len(r["worker_requests"]) == r["workers"] == len(r["worker_busy_time"])
        assert sum(r["worker_requests"]) == r["requests"] and r["load_spread"] >= 1.0
    assert json.dumps(rows) == json.dumps(run_scenario(SMALL_DIST, A100, policies, workloads=["docqa", "chat"],
                                                       seed=3))
    assert json.dumps(run_scenario(SMALL_DIST, A100, policies, workloads=["docqa"], seed=4)) != \
        json.dumps(rows[:8])
    plot_workers(rows, str(tmp_path / "dist.png"))
    assert (tmp_path / "dist.png").stat().st_size > 1000


def test_dist_scenarios_mirror_s1_and_s2_on_every_workload() -> None:
    from radixfair.sim.scenarios import trace_configs
    from radixfair.sim.trace import WORKLOADS

    s1, s2 = get_scenario("dist-s1"), get_scenario("dist-s2")
    assert s1.worker_counts == s2.worker_counts == (1, 2, 4, 8) and s1.distributed and s2.distributed
    assert [t.workload for t in trace_configs(s1, 8)] == list(WORKLOADS)
    assert all(t.heavy_factor == 4.0 and t.rate == 8 * s1.trace.rate for t in trace_configs(s1, 8))
    assert all(t.heavy_doc_factor == 4.0 for t in trace_configs(s2, 4))


def test_cli_bench_sim_distributed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from radixfair.cli import main

    trace = tmp_path / "t.jsonl"
    write_jsonl(trace, generate(replace(SMALL, duration=3.0)))
    out, png = tmp_path / "rows.json", tmp_path / "p.png"
    assert main(["bench", "sim", "--scenario", "dist-s2", "--workers", "2", "--policies", "d2lpm,round-robin",
                 "--trace", str(trace), "--json", str(out), "--plot", str(png)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["policy"], r["worker_policy"], r["workers"]) for r in rows] == [("d2lpm", "dlpm", 2),
                                                                               ("round_robin", "lpm", 2)]
    assert png.stat().st_size > 1000 and "dist-s2" in capsys.readouterr().out
    assert main(["bench", "sim", "--scenario", "dist-s1", "--policies", "dlpm"]) != 0  # a worker policy
    assert "unknown router policy 'dlpm'" in capsys.readouterr().err
