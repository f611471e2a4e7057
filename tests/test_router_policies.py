"""The routing policies as plain objects: each choice on hand-built worker states, D²LPM's deficits,
global VTC's hold queue, the registry and the settings."""

from __future__ import annotations

import argparse

import pytest

from radixfair.config_flags import add_flags, flag_values
from radixfair.router.policies import (
    ROUTER_POLICIES,
    CacheAwareConfig,
    CacheAwarePolicy,
    ClientLimitError,
    D2LPMConfig,
    D2LPMPolicy,
    GlobalVTCConfig,
    GlobalVTCPolicy,
    LeastLoadPolicy,
    NoHealthyWorkerError,
    PowerOfTwoConfig,
    PowerOfTwoPolicy,
    RoundRobinPolicy,
    RouteRequest,
    Usage,
    WorkerView,
    make_router_policy,
    router_config,
    worker_policy,
)
from radixfair.router.policies.worker_index import WorkerPrefixIndex

DOC_A = tuple(range(1000, 1100))  # 100-token "documents"
DOC_B = tuple(range(2000, 2100))
_n = iter(range(10**9))


def req(client: str = "a", prompt: tuple[int, ...] = DOC_A, out: int = 10, t: float = 0.0,
        weight: float = 1.0) -> RouteRequest:
    """A prompt + one fresh question token, so that every request is new past its document."""
    return RouteRequest(client, (*prompt, 5_000_000 + next(_n)), out, rid=f"r{next(_n)}", weight=weight, time=t)


def views(*loads: int, unhealthy: tuple[int, ...] = (), tokens: tuple[int, ...] | None = None) -> list[WorkerView]:
    toks = tokens or tuple(100 * n for n in loads)
    return [WorkerView(f"w{i}", n, toks[i], healthy=i not in unhealthy) for i, n in enumerate(loads)]


def ids(ws: list[WorkerView]) -> list[str]:
    return [w.worker_id for w in ws]


# ---- round_robin, least_load, power_of_two -------------------------------------------------------


def test_round_robin_cycles_and_skips_unhealthy_workers() -> None:
    rr = RoundRobinPolicy()
    ws = views(9, 0, 0)
    assert [rr.select(req(), ws).worker_id for _ in range(4)] == ["w0", "w1", "w2", "w0"]
    ws = views(0, 0, 0, unhealthy=(2,))
    assert [rr.select(req(), ws).worker_id for _ in range(3)] == ["w1", "w0", "w1"]
    with pytest.raises(NoHealthyWorkerError):
        rr.select(req(), views(0, 0, unhealthy=(0, 1)))


def test_least_load_counts_requests_then_tokens_then_order() -> None:
    ll = LeastLoadPolicy()
    assert ll.select(req(), views(3, 1, 2)).worker_id == "w1"
    assert ll.select(req(), views(2, 2, 5, tokens=(900, 300, 0))).worker_id == "w1"  # tie on requests
    assert ll.select(req(), views(1, 1, tokens=(50, 50))).worker_id == "w0"  # full tie: the first
    assert ll.select(req(), views(0, 4, unhealthy=(0,))).worker_id == "w1"


def test_power_of_two_takes_the_lighter_of_two_and_is_seeded() -> None:
    ws = views(5, 0, 9)
    a, b = PowerOfTwoPolicy(PowerOfTwoConfig(seed=1)), PowerOfTwoPolicy(PowerOfTwoConfig(seed=1))
    picks = [a.select(req(), ws).worker_id for _ in range(200)]
    assert picks == [b.select(req(), ws).worker_id for _ in range(200)]
    # pairs (w0,w1) -> w1, (w0,w2) -> w0, (w1,w2) -> w1: the busiest is never taken
    assert set(picks) == {"w0", "w1"} and picks.count("w1") > picks.count("w0")
    assert a.select(req(), views(5, 0, unhealthy=(1,))).worker_id == "w0"


# ---- cache_aware ----------------------------------------------------------------------------------


