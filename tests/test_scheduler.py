"""The pure scheduler (no model): a fake executor with deterministic tokens and a shadow KV pool.

The fake executor checks, for every request of every batch, that each KV slot the request attends to
holds exactly the KV of that request's own prefix (a hash of the tokens up to that position): that is
what makes radix-cache sharing, chunking and retraction correct, whatever the scheduler decides.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from fixtures.helpers import TrackingAllocator, fit
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from radixfair.sampling_params import SamplingParams
from radixfair.sched.batch import BatchMode, BatchOutput, ScheduledBatch
from radixfair.sched.policies import make_policy
from radixfair.sched.request import Req
from radixfair.sched.scheduler import Scheduler, SchedulerConfig, fit_max_new_tokens


def next_token(position: int) -> int:
    """The fake model: the token sampled at `position` (deterministic, never an eos)."""
    return (position * 7) % 50 + 3


def expected_output(prompt_len: int, max_new: int) -> list[int]:
    return [next_token(prompt_len + j) for j in range(max_new)]


def make_scheduler(**cfg: object) -> Scheduler:
    config = SchedulerConfig(**cfg)  # type: ignore[arg-type]
    return Scheduler(config, make_policy("fcfs"), allocator=TrackingAllocator(config.max_total_tokens))


def req(prompt: list[int], max_new: int, rid: str | None = None, **sp: object) -> Req:
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True, **sp)  # type: ignore[arg-type]
    if rid is None:
        return Req(origin_input_ids=list(prompt), sampling_params=params)
    return Req(origin_input_ids=list(prompt), sampling_params=params, rid=rid)


def prefix_hashes(tokens: list[int]) -> list[int]:
    out, h = [], 0
    for t in tokens:
        h = hash((h, t))
        out.append(h)
    return out


@dataclass
class Trace:
    finished: Counter[str] = field(default_factory=Counter)
    starts: Counter[str] = field(default_factory=Counter)  # admissions from the waiting queue
    batches: list[tuple[BatchMode, list[str], list[int], list[int]]] = field(default_factory=list)
    max_running: int = 0
    reqs: dict[str, Req] = field(default_factory=dict)


class FakeExecutor:
    """Runs batches on a shadow KV pool: kv[slot] = hash of the sequence prefix it was computed for.

    It keeps a req_to_token table the way ModelRunner does (row updates first; a prefill writes its row
    from position 0 and attends through row_slots; a decode step writes only its new position and attends
    through the table), so a row that falls out of sync with req.slots is caught too.
    """

    def __init__(self) -> None:
        self.kv: dict[int, int] = {}
        self.table: dict[int, dict[int, int]] = {}

    def run(self, batch: ScheduledBatch) -> BatchOutput:
        for row_id, row_slots in batch.row_updates:
            self.table.setdefault(int(row_id), {}).update((p, int(x)) for p, x in enumerate(row_slots))
        tokens: list[int] = []
        flat = 0
        for i, r in enumerate(batch.reqs):
            fill = r.fill_ids
            hashes = prefix_hashes(fill)
            start, n = int(batch.prefix_lens[i]), int(batch.extend_lens[i])
            row = self.table.setdefault(int(batch.rows[i]), {})
            if i < batch.prefill_count:
                assert len(batch.row_slots[i]) >= start + n
                slots = [int(x) for x in batch.row_slots[i][: start + n]]
                row.update(enumerate(slots))
            else:
                assert n == 1 and start == len(fill) - 1, "decode feeds the last token"
                row[start] = int(batch.out_slots[flat])
                slots = [row.get(p, -1) for p in range(start + 1)]
                stale = [p for p in range(start + 1) if slots[p] != int(r.slots[p])]
                assert not stale, f"{r.rid}: the executor's req_to_token row is stale at positions {stale}"
            assert batch.input_ids[flat : flat + n].tolist() == fill[start : start + n]
            assert batch.positions[flat : flat + n].tolist() == list(range(start, start + n))
            assert batch.out_slots[flat : flat + n].tolist() == slots[start : start + n]
            flat += n
            for p in range(start):
                assert self.kv.get(slots[p]) == hashes[p], (
                    f"{r.rid}: slot {slots[p]} at position {p} holds another sequence's KV"
                )
            for p in range(start, start + n):
                self.kv[slots[p]] = hashes[p]
            tokens.append(next_token(start + n) if batch.sample[i] else -1)
        assert flat == batch.num_tokens
        return BatchOutput(next_token_ids=tokens)


def conservation(s: Scheduler, holders: list[Req]) -> None:
    """Every slot is free, in the tree, or privately held by exactly one request."""
    uniq = list({id(r): r for r in holders}.values())
    private = sum(r.kv_len - r.prefix_len for r in uniq)
    total = s.kv.allocator.available() + s.tree.evictable_size() + s.tree.protected_size() + private
    assert total == s.config.max_total_tokens, (
        f"free {s.kv.allocator.available()} + tree {s.tree.evictable_size()}+{s.tree.protected_size()} "
        f"+ private {private} != {s.config.max_total_tokens}"
    )
    held = [int(x) for r in uniq for x in r.slots[r.prefix_len :]]
    assert len(held) == len(set(held)), "a slot is privately held twice"
    for r in s.waiting:
        assert r.kv_len == 0 and r.row == -1, "a waiting request holds KV"
    rows = [r.row for r in uniq if r.row >= 0]
    assert len(rows) == len(set(rows)), "two requests share a req_to_token row"


def idle_invariant(s: Scheduler) -> None:
    assert s.is_idle()
    free, ev, prot = s.check_invariant()
    s.tree.check_invariant()
    assert prot == 0
    assert free + ev == s.config.max_total_tokens
    if s.config.disable_radix_cache:
        assert free == s.config.max_total_tokens


def drive(
    s: Scheduler,
    arrivals: dict[int, list[Req]],
    aborts: dict[int, list[str]] | None = None,
    max_steps: int = 20_000,
    ex: FakeExecutor | None = None,
    observe: Callable[[Scheduler, int], None] | None = None,
) -> Trace:
    """Run the scheduler loop to completion, checking what can be checked at every step.
    `observe(s, step)` sees the state before each step's batch is formed, and once at the end."""
    ex = ex or FakeExecutor()
    trace = Trace()
    aborts = aborts or {}
    last_arrival = max(arrivals, default=0)
    step = 0
    while step <= last_arrival or not s.is_idle():
        assert step < max_steps, f"no progress: {len(s.waiting)} waiting, {len(s.running)} running"
        for r in arrivals.get(step, []):
            trace.reqs[r.rid] = r
            s.add_request(r)
        for rid in aborts.get(step, []):
            s.abort(rid)
        if observe is not None:
            observe(s, step)
        waiting_before = {id(r) for r in s.waiting}
        running_before = {id(r) for r in s.running}
        batch = s.schedule()
        for r in s.pop_dropped():
            assert r.finished
            trace.finished[r.rid] += 1
        step += 1
        if batch is None:
            assert not s.running, "running requests but no batch"
            continue
        rids = [r.rid for r in batch.reqs]
        assert len(set(rids)) == len(rids), "a request twice in one batch"
        n_prefill = batch.prefill_count
        for r in batch.reqs[:n_prefill]:
            assert id(r) not in running_before, f"{r.rid} prefilled while running"
            if id(r) in waiting_before:
                trace.starts[r.rid] += 1
                assert r not in s.waiting
        if batch.mode is BatchMode.MIXED:
            assert s.config.enable_mixed_chunk and 0 < n_prefill < len(batch.reqs)
        if batch.mode is not BatchMode.PREFILL:
            in_batch = {id(r) for r in batch.reqs[n_prefill:]}
            assert in_batch <= running_before
            assert in_batch == {id(r) for r in s.running}, "a decode step runs every running request"
            for r in trace.reqs.values():  # left out: retracted to the queue, or dropped
                if id(r) in running_before - in_batch:
                    assert r in s.waiting or r.finished
        trace.batches.append((batch.mode, rids, batch.extend_lens.tolist(), batch.prefix_lens.tolist()))
        holders = [*s.running, *batch.reqs, *([s.chunked_req] if s.chunked_req else [])]
        conservation(s, holders)
        out = ex.run(batch)
        for r in s.process_output(batch, out):
            assert r.finished
            trace.finished[r.rid] += 1
        trace.max_running = max(trace.max_running, len(s.running))
        conservation(s, [*s.running, *([s.chunked_req] if s.chunked_req else [])])
    if observe is not None:
        observe(s, step)
    idle_invariant(s)
    return trace


