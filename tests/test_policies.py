"""Scheduling policies: each order on hand-built queues, VTC's and DLPM's accounting, the prefix index
against brute-force matching, and fairness bounds over random multi-client workloads driven through
the real scheduler with the fake executor of test_scheduler.py."""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest
from fixtures.helpers import TrackingAllocator, fit
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from test_scheduler import FakeExecutor, Trace, check_complete, drive, prefix_hashes

from radixfair.bench.schedule_bench import BenchShape, time_decisions
from radixfair.cache.allocator import SlotAllocator
from radixfair.cache.radix_cache import RadixCache, TreeNode
from radixfair.cli import build_parser, engine_args
from radixfair.engine_args import EngineArgs
from radixfair.sampling_params import SamplingParams
from radixfair.sched.policies import POLICIES, PolicyConfig, SchedulePolicy, make_policy
from radixfair.sched.policies.dlpm import DLPMPolicy
from radixfair.sched.policies.meter import MeteredPolicy
from radixfair.sched.policies.vtc import VTCPolicy
from radixfair.sched.prefix_index import PrefixIndex
from radixfair.sched.request import Req
from radixfair.sched.scheduler import Scheduler, SchedulerConfig

_seq = itertools.count()


def mk(prompt: Sequence[int], max_new: int = 4, client: str = "a", rid: str | None = None, **kw: object) -> Req:
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    return Req(
        origin_input_ids=list(prompt),
        sampling_params=params,
        rid=rid or f"q{next(_seq)}",
        client_id=client,
        **kw,  # type: ignore[arg-type]
    )


def make_sched(policy: str | SchedulePolicy = "dlpm", config: PolicyConfig | None = None, **cfg: int) -> Scheduler:
    inner = make_policy(policy, config) if isinstance(policy, str) else policy
    config = SchedulerConfig(**cfg)  # type: ignore[arg-type]
    return Scheduler(config, MeteredPolicy(inner), allocator=TrackingAllocator(config.max_total_tokens))


def inner(s: Scheduler) -> SchedulePolicy:
    assert isinstance(s.policy, MeteredPolicy)
    return s.policy.inner


def cache(s: Scheduler, seq: Sequence[int], ex: FakeExecutor | None = None) -> None:
    """Put `seq` in the tree as if a finished request had left it there (and, for `ex`, its KV)."""
    slots = s.kv.allocator.alloc(len(seq))
    assert slots is not None
    dup = s.tree.insert(list(seq), slots)
    s.kv.allocator.free(slots[:dup])
    if ex is not None:
        held = s.tree.match_prefix(list(seq)).slots.tolist()
        ex.kv.update(zip(held, prefix_hashes(list(seq)), strict=True))


def order_of(s: Scheduler) -> list[str]:
    return [r.rid for r in s.policy.order(s.waiting)]


# ---- orders on hand-built queues ---------------------------------------------------------------

A = list(range(100, 140))  # 40 tokens
B = list(range(200, 220))  # 20 tokens


def test_policy_names_and_a_clear_error() -> None:
    assert list(POLICIES) == ["fcfs", "lpm", "dfs-weight", "vtc", "dlpm"]
    with pytest.raises(ValueError, match="choose from fcfs, lpm, dfs-weight, vtc, dlpm"):
        make_policy("sjf")


def test_fcfs_orders_by_arrival() -> None:
    s = make_sched("fcfs", max_total_tokens=500)
    cache(s, A)
    for rid, prompt in [("x", [1, 2]), ("y", [*A, 1]), ("z", [3])]:
        s.add_request(mk(prompt, rid=rid))
    assert order_of(s) == ["x", "y", "z"]