def test_cache_aware_prefix_hit_smallest_tree_and_imbalance() -> None:
    ca = CacheAwarePolicy()

    def route(r: RouteRequest, ws: list[WorkerView]) -> str:
        w = ca.select(r, ws)
        ca.on_dispatch(r, w)
        return w.worker_id

    assert route(req(prompt=DOC_A), views(0, 0, 0)) == "w0"  # empty trees tie: the first
    assert route(req(prompt=DOC_B), views(1, 0, 0)) == "w1"  # no match: the smallest tree
    # a prefix hit wins over load while the load is not imbalanced (busy w0, idle others)
    assert route(req(prompt=DOC_A), views(60, 0, 0)) == "w0"
    assert route(req(prompt=DOC_A), views(200, 150, 150)) == "w0"  # 50 apart: not imbalanced
    # imbalanced (more than 64 apart and more than 1.5x): the least loaded, prefix or not
    assert route(req(prompt=DOC_A), views(100, 10, 20)) == "w1"
    assert route(req(prompt=DOC_A), views(100, 70, 80)) == "w0"  # 30 apart: not imbalanced
    # a match of 20 tokens out of 101 is under the 0.3 threshold: the smallest tree (w2, empty)
    assert route(req(prompt=DOC_A[:20] + tuple(range(3000, 3080))), views(0, 0, 0)) == "w2"
    # several workers hold the best match: sgl-router takes its tree's first tenant, load-blind
    assert route(req(prompt=DOC_A), views(30, 0, 0)) == "w0"
    assert ca.decisions == {"smallest_tree": 3, "cache": 4, "imbalance": 1}
    with pytest.raises(NoHealthyWorkerError):
        ca.select(req(), views(0, unhealthy=(0,)))


def test_cache_aware_trims_each_workers_tree_every_eviction_interval() -> None:
    ca = CacheAwarePolicy(CacheAwareConfig(max_tree_size=150, eviction_interval_secs=10.0))
    for t, doc in ((0.0, DOC_A), (1.0, DOC_B)):
        r = req(prompt=doc, t=t)
        ca.on_dispatch(r, WorkerView("w0"))
    assert ca.index.size("w0") == 202  # not yet: the last trim was at t=0
    ca.select(req(prompt=DOC_B, t=11.0), views(0, 0))
    assert ca.index.size("w0") == 101  # least recently used first: DOC_A's branch went
    assert ca.index.match((*DOC_B, 7), ["w0"]) == {"w0": 100}
    assert ca.index.match((*DOC_A, 7), ["w0"]) == {"w0": 0}


def test_worker_index_match_does_not_refresh_what_it_looks_at() -> None:
    index = WorkerPrefixIndex(max_tree_size=150)  # trims on every insert
    index.insert("w", DOC_A, now=0)
    index.insert("w", DOC_B[:40], now=1)
    for _ in range(3):  # looking at A must not make it the most recently used
        assert index.match(DOC_A, ["w", "other"]) == {"w": 100, "other": 0}
    index.insert("w", DOC_B, now=2)  # 200 tokens > 150: the least recently used leaf (A) goes
    assert index.match(DOC_A, ["w"]) == {"w": 0} and index.size("w") == 100
    index.remove_worker("w")
    assert index.size("w") == 0


# ---- d2lpm ----------------------------------------------------------------------------------------


def _route(pol: D2LPMPolicy, r: RouteRequest, ws: list[WorkerView]) -> str:
    w = pol.select(r, ws)
    pol.on_dispatch(r, w)
    return w.worker_id


def test_d2lpm_locality_first_then_load_and_the_guard() -> None:
    pol = D2LPMPolicy()
    assert _route(pol, req(prompt=DOC_A), views(5, 0)) == "w1"  # nothing cached: least loaded
    assert _route(pol, req(prompt=DOC_A), views(0, 3)) == "w1"  # the prefix wins over a small load gap
    assert _route(pol, req(prompt=DOC_A), views(10, 100)) == "w0"  # imbalanced: the guard
    # now both hold DOC_A: the less loaded of them
    assert _route(pol, req(prompt=DOC_A), views(4, 2)) == "w1"
    assert _route(pol, req(prompt=DOC_A), views(1, 2)) == "w0"
    assert pol.decisions == {"load": 1, "locality": 3, "guard": 1}
    with pytest.raises(NoHealthyWorkerError):
        pol.select(req(), views(0, 0, unhealthy=(0, 1)))


def test_d2lpm_deficit_refill_and_spill_when_one_client_floods() -> None:
    # each request: 101 prompt tokens, 10 output tokens (w_out 2): 121 uncached, 21 over a cached DOC_A
    pol = D2LPMPolicy(D2LPMConfig(router_quantum=500))
    ws = views(0, 0, 0)
    assert _route(pol, req("a"), ws) == "w0"
    assert pol.rounds == 1 and pol.deficits["a"] == {"w0": 500 - 121, "w1": 500, "w2": 500}
    placed = [_route(pol, req("a"), ws) for _ in range(20)]
    # w0 stays open while its deficit is > 0: 19 more requests at 21 each (379 -> -20); the 20th
    # finds it spent and spills, a miss (121), to w1
    assert placed == ["w0"] * 19 + ["w1"]
    assert pol.deficits["a"]["w0"] == pytest.approx(379 - 19 * 21) and pol.decisions["spill"] == 1
    assert pol.deficits["a"]["w1"] == 500 - 121
    # another client's deficits are its own: w0 is open to it, and its prefix stays there
    assert _route(pol, req("b", prompt=DOC_B), ws) == "w0"
    assert _route(pol, req("b", prompt=DOC_B), views(0, 1, 0)) == "w0"
    # "a" stays on w1 (it holds DOC_A now) until spent, then w2; then a new round opens all three
    for _ in range(200):
        _route(pol, req("a"), ws)
    assert pol.rounds > 1
    assert all(pol.index.match((*DOC_A, 1), ["w0", "w1", "w2"]).values())  # DOC_A spread over every worker


