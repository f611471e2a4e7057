"""Jump-forward in the pure scheduler (no model, no grammar library): a fake constraint forces tokens
after some sampled ones. The scheduler must compute them as extend tokens in the next decode pass
(several query tokens for that request, no pass of their own), charge them at w_in (sampled tokens at
w_out), put them in the radix tree, keep the KV conserved, and rebuild the constraint after a
retraction."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest
from fixtures.helpers import TrackingAllocator
from test_scheduler import FakeExecutor, conservation, idle_invariant, next_token, prefix_hashes

from radixfair.sampling_params import SamplingParams
from radixfair.sched.batch import BatchMode, BatchOutput, ScheduledBatch
from radixfair.sched.constraint import JumpForward
from radixfair.sched.policies import FCFSPolicy
from radixfair.sched.request import Req
from radixfair.sched.scheduler import Scheduler, SchedulerConfig

FORCED = (250, 251, 252)


class ForcingConstraint:
    """After every `every`-th sampled token the grammar forces FORCED; never terminates."""

    def __init__(self, every: int = 2) -> None:
        self.every = every
        self.tokens: list[int] = []  # what it accepted, in order
        self.sampled = 0
        self.suspended = False
        self.resumes = 0

    def accept(self, token_id: int) -> bool:
        assert not self.suspended, "a suspended constraint was used"
        self.tokens.append(token_id)
        self.sampled += 1
        return True

    def is_terminated(self) -> bool:
        return False

    def jump_forward(self, last_token: int) -> JumpForward | None:
        if self.sampled % self.every:
            return None
        self.tokens.extend(FORCED)
        return JumpForward(False, FORCED)

    def suspend(self) -> None:
        self.suspended = True

    def resume(self, output_ids: Sequence[int]) -> None:
        # output_ids may be shorter than what was accepted only for a finished request (never resumed)
        assert list(output_ids) == self.tokens, "the output and the grammar state disagree"
        self.suspended = False
        self.resumes += 1


def expected(prompt_len: int, max_new: int, every: int) -> tuple[list[int], int]:
    """(output, forced count) the fake model and constraint produce."""
    out: list[int] = []
    forced = sampled = 0
    while len(out) < max_new:
        out.append(next_token(prompt_len + len(out)))
        sampled += 1
        if sampled % every == 0:
            take = FORCED[: max_new - len(out)]
            out.extend(take)
            forced += len(take)
    return out, forced


class JumpForwardExecutor(FakeExecutor):
    """The fake executor, with decode passes in which a request may have several tokens: each one's KV
    is computed from the slots its row holds, as the model runner's decode attention reads them."""

    def run(self, batch: ScheduledBatch) -> BatchOutput:
        if batch.mode is BatchMode.PREFILL:
            return super().run(batch)
        for row_id, row_slots in batch.row_updates:
            self.table.setdefault(int(row_id), {}).update((p, int(x)) for p, x in enumerate(row_slots))
        tokens: list[int] = []
        flat = 0
        for i, r in enumerate(batch.reqs):
            fill = r.fill_ids
            hashes = prefix_hashes(fill)
            start, n = int(batch.prefix_lens[i]), int(batch.extend_lens[i])
            assert start + n == len(fill), "a decode pass computes everything up to the last token"
            assert batch.input_ids[flat : flat + n].tolist() == fill[start:]
            assert batch.positions[flat : flat + n].tolist() == list(range(start, start + n))
            row = self.table.setdefault(int(batch.rows[i]), {})
            for j in range(n):
                row[start + j] = int(batch.out_slots[flat + j])
            slots = [row.get(p, -1) for p in range(start + n)]
            assert slots == [int(x) for x in r.slots[: start + n]], f"{r.rid}: stale req_to_token row"
            for p in range(start):
                assert self.kv.get(slots[p]) == hashes[p], f"{r.rid}: wrong KV at position {p}"
            for p in range(start, start + n):
                self.kv[slots[p]] = hashes[p]
            flat += n
            tokens.append(next_token(start + n))
        assert flat == batch.num_tokens
        return BatchOutput(next_token_ids=tokens)