def test_lpm_orders_by_longest_match_then_arrival_and_follows_the_tree() -> None:
    s = make_sched("lpm", max_total_tokens=500)
    cache(s, A)
    cache(s, B)
    reqs = {
        "r1": [*A[:10], 1, 2],  # 10 cached
        "r2": [*B, 3],  # 20
        "r3": [*A, 4],  # 40
        "r4": [7, 8, 9],  # 0
        "r5": [*B, 5],  # 20, after r2
    }
    for rid, p in reqs.items():
        s.add_request(mk(p, rid=rid))
    assert order_of(s) == ["r3", "r2", "r5", "r1", "r4"]
    index = inner(s).index  # type: ignore[attr-defined]
    # a new branch extends r1's match; its last token is never matched (it must be computed)
    cache(s, [*A[:10], 1, 2, 99])
    assert index.matched_len(s.waiting[0]) == 11
    assert order_of(s) == ["r3", "r2", "r5", "r1", "r4"]
    cache(s, [7, 8, 9, 10, *range(300, 330)])
    assert index.matched_len(s.waiting[3]) == 2  # r4: its key is [7, 8]
    # evicting everything unlocked sends every match back to 0: pure arrival order
    s.tree.evict(10_000)
    assert order_of(s) == ["r1", "r2", "r3", "r4", "r5"]
    index.check()


def test_dfs_weight_walks_heavier_subtrees_first_deepest_requests_first() -> None:
    s = make_sched("dfs-weight", max_total_tokens=500)
    S = list(range(10, 20))
    X = list(range(30, 40))
    Y = list(range(50, 60))
    cache(s, S + X)
    cache(s, S + Y)  # S becomes a node with children X and Y
    arrivals = [
        ("none", [1, 2, 3]),
        ("s_part", [*S[:5], 1, 2]),  # ends inside S's edge
        ("y1", [*S, *Y, 1, 2]),
        ("x1", [*S, *X, 1, 2]),
        ("x_part", [*S, *X[:5], 3, 4]),  # ends inside X's edge
        ("x2", [*S, *X, 5, 6]),
        ("x3", [*S, *X, 7, 8]),
    ]
    for rid, p in arrivals:
        s.add_request(mk(p, rid=rid))
    # weights: X 4, Y 1, S 1 + 5, root 1 + 6. Post-order (as SGLang): X's subtree, whose full
    # matches precede the shorter one; then Y; then S's own; then the root's.
    assert order_of(s) == ["x1", "x2", "x3", "x_part", "y1", "s_part", "none"]
    # four more under Y make it the heavier branch
    for i in range(4):
        s.add_request(mk([*S, *Y, 9, i], rid=f"y{i + 2}"))
    assert order_of(s) == ["y1", "y2", "y3", "y4", "y5", "x1", "x2", "x3", "x_part", "s_part", "none"]


def test_vtc_serves_the_smallest_counter_and_re_decides_after_each_admission() -> None:
    p = VTCPolicy(PolicyConfig())
    a1, b1, a2, c1 = mk([1], client="a"), mk([2], client="b"), mk([3], client="a"), mk([4], client="c")
    for r in (a1, b1, a2, c1):
        p.on_arrival(r)
    p.counters.update(a=5.0, b=0.0, c=0.0)
    picks = iter(p.order([a1, b1, a2, c1]))
    assert next(picks) is b1  # b and c tie at 0: the older head request goes first
    p.on_admit(b1, 10, 0)  # b now at 10
    assert next(picks) is c1
    p.on_admit(c1, 3, 0)  # c at 3, and has nothing more
    assert next(picks) is a1  # a (5) is the smallest with waiting requests
    # a1 did not fit, so a is still the smallest: its next request
    assert next(picks) is a2
    assert next(picks, None) is None


def test_dlpm_order_is_lpm_restricted_to_clients_with_credit() -> None:
    s = make_sched("dlpm", PolicyConfig(dlpm_quantum=50), max_total_tokens=500)
    cache(s, A)
    s.add_request(mk([*A, 1], client="a", rid="a_hot"))
    s.add_request(mk([5, 6, 7], client="a", rid="a_cold"))
    s.add_request(mk([*A[:20], 1], client="b", rid="b_warm"))
    p = inner(s)
    assert isinstance(p, DLPMPolicy)
    assert order_of(s) == [] and p.refill(s.waiting)  # a new round: both get Q
    assert order_of(s) == ["a_hot", "b_warm", "a_cold"]
    p.deficits["a"] = 0.0
    assert order_of(s) == ["b_warm"]


# ---- accounting ----------------------------------------------------------------------------------