def test_d2lpm_corrects_estimates_on_finish_and_keeps_no_idle_credit() -> None:
    pol = D2LPMPolicy(D2LPMConfig(router_quantum=1000))
    r = req("a", out=10)
    w = pol.select(r, views(0, 0))
    pol.on_dispatch(r, w)
    assert pol.deficits["a"]["w0"] == 1000 - 121
    r2 = req("a", out=10)
    pol.on_dispatch(r2, pol.select(r2, views(1, 0)))  # cached on w0: 21
    pol.on_finish(r, w, Usage(prompt_tokens=101, cached_tokens=0, completion_tokens=4))  # 109, not 121
    assert pol.deficits["a"]["w0"] == pytest.approx(1000 - 121 - 21 + 12)
    # idle: positive credit is dropped; a client owing nothing is forgotten
    pol.on_finish(r2, w, Usage(101, 100, 10))
    assert "a" not in pol.deficits
    # a debt survives idleness (and a failed request is refunded in full)
    pol = D2LPMPolicy(D2LPMConfig(router_quantum=100))
    big = req("a", out=100)  # 301 > the quantum
    pol.on_dispatch(big, pol.select(big, views(0, 0)))
    failed = req("a")
    pol.on_dispatch(failed, pol.select(failed, views(1, 0)))
    debt = pol.deficits["a"]["w0"]
    pol.on_finish(failed, WorkerView("w1"), None)
    pol.on_finish(big, WorkerView("w0"), Usage(101, 0, 100))
    assert pol.deficits["a"] == {"w0": debt, "w1": 0.0} and debt < 0
    with pytest.raises(KeyError):
        pol.on_finish(failed, WorkerView("w1"), None)  # twice


def test_d2lpm_bounds_client_state_without_forgiving_debts() -> None:
    pol = D2LPMPolicy(D2LPMConfig(max_clients=2, router_quantum=1000))
    ra, rb = req("a", out=1000), req("b", out=1)  # a overdraws its quantum (2101), b does not (103)
    for r in (ra, rb):
        pol.on_dispatch(r, pol.select(r, views(0, 0)))
    with pytest.raises(ClientLimitError):
        pol.select(req("c"), views(0, 0))
    pol.on_finish(rb, WorkerView("w0"), Usage(101, 0, 1))  # b leaves owing nothing: forgotten
    assert set(pol.deficits) == {"a"}
    pol.on_finish(ra, WorkerView("w0"), Usage(101, 0, 1000))  # a leaves in debt: kept
    rc = req("c")
    pol.on_dispatch(rc, pol.select(rc, views(0, 0)))
    with pytest.raises(ClientLimitError):
        pol.select(req("d"), views(0, 0))
    pol.remove_worker("w0")
    assert "w0" not in pol.deficits["a"] and pol.index.size("w0") == 0
    # a worker that joins mid-round opens to a client at its next round
    rc2 = req("c")
    assert _route(pol, rc2, views(0, 0, 0)[1:]) == "w1"


# ---- global_vtc -----------------------------------------------------------------------------------


def test_global_vtc_holds_past_capacity_and_releases_the_lowest_counter_first() -> None:
    pol = GlobalVTCPolicy(GlobalVTCConfig(max_worker_requests=2))
    loads = [0, 0]
    sent: list[tuple[RouteRequest, str]] = []

    def send(r: RouteRequest) -> bool:
        w = pol.select(r, views(*loads))
        if w is None:
            return False
        pol.on_dispatch(r, w)
        loads[int(w.worker_id[1])] += 1
        sent.append((r, w.worker_id))
        return True

    assert send(req("b"))  # b: counter 121
    assert [send(req("a")) for _ in range(6)] == [True] * 3 + [False] * 3  # a joins at b's, then 3 x 121
    assert [w for _, w in sent] == ["w0", "w1", "w0", "w1"] and pol.held() == 3
    late = req("b")
    assert not send(late)  # full: held behind a's three
    assert pol.next_held(views(*loads)) is None  # no room yet
    assert pol.counters["b"] < pol.counters["a"]
    done, where = sent[1]  # one of a's finishes on w1
    pol.on_finish(done, WorkerView(where), Usage(101, 0, 10))
    loads[1] -= 1
    nxt = pol.next_held(views(*loads))
    # b's request goes first although a's held ones are older: b has the smaller counter
    assert nxt is not None and nxt[0] is late and nxt[1].worker_id == "w1"
    assert pol.decisions == {"direct": 4, "held": 4}