def check_complete(trace: Trace, aborted: frozenset[str] | set[str] = frozenset()) -> None:
    for rid, r in trace.reqs.items():
        assert trace.finished[rid] == 1, f"{rid} finished {trace.finished[rid]} times"
        if rid in aborted:
            continue
        assert trace.starts[rid] == 1 + r.num_retractions, f"{rid} admitted {trace.starts[rid]} times"
        n = r.sampling_params.max_new_tokens
        assert r.finish_reason is not None and r.finish_reason.type == "length", r.finish_reason
        assert r.output_ids == expected_output(len(r.origin_input_ids), n), rid


def tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(100, 300, n).tolist()


# ---------------------------------------------------------------------------------------------------


def test_every_request_finishes_exactly_once_with_exact_outputs() -> None:
    rng = np.random.default_rng(0)
    s = make_scheduler(max_total_tokens=4096)
    arrivals = {
        0: [req(tokens(rng, n), m) for n, m in [(5, 3), (40, 9), (1, 1), (17, 12)]],
        3: [req(tokens(rng, 33), 7)],
        7: [req(tokens(rng, 2), 20), req(tokens(rng, 64), 4)],
    }
    trace = drive(s, arrivals)
    check_complete(trace)
    assert sum(s.num_retractions for s in trace.reqs.values()) == 0
    assert s.num_requests() == 0


