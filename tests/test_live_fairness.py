"""The live fairness view (`/fairness`'s JSON) from synthetic snapshots, and the per-client state the
scheduler reports for it."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from radixfair.bench.fairness_workload import FAIRNESS_TRACE
from radixfair.io_struct import ClientStats
from radixfair.metrics.live_fairness import FairnessSnapshot, FairnessView, fairness_bound
from radixfair.sched.policies import PolicyConfig
from radixfair.sim import SimConfig, Simulator, load_profile
from radixfair.sim.trace import TraceRecord, generate


def snap(t: float, clients: list[ClientStats], balance: str = "deficit", bound: float = 500.0,
         tokens: tuple[int, int, int] = (0, 0, 0), weights: dict[str, float] | None = None) -> FairnessSnapshot:
    return FairnessSnapshot(time=t, policy="dlpm", quantum=1024.0, balance=balance, bound=bound,
                            input_tokens=tokens[0], cached_tokens=tokens[1], decode_tokens=tokens[2], kv_used=0.25,
                            clients=tuple(clients), weights=weights or {})


def test_rates_backlog_and_behind() -> None:
    view = FairnessView(window_s=60.0)
    view.sample(snap(0.0, [ClientStats("a", 1, 0, 0.0, 10.0), ClientStats("b", 1, 0, 0.0, 5.0),
                           ClientStats("idle", 0, 0, 0.0, 0.0)], tokens=(0, 0, 0)))
    out = view.report(snap(10.0, [ClientStats("a", 2, 1, 1000.0, -20.0), ClientStats("b", 3, 0, 100.0, 7.0),
                                  ClientStats("idle", 0, 0, 0.0, 0.0)], tokens=(2000, 1500, 400)))
    rows = {c["client"]: c for c in out["clients"]}
    assert out["policy"] == "dlpm" and out["quantum"] == 1024.0 and out["window_s"] == 60.0
    assert out["throughput"] == pytest.approx(240.0)  # (2000 prompt + 400 output tokens) / 10 s
    assert out["hit_rate"] == pytest.approx(0.75)
    assert out["kv_used"] == 0.25
    assert rows["a"]["service_rate"] == pytest.approx(100.0) and rows["b"]["service_rate"] == pytest.approx(10.0)
    assert rows["a"]["deficit"] == -20.0 and "counter" not in rows["a"]
    assert rows["a"]["backlogged"] and rows["b"]["backlogged"] and not rows["idle"]["backlogged"]
    # b waits and trails a by 900 charged tokens over the window, more than the bound of 500
    assert rows["b"]["behind"] and not rows["a"]["behind"] and not rows["idle"]["behind"]
    assert rows["a"]["waiting"] == 2 and rows["a"]["running"] == 1
    assert out["history"]["t"] == [0.0]
    assert out["history"]["service_rate"]["a"] == [pytest.approx(100.0)]
    assert "workers" not in out


def test_behind_counts_weights_and_the_bound() -> None:
    clients0 = [ClientStats("a", 1, 0, 0.0), ClientStats("b", 1, 0, 0.0)]
    clients1 = [ClientStats("a", 1, 0, 1000.0), ClientStats("b", 1, 0, 100.0)]
    # b has a tenth of a's weight: per unit of weight it is served as much as a
    view = FairnessView()
    view.sample(snap(0.0, clients0))
    rows = {c["client"]: c for c in view.report(snap(10.0, clients1, weights={"b": 0.1}))["clients"]}
    assert not rows["b"]["behind"]
    # within the bound: not behind
    view = FairnessView()
    view.sample(snap(0.0, clients0))
    rows = {c["client"]: c for c in view.report(snap(10.0, clients1, bound=2000.0))["clients"]}
    assert not rows["b"]["behind"]
    # a policy without a balance has neither field
    view = FairnessView()
    row = view.report(snap(1.0, clients1, balance=""))["clients"][0]
    assert "deficit" not in row and "counter" not in row


def test_latencies_hit_rates_and_workers() -> None:
    view = FairnessView(window_s=30.0)
    for i in range(100):
        view.observe("a", 100, 80, ttft=0.01 * (i + 1), e2e=0.1 * (i + 1), now=float(i) / 10)
    view.observe("a", 100, 0, ttft=None, e2e=50.0, now=-100.0)  # outside the window
    out = view.report(snap(10.0, [ClientStats("a", 0, 0, 5.0)]), workers=[{"url": "http://w0", "load": 3,
                                                                           "healthy": True}])
    row = out["clients"][0]
    assert row["hit_rate"] == pytest.approx(0.8)
    assert row["ttft_p50"] == pytest.approx(0.505) and row["e2e_p99"] == pytest.approx(9.901)
    assert out["workers"] == [{"url": "http://w0", "load": 3, "healthy": True}]
    # a client nothing finished for has no latency figures
    view = FairnessView()
    row = view.report(snap(0.0, [ClientStats("new", 1, 0, 0.0)]))["clients"][0]
    assert row["ttft_p50"] is None and row["hit_rate"] is None and row["service_rate"] == 0.0


def test_bounded_clients_and_restarts() -> None:
    view = FairnessView(max_clients=5)
    many = [ClientStats(f"c{i:02d}", 0, 0, float(i)) for i in range(50)]
    busy = [ClientStats("zz-busy", 1, 0, 0.0)]
    view.sample(snap(0.0, many + busy))
    out = view.report(snap(5.0, many + busy))
    names = [c["client"] for c in out["clients"]]
    # the client with requests in the system first, then the most served
    assert names == sorted(["zz-busy", "c49", "c48", "c47", "c46"])
    for _ in range(20):  # observing as many clients as it likes keeps a bounded table
        view.observe(f"x{_}", 1, 0, None, 1.0)
    assert len(view._finished) <= 4 * 5
    # a total that went down (the worker forgot the client) restarts from zero, never a negative rate
    view = FairnessView()
    view.sample(snap(0.0, [ClientStats("a", 1, 0, 500.0)]))
    row = view.report(snap(10.0, [ClientStats("a", 1, 0, 50.0)]))["clients"][0]
    assert row["service_rate"] == pytest.approx(5.0)


def test_readings_too_close_are_not_samples() -> None:
    view = FairnessView(window_s=60.0)  # one sample every 2 s
    view.sample(snap(0.0, [ClientStats("a", 1, 0, 0.0)]))
    view.sample(snap(0.01, [ClientStats("a", 1, 0, 1000.0)]))
    assert view.latest is not None and view.latest.time == 0.01  # the newest reading, kept or not
    out = view.report(snap(4.0, [ClientStats("a", 1, 0, 1000.0)]))
    assert out["history"]["service_rate"]["a"] == [pytest.approx(250.0)]
    view.sample(snap(3.0, [ClientStats("a", 1, 0, 900.0)]))  # an older reading that lost a race
    assert view.latest is not None and view.latest.time == 4.0


def test_fairness_bound() -> None:
    # U = max(w_in * 8192, w_out * 128) = 8192
    assert fairness_bound("vtc", 1.0, 2.0, 4096.0, 8192, 128) == 2 * 8192
    assert fairness_bound("dlpm", 1.0, 2.0, 4096.0, 8192, 128) == 2 * (8192 + 4096)
    assert fairness_bound("lpm", 1.0, 2.0, 4096.0, 8192, 128) == 2 * 8192
    assert fairness_bound("vtc", 1.0, 100.0, 1.0, 10, 128) == 2 * 12800


@pytest.mark.parametrize("policy,balance", [("dlpm", "deficit"), ("vtc", "counter"), ("lpm", "")])
def test_scheduler_reports_each_clients_service(policy: str, balance: str) -> None:
    """The scheduler's per-client charged service adds up to what the simulator saw delivered, and
    its balance is the policy's own state."""
    trace = generate(replace(FAIRNESS_TRACE, num_clients=3, duration=8.0, rate=0.5))
    sim = Simulator(trace, load_profile("cpu-smollm2"), SimConfig(policy=policy, policy_config=PolicyConfig(
        dlpm_quantum=512)))
    result = sim.run()
    stats = sim.workers[0].scheduler.stats()
    assert stats.policy == policy and stats.balance == balance
    delivered: dict[str, float] = {}
    for ev in result.events:
        delivered[ev.client] = delivered.get(ev.client, 0.0) + ev.amount
    got = {c.client: c for c in stats.clients}
    assert set(got) == set(delivered)
    for client, amount in delivered.items():
        assert got[client].service == pytest.approx(amount)
        assert got[client].waiting == 0 and got[client].running == 0  # drained
        if balance:
            assert got[client].balance is not None and math.isfinite(got[client].balance)
        else:
            assert got[client].balance is None
    assert "clients" not in stats.to_dict()  # names clients: not in /get_server_info