def test_global_vtc_lifts_returning_clients_and_forgets_those_owing_nothing() -> None:
    pol = GlobalVTCPolicy()
    busy = req("a", prompt=DOC_A * 10)
    pol.on_dispatch(busy, pol.select(busy, views(0)))  # a: 1001 + 20
    quick = req("b")
    pol.on_dispatch(quick, pol.select(quick, views(1)))
    assert pol.counters["b"] == pytest.approx(1021 + 121)  # b arrived at a's counter (the floor)
    pol.on_finish(quick, WorkerView("w0"), Usage(101, 0, 10))
    assert "b" in pol.counters  # above the floor (a's): kept
    pol.on_finish(busy, WorkerView("w0"), Usage(1001, 0, 10))
    # a left last, nobody is in the system: the floor is its own counter, so it owes nothing
    assert "a" not in pol.counters and "b" in pol.counters


# ---- registry and settings -------------------------------------------------------------------------


def test_registry_names_aliases_and_worker_policies() -> None:
    assert set(ROUTER_POLICIES) == {"round_robin", "least_load", "power_of_two", "cache_aware", "d2lpm",
                                    "global_vtc"}
    assert type(make_router_policy("round-robin")) is RoundRobinPolicy
    assert [worker_policy(p) for p in ("d2lpm", "global_vtc", "cache_aware", "round_robin", "least_load",
                                       "power_of_two")] == ["dlpm", "vtc", "lpm", "lpm", "lpm", "lpm"]
    with pytest.raises(ValueError, match="unknown router policy 'nope'; choose from round_robin"):
        make_router_policy("nope")
    with pytest.raises(TypeError, match="CacheAwareConfig"):
        make_router_policy("cache_aware", D2LPMConfig())
    for name, cls in ROUTER_POLICIES.items():
        assert cls.name == name and cls.__module__ == f"radixfair.router.policies.{name}"


def test_configs_keep_sgl_routers_defaults_and_name_bad_values() -> None:
    c = CacheAwareConfig()
    assert (c.cache_threshold, c.balance_abs_threshold, c.balance_rel_threshold, c.eviction_interval_secs) == \
        (0.3, 64, 1.5, 120.0)
    d = D2LPMConfig()
    assert (d.cache_threshold, d.balance_abs_threshold, d.balance_rel_threshold) == (0.3, 64, 1.5)
    for cls, field, bad in ((CacheAwareConfig, "cache_threshold", 1.5), (D2LPMConfig, "router_quantum", 0),
                            (D2LPMConfig, "balance_rel_threshold", -1.0), (CacheAwareConfig, "max_tree_size", 0),
                            (GlobalVTCConfig, "max_worker_requests", 0), (D2LPMConfig, "w_in", float("nan")),
                            (D2LPMConfig, "max_clients", 0)):
        with pytest.raises(ValueError, match=field):
            cls(**{field: bad})
    with pytest.raises(ValueError, match="both 0"):
        D2LPMConfig(w_in=0, w_out=0)


def test_one_command_line_for_every_policys_settings() -> None:
    """A setting two policies share is one field, so flags built from all the configs are unique."""
    parser = argparse.ArgumentParser()
    seen: set[str] = set()
    for cls in ROUTER_POLICIES.values():
        fields = [f for f in cls.config_class.__dataclass_fields__ if f not in seen]
        add_flags(parser, cls.config_class, only=fields)
        seen |= set(fields)
    ns = parser.parse_args(["--router-quantum", "1000", "--cache-threshold", "0.5", "--max-tree-size", "4096",
                            "--eviction-interval-secs", "30", "--balance-abs-threshold", "8",
                            "--balance-rel-threshold", "2"])
    values = {name: getattr(ns, name) for name in seen}
    d2 = router_config("d2lpm", values)
    assert isinstance(d2, D2LPMConfig) and d2.router_quantum == 1000 and d2.cache_threshold == 0.5
    ca = router_config("cache_aware", values)
    assert isinstance(ca, CacheAwareConfig) and (ca.max_tree_size, ca.balance_abs_threshold) == (4096, 8)
    assert flag_values(D2LPMConfig, ns)["eviction_interval_secs"] == 30
    assert router_config("round-robin", values) == make_router_policy("round_robin").config