def test_vtc_counter_lift() -> None:
    p = VTCPolicy(PolicyConfig())
    a, b = mk([1], client="a"), mk([2], client="b")
    p.on_arrival(a)
    p.on_arrival(b)
    p.counters.update(a=100.0, b=50.0)
    c = mk([3], client="c")
    p.on_arrival(c)
    assert p.counters["c"] == 50.0, "lifted to the smallest counter among backlogged clients"
    p.counters["d"] = 400.0  # a client that used much more earlier keeps its counter
    p.on_arrival(mk([4], client="d"))
    assert p.counters["d"] == 400.0
    # a second request of an already backlogged client is not lifted again
    p.counters["c"] = 10.0
    p.on_arrival(mk([5], client="c"))
    assert p.counters["c"] == 10.0


def test_vtc_lift_from_the_last_departed_client_when_the_queue_is_empty() -> None:
    p = VTCPolicy(PolicyConfig())
    a, b = mk([1], client="a"), mk([2], client="b")
    p.on_arrival(a)
    p.on_arrival(b)
    p.on_dequeue(a)
    p.on_admit(a, 30, 0)
    p.on_dequeue(b)  # the queue is now empty; b left last
    p.on_admit(b, 70, 10)  # VTC charges cached tokens too: b at 80
    p.on_decode(b, 5)  # + 2 * 5
    assert p.counters == {"a": 30.0, "b": 90.0}
    p.on_arrival(mk([3], client="new"))
    assert p.counters["new"] == 90.0


def test_dlpm_refill_and_charging() -> None:
    p = DLPMPolicy(PolicyConfig(dlpm_quantum=100))
    a1, a2, b1 = mk([1], client="a"), mk([2], client="a"), mk([3], client="b")
    for r in (a1, a2, b1):
        p.on_arrival(r)
    assert not p.may_admit(a1) and not p.may_admit(b1), "a new client waits for the next round"
    assert p.refill([a1, a2, b1]) and p.deficits == {"a": 100.0, "b": 100.0} and p.rounds == 1
    p.on_admit(a1, 30, 500)  # cached tokens are free
    p.on_dequeue(a1)
    assert p.deficits["a"] == 70.0
    assert not p.refill([a2, b1]), "no new round while a backlogged client has credit"
    p.on_admit(a1, 80, 0)  # a later chunk
    p.on_decode(a1, 5)
    p.on_admit(b1, 350, 0)
    p.on_dequeue(b1)  # b now has only a running request: it gets no quantum
    assert p.deficits == {"a": -20.0, "b": -250.0}
    assert p.refill([a2]) and p.deficits == {"a": 80.0, "b": -250.0} and p.rounds == 2


def test_dlpm_refill_runs_as_many_rounds_as_needed_at_once() -> None:
    p = DLPMPolicy(PolicyConfig(dlpm_quantum=100, client_weights={"b": 2}))
    reqs = [mk([1], client="a"), mk([2], client="b")]
    for r in reqs:
        p.on_arrival(r)
    p.deficits.update(a=-1000.0, b=-1500.0)
    one_at_a_time = dict(p.deficits)
    rounds = 0
    while all(v <= 0 for v in one_at_a_time.values()):
        one_at_a_time["a"] += 100
        one_at_a_time["b"] += 200
        rounds += 1
    assert p.refill(reqs)
    assert p.deficits == one_at_a_time and p.rounds == rounds == 8


def test_dlpm_through_the_scheduler_charges_only_uncached_tokens() -> None:
    s = make_sched("dlpm", PolicyConfig(dlpm_quantum=1000), max_total_tokens=500)
    ex = FakeExecutor()
    cache(s, A, ex)
    r = mk([*A, 1, 2, 3], max_new=3, client="a")
    s.add_request(r)
    batch = s.schedule()
    assert batch is not None and r.cached_tokens == 40
    p = inner(s)
    assert isinstance(p, DLPMPolicy)
    assert p.deficits["a"] == 1000 - 3  # 3 uncached prompt tokens
    out = ex.run(batch)
    s.process_output(batch, out)
    assert p.deficits["a"] == 1000 - 3 - 2  # one output token at w_out = 2