def test_second_turn_reuses_the_first_turns_prompt_and_output() -> None:
    rng = np.random.default_rng(1)
    s = make_scheduler(max_total_tokens=4096)
    ex = FakeExecutor()
    first = req(tokens(rng, 50), 10)
    drive(s, {0: [first]}, ex=ex)
    follow = req(first.origin_input_ids + first.output_ids + tokens(rng, 5), 3)
    drive(s, {0: [follow]}, ex=ex)
    # the last output token was sampled but never fed back, so its KV does not exist
    assert follow.cached_tokens == 59
    assert s.stats().cached_tokens == 59


def test_in_batch_prefix_sharing_prefills_the_shared_prefix_once() -> None:
    rng = np.random.default_rng(2)
    s = make_scheduler(max_total_tokens=4096)
    shared = tokens(rng, 200)
    group = [req(shared + tokens(rng, 10), 4, rid=f"g{i}") for i in range(4)]
    trace = drive(s, {0: group})
    check_complete(trace)
    first_prefill = trace.batches[0]
    assert first_prefill[0] is BatchMode.PREFILL
    assert first_prefill[1] == ["g0"], "the others wait a batch to reuse the prefix"
    for r in group[1:]:
        assert r.cached_tokens >= 200, (r.rid, r.cached_tokens)
    assert s.stats().prefill_tokens == 210 + 3 * 10
    assert s.stats().cached_tokens == 3 * 200


def test_in_batch_sharing_still_admits_unrelated_requests() -> None:
    rng = np.random.default_rng(3)
    s = make_scheduler(max_total_tokens=4096)
    shared = tokens(rng, 100)
    reqs = [req([*shared, 5], 2, rid="a"), req([*shared, 6], 2, rid="b"), req(tokens(rng, 30), 2, rid="c")]
    trace = drive(s, {0: reqs})
    check_complete(trace)
    assert trace.batches[0][1] == ["a", "c"]
    assert reqs[1].cached_tokens == 100