class RecordingPolicy(FCFSPolicy):
    def __init__(self) -> None:
        super().__init__()
        self.extend: Counter[str] = Counter()
        self.decoded: Counter[str] = Counter()

    def on_admit(self, req: Req, extend_len: int, cached_len: int) -> None:
        self.extend[req.rid] += extend_len

    def on_decode(self, req: Req, n_tokens: int) -> None:
        self.decoded[req.rid] += n_tokens


def run(s: Scheduler, reqs: list[Req], max_steps: int = 5000) -> dict[BatchMode, int]:
    ex = JumpForwardExecutor()
    for r in reqs:
        s.add_request(r)
    passes = {BatchMode.PREFILL: 0, BatchMode.DECODE: 0}
    for _ in range(max_steps):
        if s.is_idle():
            break
        running_before = {id(r) for r in s.running}
        batch = s.schedule()
        assert not s.pop_dropped()
        assert batch is not None, "requests but no batch"
        if batch.mode is BatchMode.PREFILL:
            assert not any(id(r) in running_before for r in batch.reqs), "forced tokens got a pass of their own"
        else:
            assert {id(r) for r in batch.reqs} == {id(r) for r in s.running}, "a decode pass runs everyone"
        passes[batch.mode] += 1
        conservation(s, [*s.running, *batch.reqs, *([s.chunked_req] if s.chunked_req else [])])
        s.process_output(batch, ex.run(batch))
    assert s.is_idle()
    idle_invariant(s)
    return passes


def make(pool: int, policy: RecordingPolicy) -> Scheduler:
    return Scheduler(SchedulerConfig(max_total_tokens=pool, max_running_requests=16, chunked_prefill_size=64),
                     policy, allocator=TrackingAllocator(pool))


def constrained(prompt: list[int], max_new: int, every: int) -> Req:
    r = Req(origin_input_ids=prompt, sampling_params=SamplingParams(max_new_tokens=max_new, ignore_eos=True))
    r.constraint = ForcingConstraint(every)
    return r


@pytest.mark.parametrize("every", [1, 2, 5])
def test_forced_tokens_are_extend_tokens_charged_at_w_in(every: int) -> None:
    policy = RecordingPolicy()
    s = make(4096, policy)
    prompts = [[3 + (i * 5 + j) % 40 for j in range(10 + 7 * i)] for i in range(6)]
    reqs = [constrained(p, 30, every) for p in prompts]
    passes = run(s, reqs)
    for p, r in zip(prompts, reqs, strict=True):
        want, forced = expected(len(p), 30, every)
        assert r.output_ids == want and r.forced_tokens == forced > 0
        assert policy.decoded[r.rid] == 30 - forced  # sampled: w_out
        assert policy.extend[r.rid] == len(p) + forced  # prompt and forced: w_in
    # forced tokens never take a pass of their own: one decode pass per sampled token at most
    assert passes[BatchMode.DECODE] <= 30 - expected(10, 30, every)[1]
    # and they are in the radix tree like any computed token
    for p, r in zip(prompts, reqs, strict=True):
        m = s.tree.match_prefix(p + r.output_ids)
        assert len(m.slots) >= len(p) + len(r.output_ids) - 1 - len(FORCED)


def test_retraction_with_forced_tokens_pending_rebuilds_the_constraint() -> None:
    policy = RecordingPolicy()
    s = make(180, policy)  # a pool too small for all of them: decode retracts
    prompts = [[3 + (i * 11 + j) % 40 for j in range(20)] for i in range(6)]
    reqs = [constrained(p, 24, 2) for p in prompts]
    run(s, reqs)
    assert s.stats().retractions > 0
    resumed = 0
    for p, r in zip(prompts, reqs, strict=True):
        want, forced = expected(len(p), 24, 2)
        assert r.output_ids == want
        c = r.constraint
        assert isinstance(c, ForcingConstraint) and not c.suspended
        resumed += c.resumes
        # retraction recomputes without charging forced tokens again
        assert policy.extend[r.rid] <= len(p) + forced + r.num_retractions
    assert resumed == sum(r.num_retractions for r in reqs) > 0