@pytest.mark.parametrize("policy", ["dlpm", "vtc"])
def test_every_chunk_of_a_chunked_prompt_is_charged(policy: str) -> None:
    """A prompt prefilled in chunks is charged for each chunk as it is computed, so it costs what the
    same prompt costs in one piece."""
    s = make_sched(policy, max_total_tokens=1000, chunked_prefill_size=16)
    r = mk(list(range(100, 170)), max_new=3, client="a")
    drive(s, {0: [r]})
    assert isinstance(s.policy, MeteredPolicy)
    assert s.policy.service["a"] == 1.0 * 70 + 2.0 * 3


def test_weights_scale_the_quantum_and_the_counters() -> None:
    cfg = PolicyConfig(dlpm_quantum=10, client_weights={"alice": 2, "bob": 1})
    assert cfg.weight(mk([1], client="alice", weight=5.0)) == 2, "the configured weight wins"
    assert cfg.weight(mk([1], client="carol", weight=3.0)) == 3.0
    assert cfg.weight_of("carol") == 1.0
    d = DLPMPolicy(cfg)
    for u in ("alice", "bob"):
        d.on_arrival(mk([1], client=u))
    d.refill([])
    assert d.deficits == {"alice": 20.0, "bob": 10.0}
    v = VTCPolicy(cfg)
    reqs = [mk([1], client=u) for u in ("alice", "bob")]
    for r in reqs:
        v.on_arrival(r)
    for r in reqs:
        v.on_admit(r, 10, 0)
        v.on_decode(r, 1)
    assert v.counters == {"alice": 6.0, "bob": 12.0}
    with pytest.raises(ValueError, match="weight of client 'x'"):
        PolicyConfig(client_weights={"x": 0})
    with pytest.raises(ValueError, match="dlpm_quantum"):
        PolicyConfig(dlpm_quantum=0)


@pytest.mark.parametrize("policy", ["vtc", "dlpm"])
def test_weighted_clients_get_service_in_proportion(policy: str) -> None:
    rng = np.random.default_rng(1)
    s = make_sched(policy, PolicyConfig(dlpm_quantum=64, client_weights={"heavy": 2}),
                   max_total_tokens=256, max_running_requests=4, max_prefill_tokens=64, chunked_prefill_size=64)
    reqs = [mk(rng.integers(100, 300, 20).tolist(), 10, client=u) for u in ("heavy", "light") for _ in range(80)]
    raw: Counter[str] = Counter()  # unweighted service while both are backlogged
    last: dict[str, float] = {}

    def observe(s: Scheduler, step: int) -> None:
        assert isinstance(s.policy, MeteredPolicy)
        backlogged = {r.client_id for r in s.waiting}
        w = {"heavy": 2.0, "light": 1.0}
        if last and backlogged == {"heavy", "light"}:
            for u in w:
                raw[u] += (s.policy.service.get(u, 0.0) - last[u]) * w[u]
        last.update({u: s.policy.service.get(u, 0.0) for u in w})

    check_complete(drive(s, {0: reqs}, observe=observe))
    ratio = raw["heavy"] / raw["light"]
    assert 1.7 < ratio < 2.3, ratio


# ---- DLPM's idle rule ----------------------------------------------------------------------------


def test_dlpm_idle_client_keeps_its_debt_but_not_its_credit() -> None:
    p = DLPMPolicy(PolicyConfig(dlpm_quantum=100))
    r = mk([1], client="a")
    p.on_arrival(r)
    p.refill([r])
    p.on_dequeue(r)
    p.on_admit(r, 20, 0)
    p.on_decode(r, 1)
    assert p.deficits["a"] == 78.0
    p.on_finish(r)
    assert p.deficits["a"] == 0.0, "no credit carried through idle time"
    r2 = mk([2], client="a")
    p.on_arrival(r2)
    p.refill([r2])
    p.on_dequeue(r2)
    p.on_admit(r2, 300, 0)
    p.on_finish(r2)
    assert p.deficits["a"] == -200.0, "an overdraft is not forgiven by going idle"