def test_disable_radix_cache_never_reuses() -> None:
    rng = np.random.default_rng(4)
    s = make_scheduler(max_total_tokens=4096, disable_radix_cache=True)
    shared = tokens(rng, 100)
    group = [req(shared + tokens(rng, 5), 3) for _ in range(3)]
    trace = drive(s, {0: group[:2], 5: group[2:]})
    check_complete(trace)
    assert all(r.cached_tokens == 0 for r in group)
    assert s.stats().prefill_tokens == 3 * 105
    assert trace.batches[0][1] == [group[0].rid, group[1].rid], "no in-batch deferral without the cache"


@pytest.mark.parametrize("disable", [False, True])
def test_chunked_prefill_of_one_long_prompt(disable: bool) -> None:
    rng = np.random.default_rng(5)
    s = make_scheduler(max_total_tokens=4096, chunked_prefill_size=16, disable_radix_cache=disable)
    long = req(tokens(rng, 100), 5)
    trace = drive(s, {0: [long]})
    check_complete(trace)
    prefills = [b for b in trace.batches if b[0] is BatchMode.PREFILL]
    assert [b[2] for b in prefills] == [[16]] * 6 + [[4]]
    assert [b[3] for b in prefills] == [[16 * i] for i in range(7)]


def test_chunked_prefill_respects_the_chunk_size_with_other_requests_running() -> None:
    rng = np.random.default_rng(6)
    s = make_scheduler(max_total_tokens=4096, chunked_prefill_size=16)
    arrivals = {0: [req(tokens(rng, 10), 30)], 2: [req(tokens(rng, 150), 4)], 4: [req(tokens(rng, 12), 3)]}
    trace = drive(s, arrivals)
    check_complete(trace)
    for mode, rids, ext, _ in trace.batches:
        if mode is BatchMode.PREFILL:
            assert max(ext) <= 16, (rids, ext)


