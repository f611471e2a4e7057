"""Fair policies under adversarial clients: who is retracted when the KV pool runs out, and per-client
state that stays bounded (`max_clients`) without ever forgiving what a client owes."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.helpers import TrackingAllocator
from test_scheduler import check_complete, drive, req, tokens

from radixfair.sched.policies import PolicyConfig, make_policy
from radixfair.sched.policies.base import OVERFLOW_CLIENT
from radixfair.sched.policies.dlpm import DLPMPolicy
from radixfair.sched.policies.vtc import VTCPolicy
from radixfair.sched.request import Req
from radixfair.sched.scheduler import Scheduler, SchedulerConfig


def client_req(client: str, prompt: list[int], max_new: int, rid: str) -> Req:
    r = req(prompt, max_new, rid=rid)
    r.client_id = client
    return r


def first_victim(policy: str) -> Req:
    """A hog with two requests, decoding long before a newcomer arrives; the pool then runs out."""
    rng = np.random.default_rng(21)
    # no decode reserve: the newcomer is admitted while there is room, and the pool runs out later
    config = SchedulerConfig(max_total_tokens=200, chunked_prefill_size=0, init_new_token_ratio=0.0,
                             min_new_token_ratio=0.0)
    s = Scheduler(config, make_policy(policy, PolicyConfig(dlpm_quantum=64)),
                  allocator=TrackingAllocator(config.max_total_tokens))
    hog = [client_req("hog", tokens(rng, 20), 70, f"hog{i}") for i in range(2)]
    meek = client_req("meek", tokens(rng, 20), 70, "meek0")
    victims: list[Req] = []

    def observe(sched: Scheduler, step: int) -> None:
        for r in (*hog, meek):
            if r.num_retractions and r not in victims:
                victims.append(r)

    trace = drive(s, {0: hog, 30: [meek]}, observe=observe)
    check_complete(trace)
    assert victims, "the pool never ran out: test too weak"
    return victims[0]


def test_retraction_takes_the_newest_request_by_default() -> None:
    assert first_victim("fcfs").rid == "meek0"


@pytest.mark.parametrize("policy", ["dlpm", "vtc"])
def test_a_fair_policy_retracts_from_the_client_furthest_over_its_share(policy: str) -> None:
    victim = first_victim(policy)
    assert victim.client_id == "hog" and victim.rid == "hog1"  # the hog's newest


def new_req(client: str, rid: str, n: int = 4) -> Req:
    r = req(list(range(1, n + 1)), 2, rid=rid)
    r.client_id = client
    return r


def test_dlpm_forgets_idle_clients_that_owe_nothing_and_keeps_debts() -> None:
    p = DLPMPolicy(PolicyConfig(dlpm_quantum=100, max_clients=3))
    for u in ("a", "b", "c"):
        r = new_req(p.client_for(u), f"{u}1")
        p.on_arrival(r)
        p.on_dequeue(r)
        p.on_admit(r, 4, 0)
        if u == "b":
            p.on_decode(r, 300)  # b ends in debt
        p.on_finish(r)
    assert p.deficits == {"a": -4.0, "b": -604.0, "c": -4.0}
    p.deficits["a"] = 0.0  # a has paid its debt off
    assert p.client_for("d") == "d", "a, idle at d = 0, makes room"
    assert "a" not in p.deficits and p.deficits["b"] == -604.0 and p.deficits["c"] == -4.0
    p.on_arrival(new_req("d", "d1"))
    # b and c are idle but owe: never forgotten, so new clients share the overflow client
    assert p.client_for("e") == OVERFLOW_CLIENT
    assert p.deficits["b"] == -604.0 and p.deficits["c"] == -4.0
    assert p.client_for("b") == "b", "a known client keeps its own state"
    assert len(p.deficits) <= 3


def test_vtc_forgets_only_counters_at_or_below_the_floor() -> None:
    p = VTCPolicy(PolicyConfig(max_clients=3))
    reqs = {}
    for u in ("low", "high", "busy"):
        r = new_req(p.client_for(u), f"{u}1")
        p.on_arrival(r)
        reqs[u] = r
    p.counters.update(low=5.0, high=500.0, busy=50.0)
    for u in ("low", "high"):
        p.on_dequeue(reqs[u])
        p.on_finish(reqs[u])
    # busy still waits at 50: the floor a rejoining client is lifted to
    assert p.client_for("new") == "new"
    assert "low" not in p.counters and p.counters["high"] == 500.0 and p.counters["busy"] == 50.0
    # rejoining after being forgotten lands where it would have anyway: the floor
    back = new_req(p.client_for("low"), "low2")
    p.on_arrival(back)
    assert p.counters["low"] == 50.0


def test_vtc_keeps_the_last_departed_clients_counter_when_forgetting_it() -> None:
    p = VTCPolicy(PolicyConfig(max_clients=1))
    r = new_req("a", "a1")
    p.on_arrival(r)
    p.counters["a"] = 80.0
    p.on_dequeue(r)
    p.on_finish(r)
    assert p.client_for("b") == "b"  # a is at the floor (its own counter): forgotten
    assert "a" not in p.counters
    rb = new_req("b", "b1")
    p.on_arrival(rb)
    assert p.counters["b"] == 80.0, "lifted to the last departed client's counter even though it is forgotten"


def test_state_stays_bounded_under_a_sybil_flood() -> None:
    """10,000 one-request client ids through the real scheduler: policy state stays within the bound
    and every request is served."""
    for name in ("dlpm", "vtc"):
        config = SchedulerConfig(max_total_tokens=4096)
        s = Scheduler(config, make_policy(name, PolicyConfig(max_clients=50)))
        rng = np.random.default_rng(3)
        arrivals = {}
        for step in range(200):
            arrivals[step] = [client_req(f"sybil{step}-{k}", tokens(rng, 4), 2, f"r{step}-{k}") for k in range(5)]
        trace = drive(s, arrivals)
        assert sum(trace.finished.values()) == 1000
        table = s.policy.deficits if name == "dlpm" else s.policy.counters  # type: ignore[attr-defined]
        assert len(table) <= 51, (name, len(table))


@pytest.mark.parametrize("row_share", [True, False])
@pytest.mark.parametrize("policy", ["dlpm", "vtc"])
def test_a_client_gets_its_share_of_the_batch_rows_while_others_are_active(policy: str, row_share: bool) -> None:
    """One client's 40 requests (an `n: 40`) cannot hold more than its share of the running batch's
    rows while another client under its share waits for one; rows nobody else asks for it may use.
    With `row_share=False` (`--disable-row-share`) nothing stops it."""
    rng = np.random.default_rng(5)
    config = SchedulerConfig(max_total_tokens=8192, max_running_requests=8)
    s = Scheduler(config, make_policy(policy, PolicyConfig(row_share=row_share)),
                  allocator=TrackingAllocator(config.max_total_tokens))
    hog = [client_req("hog", tokens(rng, 8), 30, f"hog{i}") for i in range(40)]
    meek = [client_req("meek", tokens(rng, 8), 30, f"meek{i}") for i in range(6)]
    most: dict[str, int] = {"grabbed while meek waited": 0, "meek running": 0, "alone": 0}
    prev = {"hog": 0, "meek waited": False}

    def observe(sched: Scheduler, step: int) -> None:
        hog_rows = sum(r.client_id == "hog" for r in sched.running)
        meek_rows = sum(r.client_id == "meek" for r in sched.running)
        if prev["meek waited"] and hog_rows > max(prev["hog"], 4):
            # a batch formed while meek waited below its share gave hog a row beyond its own share
            most["grabbed while meek waited"] = max(most["grabbed while meek waited"], hog_rows)
        if any(not r.finished for r in meek):
            if meek_rows:
                most["meek running"] = max(most["meek running"], hog_rows)
        else:
            most["alone"] = max(most["alone"], hog_rows)
        prev["hog"] = hog_rows
        prev["meek waited"] = any(r.client_id == "meek" for r in sched.waiting) and meek_rows < 4

    # meek's last three arrive once hog holds every row (no preemption: meek waits for hog's rows to
    # free, and hog may not take them back meanwhile)
    trace = drive(s, {0: hog[:20] + meek[:3], 1: hog[20:], 40: meek[3:]}, observe=observe)
    check_complete(trace)
    if not row_share:
        assert most["grabbed while meek waited"] > 4, most
        return
    assert most["grabbed while meek waited"] == 0, most
    assert most["meek running"] >= 5, most  # work-conserving: the rows meek did not ask for
    assert most["alone"] == 8, most