def test_dlpm_idle_time_buys_no_burst_beyond_one_quantum() -> None:
    """A client with leftover credit goes idle while another stays busy for many rounds, then
    returns with a burst: before the second round after its return it gets at most Q + one request
    (so it had nothing banked)."""
    rng = np.random.default_rng(2)
    q = 100
    s = make_sched("dlpm", PolicyConfig(dlpm_quantum=q), max_total_tokens=400,
                   max_running_requests=4, max_prefill_tokens=64, chunked_prefill_size=64)
    p = inner(s)
    assert isinstance(p, DLPMPolicy)
    size = 21  # 20 uncached prompt tokens + 1 output token (w_out 2): 22 of service
    busy = [mk(rng.integers(100, 300, size).tolist(), 1, client="busy") for _ in range(150)]
    early = mk(rng.integers(100, 300, size).tolist(), 1, client="idle")  # leaves ~78 of credit
    burst = [mk(rng.integers(100, 300, size).tolist(), 1, client="idle") for _ in range(30)]
    samples: list[tuple[int, float]] = []  # (rounds, idle client's service) before each step
    credit_when_idle: list[float] = []

    def observe(s: Scheduler, step: int) -> None:
        assert isinstance(s.policy, MeteredPolicy)
        samples.append((p.rounds, s.policy.service.get("idle", 0.0)))
        if step == 40:
            credit_when_idle.append(p.deficits["idle"])

    drive(s, {0: [*busy, early], 40: burst}, observe=observe)
    assert credit_when_idle == [0.0], "went idle with credit: it was dropped"
    rounds_at_return, service_at_return = samples[40]
    second_round = rounds_at_return + 2
    got = max(w for r, w in samples if r < second_round) - service_at_return
    assert got <= q + 22 + 1e-9, got
    assert got > 0


# ---- starvation (sgl-project/sglang#31954) -------------------------------------------------------


def _hot_and_cold(policy: str) -> tuple[int | None, int]:
    """A hot client keeps sending requests that share a cached prefix, faster than they can be served;
    a cold client's requests share nothing with anything. Returns the step the cold client was first
    admitted at (None: never while the hot stream lasted) and the hot stream's length."""
    rng = np.random.default_rng(3)
    s = make_sched(policy, PolicyConfig(dlpm_quantum=64), max_total_tokens=2000,
                   max_running_requests=4, max_prefill_tokens=64, chunked_prefill_size=64)
    shared = rng.integers(100, 300, 100).tolist()
    ex = FakeExecutor()
    cache(s, shared, ex)
    steps = 120
    arrivals = {t: [mk([*shared, *rng.integers(100, 300, 4).tolist()], 6, client="hot") for _ in range(2)]
                for t in range(steps)}
    arrivals[0] += [mk([*shared, *rng.integers(100, 300, 4).tolist()], 6, client="hot") for _ in range(8)]
    cold = [mk(rng.integers(300, 400, 30).tolist(), 6, client="cold") for _ in range(3)]
    arrivals[0] += cold
    first: list[int] = []

    def observe(s: Scheduler, step: int) -> None:
        if not first and any(r.admitted_once for r in cold):
            first.append(step)

    check_complete(drive(s, arrivals, observe=observe, ex=ex))
    return (first[0] if first and first[0] < steps else None), steps


def test_lpm_starves_a_cache_cold_client_and_dlpm_does_not() -> None:
    lpm_first, _ = _hot_and_cold("lpm")
    assert lpm_first is None, "LPM admits cold requests only once the hot stream stops"
    dlpm_first, _ = _hot_and_cold("dlpm")
    assert dlpm_first is not None and dlpm_first <= 10, dlpm_first


# ---- the prefix index against brute force ------------------------------------------------------

op = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 2**16)),
    st.tuples(st.just("match"), st.integers(0, 2**16)),
    st.tuples(st.just("evict"), st.integers(1, 60)),
    st.tuples(st.just("add"), st.integers(0, 2**16)),
    st.tuples(st.just("remove"), st.integers(0, 2**16)),
    st.tuples(st.just("lock"), st.integers(0, 2**16)),
    st.tuples(st.just("reset"), st.integers(0, 0)),
    st.tuples(st.just("match_at"), st.integers(0, 2**16)),
)