def test_mixed_chunks_decode_the_running_requests_beside_a_long_prompt() -> None:
    rng = np.random.default_rng(6)
    arrivals = {0: [req(tokens(rng, 10), 30), req(tokens(rng, 12), 30)], 3: [req(tokens(rng, 150), 4)]}
    plain = drive(make_scheduler(max_total_tokens=4096, chunked_prefill_size=16), arrivals)
    rng = np.random.default_rng(6)
    arrivals = {0: [req(tokens(rng, 10), 30), req(tokens(rng, 12), 30)], 3: [req(tokens(rng, 150), 4)]}
    s = make_scheduler(max_total_tokens=4096, chunked_prefill_size=16, enable_mixed_chunk=True)
    trace = drive(s, arrivals)
    check_complete(trace)
    long_rid = next(rid for rid, r in trace.reqs.items() if len(r.origin_input_ids) == 150)
    long_chunks = [b for b in trace.batches if long_rid in b[1] and b[0] is not BatchMode.DECODE]
    # every chunk of the long prompt carried the two streams' decode steps: no step waited for it
    assert len(long_chunks) == -(-150 // 16)
    for mode, rids, ext, _ in long_chunks:
        assert mode is BatchMode.MIXED and rids[0] == long_rid and ext[0] <= 16
        assert ext[1:] == [1, 1] and set(rids[1:]) == set(trace.reqs) - {long_rid}
    assert len(trace.batches) < len(plain.batches)


def test_chunked_prefill_size_bounds_the_whole_prefill_batch() -> None:
    rng = np.random.default_rng(7)
    s = make_scheduler(max_total_tokens=4096, chunked_prefill_size=16)
    group = [req(tokens(rng, 10), 3) for _ in range(5)] + [req(tokens(rng, 40), 3)]
    trace = drive(s, {0: group})
    check_complete(trace)
    for mode, rids, ext, _ in trace.batches:
        if mode is BatchMode.PREFILL:
            assert sum(ext) <= 16, (rids, ext)


def test_max_prefill_tokens_bounds_a_batch_without_chunking() -> None:
    rng = np.random.default_rng(8)
    s = make_scheduler(max_total_tokens=4096, max_prefill_tokens=64, chunked_prefill_size=0)
    group = [req(tokens(rng, 30), 2) for _ in range(5)]
    trace = drive(s, {0: group})
    check_complete(trace)
    for mode, rids, ext, _ in trace.batches:
        if mode is BatchMode.PREFILL and len(rids) > 1:
            assert sum(ext) <= 64, (rids, ext)


def test_max_running_requests_is_respected() -> None:
    rng = np.random.default_rng(9)
    s = make_scheduler(max_total_tokens=4096, max_running_requests=3)
    group = [req(tokens(rng, int(rng.integers(1, 30))), int(rng.integers(1, 15))) for _ in range(10)]
    trace = drive(s, {0: group[:6], 4: group[6:]})
    check_complete(trace)
    assert trace.max_running == 3
    assert all(len(rids) <= 3 for _, rids, _, _ in trace.batches)


@pytest.mark.parametrize("disable", [False, True])
def test_retraction_under_a_tiny_pool_completes_everything(disable: bool) -> None:
    rng = np.random.default_rng(10)
    s = make_scheduler(max_total_tokens=200, disable_radix_cache=disable)
    group = [req(tokens(rng, 40), 40) for _ in range(8)]
    trace = drive(s, {0: group})
    check_complete(trace)
    assert s.stats().retractions > 0
    assert sum(r.num_retractions for r in group) == s.stats().retractions
    assert s.stats().decode_tokens == 8 * 40


def test_retraction_with_shared_prefixes_and_chunking() -> None:
    rng = np.random.default_rng(11)
    s = make_scheduler(max_total_tokens=160, chunked_prefill_size=24)
    shared = tokens(rng, 60)
    group = [req(shared + tokens(rng, int(rng.integers(1, 20))), int(rng.integers(20, 60))) for _ in range(8)]
    trace = drive(s, {0: group[:4], 10: group[4:]})
    check_complete(trace)
    assert s.stats().retractions > 0


def test_a_half_prefilled_chunked_request_is_retracted_before_a_running_one_is_aborted() -> None:
    rng = np.random.default_rng(15)
    # each request fits the pool alone (50 and 35 slots), the two together do not
    s = make_scheduler(max_total_tokens=64, chunked_prefill_size=8)
    a = req(tokens(rng, 40), 10, rid="a")
    b = req(tokens(rng, 30), 5, rid="b")
    trace = drive(s, {0: [a, b]})
    assert a.finish_reason is not None and a.finish_reason.type == "length", a.finish_reason
    check_complete(trace)


def test_the_executor_row_stays_in_sync_when_a_repeated_prompt_is_deduplicated() -> None:
    rng = np.random.default_rng(16)
    s = make_scheduler(max_total_tokens=512)
    ex = FakeExecutor()
    prompt = tokens(rng, 20)
    first = req(prompt, 10)
    drive(s, {0: [first]}, ex=ex)
    again = req(prompt, 10)  # recomputes the last prompt token, which the tree already holds
    drive(s, {0: [again]}, ex=ex)
    assert again.output_ids == first.output_ids


def test_abort_while_waiting_running_and_chunked() -> None:
    rng = np.random.default_rng(12)
    s = make_scheduler(max_total_tokens=4096, chunked_prefill_size=16)
    a = req(tokens(rng, 10), 50, rid="running")
    b = req(tokens(rng, 200), 5, rid="chunked")
    c = req(tokens(rng, 10), 5, rid="waiting")
    d = req(tokens(rng, 10), 5, rid="ok")
    trace = drive(s, {0: [a], 2: [b, c, d]}, aborts={3: ["chunked"], 5: ["running", "waiting"]})
    check_complete(trace, aborted={"running", "chunked", "waiting"})
    for r in (a, b, c):
        assert r.finish_reason is not None and r.finish_reason.type == "abort"
    assert not s.abort("ok"), "aborting a finished request is a no-op"


def test_aborted_during_a_forward_pass_finishes_once() -> None:
    rng = np.random.default_rng(13)
    s = make_scheduler(max_total_tokens=4096)
    r = req(tokens(rng, 20), 10)
    s.add_request(r)
    ex = FakeExecutor()
    batch = s.schedule()
    assert batch is not None
    out = ex.run(batch)
    s.abort(r.rid)
    assert s.process_output(batch, out) == [r]
    assert s.schedule() is None and s.pop_dropped() == []
    idle_invariant(s)


def test_validation_names_the_limits() -> None:
    cfg = SchedulerConfig(max_total_tokens=100, max_context_len=80)
    with pytest.raises(ValueError, match="empty"):
        fit_max_new_tokens(0, 1, cfg)
    with pytest.raises(ValueError, match="context"):
        fit_max_new_tokens(80, 1, cfg)
    with pytest.raises(ValueError, match="max-total-tokens"):
        fit_max_new_tokens(30, 30, SchedulerConfig(max_total_tokens=50, max_context_len=80))
    assert fit_max_new_tokens(70, 30, cfg) == 10, "clipped to the context like SGLang"
    s = make_scheduler(max_total_tokens=100, max_context_len=80)
    first = req([5] * 70, 10)
    s.add_request(first)
    with pytest.raises(ValueError, match="duplicate"):
        s.add_request(req([5], 1, rid=first.rid))


def test_max_new_tokens_zero_finishes_at_prefill_and_caches_the_prompt() -> None:
    rng = np.random.default_rng(14)
    s = make_scheduler(max_total_tokens=4096)
    p = tokens(rng, 30)
    r0 = req(p, 0)
    ex = FakeExecutor()
    trace = drive(s, {0: [r0]}, ex=ex)
    assert trace.finished[r0.rid] == 1
    assert r0.output_ids == [] and r0.finish_reason is not None and r0.finish_reason.type == "length"
    r1 = req([*p, 7], 1)
    drive(s, {0: [r1]}, ex=ex)
    assert r1.cached_tokens == 30


def test_flush_cache_only_when_idle() -> None:
    s = make_scheduler(max_total_tokens=512)
    ex = FakeExecutor()
    drive(s, {0: [req([5] * 20, 3)]}, ex=ex)
    s.add_request(req([6] * 20, 3))
    with pytest.raises(RuntimeError, match="in flight"):
        s.flush_cache()
    drive(s, {}, ex=ex)
    s.flush_cache()
    assert s.check_invariant() == (512, 0, 0)


class TableDetokenizer:
    """A detokenizer that maps token ids to fixed strings."""

    def __init__(self, table: dict[int, str]) -> None:
        self.table = table
        self.text = ""

    def add(self, token_ids: list[int]) -> str:
        piece = "".join(self.table[t] for t in token_ids)
        self.text += piece
        return piece

    def flush(self) -> str:
        return ""


def text_req(table: dict[int, str], **sp: object) -> Req:
    params = SamplingParams(**sp)  # type: ignore[arg-type]
    return Req(origin_input_ids=[1], sampling_params=params, detokenizer=TableDetokenizer(table))


def test_stop_strings_on_the_request() -> None:
    table = {1: "Hello", 2: " wor", 3: "ld", 4: "!", 5: "\n", 9: "<eos>"}
    r = text_req(table, stop=["world", "!"], max_new_tokens=10)
    for t in (1, 2):
        r.append_token(t)
        assert not r.finished
        assert r.output_text() == r.detokenizer.text[: len(r.detokenizer.text) - 4]  # holds back len-1
    r.append_token(3)  # the stop string spans tokens
    assert r.finish_reason is not None and r.finish_reason.to_dict() == {"type": "stop", "matched": "world"}
    assert r.output_text() == "Hello "
    # stop token ids and eos, min_new_tokens
    r2 = text_req(table, stop_token_ids=[4], max_new_tokens=10, min_new_tokens=2)
    r2.eos_token_ids = (9,)
    r2.append_token(4)
    assert not r2.finished, "min_new_tokens not reached"
    r2.append_token(9)
    assert r2.finish_reason is not None and r2.finish_reason.to_dict() == {"type": "stop", "matched": 9}
    r3 = text_req(table, max_new_tokens=2, ignore_eos=True)
    r3.eos_token_ids = (9,)
    r3.append_token(9)
    assert not r3.finished
    r3.append_token(9)
    assert r3.finish_reason is not None and r3.finish_reason.to_dict() == {"type": "length", "length": 2}


def test_stop_string_inside_a_long_token_is_found() -> None:
    r = text_req({1: "Hello ", 2: "STOP" + "-" * 30, 3: "x"}, stop=["STOP"], max_new_tokens=10)
    r.append_token(1)
    r.append_token(2)
    assert r.finish_reason is not None and r.finish_reason.matched == "STOP"
    assert r.output_text(final=True) == "Hello "


# ---------------------------------------------------------------------------------------------------

request_spec = st.tuples(
    st.integers(0, 30),  # arrival step
    st.integers(0, 3),  # which shared prefix (3: none)
    st.integers(0, 60),  # how much of the shared prefix
    st.integers(1, 40),  # own tail length
    st.integers(0, 30),  # max_new_tokens
    st.booleans(),  # abort it at some point
    st.integers(0, 40),  # abort step
)
Spec = tuple[int, int, int, int, int, bool, int]


def run_random_workload(
    specs: list[Spec], pool: int, chunk: int, max_running: int, disable: bool, seed: int, mixed: bool = False
) -> tuple[Scheduler, Trace, set[str]]:
    rng = np.random.default_rng(seed)
    prefixes = [tokens(rng, 60) for _ in range(3)]
    s = make_scheduler(
        max_total_tokens=pool,
        chunked_prefill_size=chunk,
        max_running_requests=max_running,
        max_prefill_tokens=128,
        disable_radix_cache=disable,
        enable_mixed_chunk=mixed,
    )
    arrivals: dict[int, list[Req]] = {}
    aborts: dict[int, list[str]] = {}
    aborted: set[str] = set()
    for i, (at, which, plen, tail, max_new, do_abort, abort_at) in enumerate(specs):
        prompt = (prefixes[which][:plen] if which < 3 else []) + tokens(rng, tail)
        r = req(prompt, max_new, rid=f"r{i}")
        try:
            fit(r, s.config)
        except ValueError:
            continue  # prompt + max_new_tokens larger than the pool: rejected up front
        arrivals.setdefault(at, []).append(r)
        if do_abort:
            aborts.setdefault(max(at, abort_at), []).append(r.rid)
            aborted.add(r.rid)
    trace = drive(s, arrivals, aborts)
    event(f"retractions: {min(s.stats().retractions, 3)}")
    assert trace.max_running <= max_running
    assert s.num_requests() == 0
    return s, trace, aborted


def check_client_aborts(trace: Trace, aborted: set[str]) -> None:
    for rid in aborted:
        r = trace.reqs[rid]
        assert r.finish_reason is not None
        if r.finish_reason.type != "abort":  # it finished before the abort arrived
            assert r.output_ids == expected_output(len(r.origin_input_ids), r.sampling_params.max_new_tokens)


WORKLOAD = dict(
    specs=st.lists(request_spec, min_size=1, max_size=12),
    pool=st.one_of(st.integers(48, 128), st.integers(128, 400)),
    max_running=st.integers(1, 6),
    disable=st.booleans(),
    seed=st.integers(0, 2**16),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunk=st.sampled_from([0, 8, 16, 64]), **WORKLOAD)
def test_random_workloads_conserve_slots_and_complete_everything(
    specs: list[Spec], pool: int, chunk: int, max_running: int, disable: bool, seed: int
) -> None:
    """Conservation and the executor's view at every step, the idle invariant, exactly-once finishing,
    no request dropped by the scheduler, and exact outputs."""
    _, trace, aborted = run_random_workload(specs, pool, chunk, max_running, disable, seed)
    check_complete(trace, aborted)
    check_client_aborts(trace, aborted)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunk=st.sampled_from([0, 8, 64]), **WORKLOAD)
def test_random_workloads_with_mixed_chunks_conserve_slots_and_complete_everything(
    specs: list[Spec], pool: int, chunk: int, max_running: int, disable: bool, seed: int
) -> None:
    _, trace, aborted = run_random_workload(specs, pool, chunk, max_running, disable, seed, mixed=True)
    check_complete(trace, aborted)
    check_client_aborts(trace, aborted)