def test_scheduler_service_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past `MAX_SERVICE_CLIENTS` the scheduler forgets clients with nothing in the system."""
    import radixfair.sched.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "MAX_SERVICE_CLIENTS", 3)
    # 12 clients arriving one after another, each done before the next: at most 3 totals are kept
    trace = [TraceRecord(time=10.0 * i, client=f"u{i}", output_len=4, segments=((f"doc{i}", 64),), rid=f"r{i}")
             for i in range(12)]
    sim = Simulator(trace, load_profile("cpu-smollm2"), SimConfig(policy="dlpm"))
    sim.run()
    kept = {c.client for c in sim.workers[0].scheduler.stats().clients}
    assert len(kept) <= 3 and "u11" in kept


def test_a_client_that_came_between_two_samples_counts_from_zero() -> None:
    """A sample that lists every client says a client absent from it had no service yet (one that came
    and went between two samples is not lost); a sample cut to `max_clients` says nothing of the rest."""
    view = FairnessView(window_s=60.0)
    view.sample(snap(0.0, [ClientStats("a", 0, 0, 0.0)]))
    out = view.report(snap(10.0, [ClientStats("a", 0, 0, 0.0), ClientStats("new", 0, 0, 500.0)]))
    rows = {c["client"]: c for c in out["clients"]}
    assert rows["new"]["service_rate"] == pytest.approx(50.0)
    assert out["history"]["service_rate"]["new"] == [pytest.approx(50.0)]
    cut = FairnessView(window_s=60.0, max_clients=1)
    cut.sample(snap(0.0, [ClientStats("a", 1, 0, 0.0), ClientStats("b", 0, 0, 100.0)]))  # keeps only a
    rows = {c["client"]: c for c in cut.report(snap(10.0, [ClientStats("b", 1, 0, 500.0)]))["clients"]}
    assert rows["b"]["service_rate"] == 0.0  # no reading to count from


def test_a_routers_running_clients_are_backlogged() -> None:
    """A router's "running" requests are in flight at workers that may be queueing them: with
    `running_backlogged` a running client is backlogged, and can be behind."""
    clients0 = [ClientStats("a", 0, 1, 0.0), ClientStats("b", 0, 1, 0.0), ClientStats("idle", 0, 0, 0.0)]
    clients1 = [ClientStats("a", 0, 1, 1000.0), ClientStats("b", 0, 1, 100.0), ClientStats("idle", 0, 0, 0.0)]
    view = FairnessView()
    view.sample(snap(0.0, clients0))
    rows = {c["client"]: c for c in view.report(snap(10.0, clients1))["clients"]}
    assert not rows["a"]["backlogged"] and not rows["b"]["behind"]  # a worker's: waiting only
    view = FairnessView()
    view.sample(replace(snap(0.0, clients0), running_backlogged=True))
    out = view.report(replace(snap(10.0, clients1), kv_used=None, running_backlogged=True))
    rows = {c["client"]: c for c in out["clients"]}
    assert rows["a"]["backlogged"] and rows["b"]["backlogged"] and not rows["idle"]["backlogged"]
    assert rows["b"]["behind"] and not rows["a"]["behind"]
    assert out["kv_used"] is None  # a router none of whose workers said