def lru_order_from_scratch(tree: RadixCache, n: int) -> list[int]:
    """The node ids `evict(n)` must take, by heapifying every candidate now (what evict did before it
    kept its heap between calls)."""
    heap = [(x.last_access_time, x.node_id, x) for x in tree._evictable_leaves]
    heapq.heapify(heap)
    kids = {}
    out: list[int] = []
    freed = 0
    while freed < n and heap:
        _, node_id, x = heapq.heappop(heap)
        out.append(node_id)
        freed += len(x.key)
        parent = x.parent
        assert parent is not None
        kids[parent] = kids.get(parent, len(parent.children)) - 1
        if parent is not tree.root_node and kids[parent] == 0 and parent.lock_ref == 0:
            heapq.heappush(heap, (parent.last_access_time, parent.node_id, parent))
    return out


class EvictionLog:
    def __init__(self) -> None:
        self.ids: list[int] = []

    def on_split(self, upper: object, lower: object) -> None:
        pass

    def on_add_leaf(self, parent: object, leaf: object) -> None:
        pass

    def on_evict(self, node: TreeNode, parent: TreeNode) -> None:
        self.ids.append(node.node_id)

    def on_reset(self) -> None:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=60))
def test_prefix_index_matches_brute_force_through_inserts_splits_evictions(ops: list[tuple[str, int]]) -> None:
    """Also: eviction with its kept heap takes exactly what a fresh heap would, and matching from an
    index anchor (`match_at`) gives what `match_prefix` gives."""
    allocator = SlotAllocator(400)
    tree = RadixCache(allocator)
    index = PrefixIndex()
    index.bind(tree)
    log = EvictionLog()
    tree.add_listener(log)
    stems = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 9, 9], [4, 4, 4, 4, 4, 4]]
    locked: list[object] = []

    def seq(seed: int) -> list[int]:
        r = np.random.default_rng(seed)
        stem = stems[seed % 3][: int(r.integers(0, 9))]
        return stem + r.integers(1, 4, int(r.integers(0, 8))).tolist()

    for kind, arg in ops:
        if kind == "insert" and (key := seq(arg)):
            slots = allocator.alloc(len(key)) if allocator.available() >= len(key) else None
            if slots is None:
                tree.evict(len(key))
                slots = allocator.alloc(len(key))
            if slots is not None:
                allocator.free(slots[: tree.insert(key, slots)])
        elif kind == "match":
            m = tree.match_prefix(seq(arg))  # splits where the match ends inside an edge
            if arg % 4 == 0 and m.last_node is not tree.root_node:
                tree.inc_lock_ref(m.last_node)
                locked.append(m.last_node)
        elif kind == "lock" and locked:
            tree.dec_lock_ref(locked.pop(arg % len(locked)))  # type: ignore[arg-type]
        elif kind == "evict":
            expected = lru_order_from_scratch(tree, arg)
            log.ids.clear()
            tree.evict(arg)
            assert log.ids == expected, "the kept heap must evict exactly what a fresh one would"
        elif kind == "add":
            r = mk([*seq(arg), arg % 5], 2)
            if arg % 3 == 0:
                r.output_ids = [1, 2]  # a retracted request: its key includes the output so far
            if arg % 7 == 0:
                r.return_logprob, r.logprob_start_len = True, 3  # prompt logprobs cap the match
            index.add(r)
        elif kind == "remove" and len(index):
            index.remove(index.ordered()[arg % len(index)])
        elif kind == "reset" and not locked:
            tree.reset()
        elif kind == "match_at" and len(index):
            # what the scheduler does on admission: match from the index's anchor, no re-walk
            r = index.ordered()[arg % len(index)]
            anchor = index.anchor(r, tree)
            assert anchor is not None
            got = tree.match_prefix_at(*anchor)
            want = tree.match_prefix(r.fill_ids[: r.max_prefix_len()])  # after got's split: no new one
            assert got.last_node is want.last_node
            assert got.slots.tolist() == want.slots.tolist()
        index.check()
        for r in index.ordered():
            brute = tree.peek(tuple(r.fill_ids[: r.max_prefix_len()])).length
            assert index.matched_len(r) == brute
        lens = [index.matched_len(r) for r in index.ordered()]
        assert lens == sorted(lens, reverse=True)


# ---- fairness and exactly-once over random workloads ---------------------------------------------

Spec = tuple[int, int, int, int, int, int]
client_spec = st.lists(
    st.tuples(
        st.integers(0, 2),  # which of the client's prefixes (2: none)
        st.integers(0, 30),  # how much of it
        st.integers(1, 20),  # own tail
        st.integers(0, 16),  # max_new_tokens
        st.integers(0, 3),  # arrival: 0 = at the start, else a later step
        st.integers(0, 9),  # 0: the client aborts it at some point
    ),
    min_size=6,
    max_size=24,
)


def run_fair(
    policy: str, clients: list[list[Spec]], pool: int, chunk: int,
    max_running: int, quantum: int, weighted: bool, seed: int,
) -> tuple[float, float, Trace, set[str]]:
    """Drive a multi-client workload; returns (largest weighted service difference between two clients
    over an interval where both stayed backlogged, the bound it must respect, the trace, the rids the
    client aborted)."""
    rng = np.random.default_rng(seed)
    weights = {f"c{i}": (float(1 + i % 3) if weighted else 1.0) for i in range(len(clients))}
    cfg = PolicyConfig(dlpm_quantum=quantum, client_weights=weights)
    s = make_sched(policy, cfg, max_total_tokens=pool, chunked_prefill_size=chunk,
                   max_running_requests=max_running, max_prefill_tokens=64)
    arrivals: dict[int, list[Req]] = {}
    aborts: dict[int, list[str]] = {}
    max_input = 0
    for i, specs in enumerate(clients):
        prefixes = [rng.integers(100, 300, 30).tolist() for _ in range(2)]
        for which, plen, tail, max_new, late, abort in specs:
            prompt = (prefixes[which][:plen] if which < 2 else []) + rng.integers(100, 300, tail).tolist()
            r = mk(prompt, max_new, client=f"c{i}")
            try:
                fit(r, s.config)
            except ValueError:
                continue
            max_input = max(max_input, len(prompt))
            at = 0 if late == 0 else int(rng.integers(1, 60))
            arrivals.setdefault(at, []).append(r)
            if abort == 0:
                aborts.setdefault(at + int(rng.integers(0, 30)), []).append(r.rid)
    assert isinstance(s.policy, MeteredPolicy)
    service = s.policy.service
    points: list[tuple[dict[str, float], set[str]]] = []

    def observe(s: Scheduler, step: int) -> None:
        points.append((dict(service), {r.client_id for r in s.waiting}))

    trace = drive(s, arrivals, aborts, observe=observe)
    worst = 0.0
    names = sorted(weights)
    for f, g in itertools.combinations(names, 2):
        lo = hi = None
        for k, (w, backlogged) in enumerate(points):
            d = w.get(f, 0.0) - w.get(g, 0.0)
            if lo is not None and hi is not None:
                worst = max(worst, d - lo, hi - d)
                lo, hi = min(lo, d), max(hi, d)
            both = {f, g} <= backlogged
            if both and lo is None:
                lo = hi = d  # a backlogged interval starts: service from here on counts
            elif not both and k + 1 < len(points):
                lo = hi = None
    cost = PolicyConfig()
    u = max(cost.w_in * max_input, cost.w_out * pool) / min(weights.values())
    bound = 2 * u if policy == "vtc" else 2 * (u + quantum)
    return worst, bound, trace, {rid for rids in aborts.values() for rid in rids}


FAIR = dict(
    clients=st.lists(client_spec, min_size=2, max_size=4),
    pool=st.integers(64, 160),
    chunk=st.sampled_from([0, 16, 64]),
    max_running=st.integers(1, 6),
    quantum=st.sampled_from([16, 64, 256]),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)


@pytest.mark.parametrize("policy", ["vtc", "dlpm"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**FAIR)
def test_backlogged_clients_service_difference_is_bounded(
    policy: str, clients: list[list[Spec]], pool: int, chunk: int,
    max_running: int, quantum: int, weighted: bool, seed: int,
) -> None:
    """VTC: within 2U; DLPM: within 2(U + Q) (per unit of weight), over every interval in which both
    clients stayed backlogged; and every request admitted and finished exactly once, exactly."""
    worst, bound, trace, aborted = run_fair(policy, clients, pool, chunk, max_running, quantum, weighted, seed)
    note(f"worst difference {worst:.0f}, bound {bound:.0f}")
    assert worst <= bound + 1e-6, (worst, bound)
    check_complete(trace, aborted)


@pytest.mark.parametrize("policy", ["fcfs", "lpm", "dfs-weight"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**FAIR)
def test_other_policies_lose_and_duplicate_nothing(
    policy: str, clients: list[list[Spec]], pool: int, chunk: int,
    max_running: int, quantum: int, weighted: bool, seed: int,
) -> None:
    _, _, trace, aborted = run_fair(policy, clients, pool, chunk, max_running, quantum, weighted, seed)
    check_complete(trace, aborted)


def test_the_bound_is_not_vacuous_fcfs_breaks_it_under_a_flood() -> None:
    """S1: one client sends many more requests first. FCFS serves the flood while the other client
    waits, so their service difference far exceeds 2U; VTC and DLPM stay within their bounds."""
    flood = [(2, 0, 20, 10, 0, 1)] * 60
    modest = [(2, 0, 20, 10, 0, 1)] * 20
    worst, bound, _, _ = run_fair("fcfs", [flood, modest], 96, 64, 4, 64, False, 0)
    assert worst > bound, (worst, bound)
    for policy in ("vtc", "dlpm"):
        worst, bound, _, _ = run_fair(policy, [flood, modest], 96, 64, 4, 64, False, 0)
        assert worst <= bound, (policy, worst, bound)


# ---- wiring --------------------------------------------------------------------------------------


def test_cli_flags_reach_the_engine_arguments() -> None:
    ns = build_parser().parse_args(
        ["generate", "hi", "--schedule-policy", "vtc", "--w-in", "0.5", "--w-out", "3",
         "--dlpm-quantum", "1024", "--client-weights", "alice=2, bob=1.5"]
    )
    args = engine_args(ns)
    assert (args.schedule_policy, args.w_in, args.w_out, args.dlpm_quantum) == ("vtc", 0.5, 3.0, 1024.0)
    assert args.client_weights == {"alice": 2.0, "bob": 1.5}
    assert args.policy_config() == PolicyConfig(0.5, 3.0, 1024.0, {"alice": 2.0, "bob": 1.5})
    # every flag's default is the engine's own
    assert engine_args(build_parser().parse_args(["generate", "hi"])) == EngineArgs()
    for bad in (["--client-weights", "alice"], ["--client-weights", "alice=0"], ["--schedule-policy", "sjf"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["generate", "hi", *bad])


def test_engine_arguments_build_the_scheduler_and_policy_configs() -> None:
    # one source of defaults: the engine's are the scheduler's and the policy's own
    assert EngineArgs().policy_config() == PolicyConfig()
    assert EngineArgs().scheduler_config(1000, 2048) == SchedulerConfig(max_total_tokens=1000, max_context_len=2048)
    args = EngineArgs(max_running_requests=8, max_prefill_tokens=512, chunked_prefill_size=-1,
                      disable_radix_cache=True, client_weights={"a": 3.0})
    cfg = args.scheduler_config(4096, 1024)
    assert (cfg.max_running_requests, cfg.max_prefill_tokens, cfg.chunked_prefill_size, cfg.disable_radix_cache,
            cfg.max_total_tokens, cfg.max_context_len) == (8, 512, -1, True, 4096, 1024)
    assert args.policy_config().weight_of("a") == 3.0
    assert args.policy_config().row_share and not EngineArgs(disable_row_share=True).policy_config().row_share


def test_engine_rejects_a_bad_policy_before_loading_a_model() -> None:
    from radixfair.engine.engine import Engine, EngineArgs

    assert EngineArgs().schedule_policy == "dlpm"
    with pytest.raises(ValueError, match="unknown schedule policy 'sjf'"):
        Engine(model="/nonexistent", schedule_policy="sjf")
    with pytest.raises(ValueError, match="w_out"):
        Engine(model="/nonexistent", w_out=-1.0)


def test_decision_benchmark_runs_small() -> None:
    shape = BenchShape(clients=10, docs_per_client=1, doc_len=100, past_questions=2, waiting=200, pool=8192)
    for policy in ("lpm", "dlpm"):
        r = time_decisions(policy, shape, steps=3)
        assert r["admitted_per_step"] > 0 and math.isfinite(r["decision_ms_median"])
