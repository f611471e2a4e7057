"""Continuous batching over a radix-tree KV cache. Pure Python: no torch, no tensors.

Each `schedule()` returns one batch: a prefill batch when waiting requests can be admitted
(prefill first, as SGLang does, so new requests get their first token quickly), otherwise a
decode step over every running request; with `enable_mixed_chunk` a prefill batch also carries the
running requests' decode step (a mixed batch). `process_output()` applies what the executor computed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from radixfair.cache.allocator import SlotAllocator, SlotArray
from radixfair.cache.prefix_tree import PrefixTree
from radixfair.cache.radix_cache import RadixCache
from radixfair.io_struct import ClientStats, EngineStats, FinishReason, TokenLogprob
from radixfair.metrics.service import charged_service
from radixfair.sched.batch import BatchMode, BatchOutput, IntArray, ScheduledBatch
from radixfair.sched.kv_manager import KVManager
from radixfair.sched.policies.base import SchedulePolicy
from radixfair.sched.request import Req, ReqStatus

logger = logging.getLogger(__name__)


MAX_POLICY_ROUNDS = 64  # bound on policy refills (new deficit rounds) within one batch formation


@dataclass(frozen=True)
class SchedulerConfig:
    max_total_tokens: int  # KV pool slots
    max_running_requests: int = 128
    max_prefill_tokens: int = 8192  # input tokens per prefill batch
    chunked_prefill_size: int = 2048  # <= 0: no chunking
    max_context_len: int = 8192
    disable_radix_cache: bool = False
    # running requests decode in the same pass as a prefill chunk (BatchMode.MIXED) instead of waiting
    enable_mixed_chunk: bool = False
    # Share of each running request's remaining max_new_tokens that admission keeps free
    # (SGLang's new_token_ratio): high after a retraction, decaying while decoding goes well.
    init_new_token_ratio: float = 0.7
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay: float = 0.002
    # A waiting request whose uncached part starts with this many tokens that another request
    # of the same prefill batch is computing waits one batch and reuses them from the tree.
    in_batch_prefix_tokens: int = 32


# clients whose charged service the scheduler keeps apart (the policies' own default bound)
MAX_SERVICE_CLIENTS = 10000


@dataclass
class _Counters:
    input_tokens: int = 0  # prompt tokens of admitted requests (first admission)
    cached_tokens: int = 0  # of which served from the radix cache
    prefill_tokens: int = 0  # tokens actually computed in prefill passes (incl. re-prefills)
    decode_tokens: int = 0
    retractions: int = 0


def fit_max_new_tokens(prompt_len: int, max_new_tokens: int, config: SchedulerConfig) -> int:
    """The `max_new_tokens` a request with this prompt gets: clipped to the context, as SGLang
    does. Raises ValueError, naming the limit, for a request that can never be served."""
    if prompt_len == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if prompt_len >= config.max_context_len:
        raise ValueError(
            f"the prompt has {prompt_len} tokens; this model's context is {config.max_context_len} tokens"
        )
    fitted = min(max_new_tokens, config.max_context_len - prompt_len)
    need = prompt_len + fitted
    if need > config.max_total_tokens:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({fitted}) needs {need} "
            f"KV slots but the pool holds {config.max_total_tokens} (--max-total-tokens)"
        )
    return fitted


class Scheduler:
    """Requests must be checked with `fit_max_new_tokens` before `add_request`."""

    def __init__(self, config: SchedulerConfig, policy: SchedulePolicy,
                 allocator: SlotAllocator | None = None) -> None:
        self.config = config
        self.policy = policy
        # one row per running request, and one for a chunked prompt admitted beside a full batch
        self.kv = KVManager(config.max_total_tokens, config.max_running_requests + 1,
                            cache_enabled=not config.disable_radix_cache, allocator=allocator)
        policy.bind(self.kv.tree)
        policy.set_batch_slots(config.max_running_requests)
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked_req: Req | None = None
        self._counters = _Counters()
        self.new_token_ratio = config.init_new_token_ratio
        self._by_rid: dict[str, Req] = {}
        self._dropped: list[Req] = []  # left without a batch (aborted while waiting, pool too small)
        # Set when a waiting request may have been aborted: the queue can hold thousands, so it is
        # scanned for them only then.
        self._abort_pending = False
        # client -> charged service delivered so far (w_in per prompt token computed for the first
        # time, w_out per output token), for the live fairness view; see `_count_service`
        self._service: dict[str, float] = {}

    @property
    def tree(self) -> RadixCache:
        """The radix tree: the KV manager changes it; policies and tests look at it."""
        return self.kv.tree

    def stats(self) -> EngineStats:
        c, kv = self._counters, self.kv
        return EngineStats(
            running=len(self.running),
            waiting=len(self.waiting), input_tokens=c.input_tokens, cached_tokens=c.cached_tokens,
            prefill_tokens=c.prefill_tokens, decode_tokens=c.decode_tokens, retractions=c.retractions,
            evicted_tokens=kv.tree.evicted_tokens, tree_tokens=kv.tree.total_tokens(),
            free_slots=kv.allocator.available(), max_total_tokens=self.config.max_total_tokens,
            evictable_slots=kv.tree.evictable_size(), protected_slots=kv.tree.protected_size(),
            policy=self.policy.name, balance=self.policy.balances()[0], clients=self.client_stats(),
        )

    def client_stats(self) -> tuple[ClientStats, ...]:
        """Per client with requests in the system or service charged: queue, batch, service, and
        the policy's balance (deficit or counter), sorted by client."""
        waiting: dict[str, int] = {}
        running: dict[str, int] = {}
        for r in self.waiting:
            if not r.finished:
                waiting[r.client_id] = waiting.get(r.client_id, 0) + 1
        live = list(self.running)
        if self.chunked_req is not None and self.chunked_req not in live:
            live.append(self.chunked_req)
        for r in live:
            if not r.finished:
                running[r.client_id] = running.get(r.client_id, 0) + 1
        _, balances = self.policy.balances()
        names = sorted(set(waiting) | set(running) | set(self._service))
        return tuple(ClientStats(c, waiting.get(c, 0), running.get(c, 0), self._service.get(c, 0.0), balances.get(c))
                     for c in names)

    def _count_service(self, req: Req, extend: int, output: int) -> None:
        c = req.client_id
        if c not in self._service and len(self._service) >= MAX_SERVICE_CLIENTS:
            # bounded like the policies' own per-client state: forget clients with nothing in the
            # system (a reader of the totals sees a client restart from 0, never a wrong rate)
            live = {r.client_id for r in self.waiting} | {r.client_id for r in self.running}
            for u in [u for u in self._service if u not in live]:
                del self._service[u]
        cfg = self.policy.config
        self._service[c] = self._service.get(c, 0.0) + charged_service(extend, output, cfg.w_in, cfg.w_out)

    # ---- queue ---------------------------------------------------------------------------------
    def add_request(self, req: Req) -> None:
        if req.rid in self._by_rid:
            raise ValueError(f"duplicate request id {req.rid!r}")
        req.status = ReqStatus.WAITING
        req.client_id = self.policy.client_for(req.client_id)
        self._by_rid[req.rid] = req
        self.waiting.append(req)
        self.policy.on_arrival(req)

    def abort(self, rid: str) -> bool:
        req = self._by_rid.get(rid)
        if req is None or req.finished:
            return False
        req.abort("aborted by client")
        self._abort_pending = True
        return True

    def is_idle(self) -> bool:
        return not self.waiting and not self.running and self.chunked_req is None

    def num_requests(self) -> int:
        return len(self._by_rid)

    # ---- batch formation ----------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        self._drop_aborted()
        batch = self._schedule_prefill()
        if batch is not None:
            if self.config.enable_mixed_chunk and self.running:
                return self._mix_in_decode(batch)
            return batch
        if self.running:
            return self._schedule_decode()
        return None

    def pop_dropped(self) -> list[Req]:
        """Requests that finished outside a batch since the last call (the caller notifies them)."""
        out, self._dropped = self._dropped, []
        return out

    def _drop_aborted(self) -> None:
        if self._abort_pending:
            self._abort_pending = False
            gone = [r for r in self.waiting if r.finished]
            if gone:
                self.waiting[:] = [r for r in self.waiting if not r.finished]
            for req in gone:
                self._release(req)
                self._dropped.append(req)
        for req in [r for r in self.running if r.finished]:
            self.running.remove(req)
            self._release(req)
            self._dropped.append(req)
        if self.chunked_req is not None and self.chunked_req.finished:
            req, self.chunked_req = self.chunked_req, None
            self._release(req)
            self._dropped.append(req)

    def fail_batch(self, batch: ScheduledBatch, message: str) -> None:
        """The executor could not run `batch`: drop the KV it never computed, abort its requests."""
        for i, req in enumerate(batch.reqs):
            self.kv.discard_uncomputed(req, int(batch.prefix_lens[i]))
            req.abort(message)
            self._leave(req)

    def _decode_reserve(self, reqs: Iterable[Req]) -> int:
        cap = 4096  # don't let one huge max_new_tokens block admission entirely
        return int(
            sum(min(r.sampling_params.max_new_tokens - len(r.output_ids), cap) for r in reqs)
            * self.new_token_ratio
        )

    def _schedule_prefill(self) -> ScheduledBatch | None:
        cfg = self.config
        if not self.waiting and self.chunked_req is None:
            return None
        chunk = cfg.chunked_prefill_size if cfg.chunked_prefill_size > 0 else None
        # as in SGLang, the chunk size bounds the whole prefill batch, not just one request
        token_budget = min(cfg.max_prefill_tokens, chunk) if chunk is not None else cfg.max_prefill_tokens
        reserve = self._decode_reserve(self.running)
        admitted: list[tuple[Req, int]] = []  # (req, extend tokens this pass)
        # what this batch computes, so a request sharing a long new prefix with another one in it
        # can wait a batch and reuse that prefix (no use when nothing is ever reused)
        batch_index = None if cfg.disable_radix_cache else PrefixTree()

        # Only one request is mid-way through a chunked prompt at a time: while it stays partial
        # it has the batch to itself; the pass that completes it may start another.
        if self.chunked_req is not None:
            req = self.chunked_req
            n = len(req.fill_ids) - req.kv_len
            take = min(n, token_budget, chunk or n)
            if not self.kv.grow(req, take):
                # not even the ongoing chunk fits: decode first so running requests free memory
                return None
            self._charge(req, 0, False)
            admitted.append((req, take))
            token_budget -= take
            if take < n:
                return self._build_prefill(admitted)
            if batch_index is not None:
                batch_index.insert(req.fill_ids)

        # A policy may hold back every waiting request (DLPM: all their clients spent their quantum
        # this round); it then gets the chance to start a new round and the pass runs again.
        continued = len(admitted)  # a chunked prompt carried on from the last batch: not queued
        for _ in range(MAX_POLICY_ROUNDS):
            before = len(admitted)
            token_budget = self._admission_pass(admitted, token_budget, reserve, chunk, batch_index)
            if len(admitted) > before:
                break
            if not self.waiting or not self.policy.refill(self.waiting):
                break
        if not admitted:
            return None
        started = [r for r, _ in admitted[continued:]]
        if started:
            taken = set(started)  # requests hash by identity
            self.waiting[:] = [r for r in self.waiting if r not in taken]
            for req in started:
                self.policy.on_dequeue(req)
        return self._build_prefill(admitted)

    def _admission_pass(
        self,
        admitted: list[tuple[Req, int]],
        token_budget: int,
        reserve: int,
        chunk: int | None,
        batch_index: PrefixTree | None,
    ) -> int:
        """Admit waiting requests in policy order while the budgets allow; returns the budget left."""
        cfg = self.config
        taken = {id(r) for r, _ in admitted}
        for req in self.policy.order(self.waiting):
            if token_budget <= 0:
                break
            if id(req) in taken:
                continue
            if req.finished:  # aborted without going through abort(): dropped next time
                self._abort_pending = True
                continue
            if len(self.running) + len(admitted) >= cfg.max_running_requests:
                break
            if not self.policy.may_admit(req):
                continue
            fill = req.fill_ids if req.output_ids else req.origin_input_ids  # read only: no copy
            self.kv.match(req, fill, self.policy.cached_prefix(req, self.kv.tree))
            extend = len(fill) - req.prefix_len
            if batch_index is not None and extend > cfg.in_batch_prefix_tokens:
                m = batch_index.peek(fill).length
                if m - req.prefix_len >= cfg.in_batch_prefix_tokens:
                    self.kv.unmatch(req)
                    continue
            take = extend
            if chunk is not None:
                take = min(take, chunk, token_budget)
            elif admitted and take > token_budget:
                self.kv.unmatch(req)
                break
            need = take + (self._decode_reserve([req]) if take == extend else 0)
            if self.kv.available() - reserve < need and (admitted or self.running):
                self.kv.unmatch(req)
                break
            if not self._start(req, take):
                self.kv.unmatch(req)
                break
            admitted.append((req, take))
            token_budget -= take
            # A later request can share at most `extend` tokens with this one beyond what the tree
            # gives it (the tree holds the rest, locked by this request), so after a short extend
            # there is nothing worth waiting a batch for: skip the insert, it costs per admission.
            if batch_index is not None and extend >= cfg.in_batch_prefix_tokens:
                batch_index.insert(fill)
            if take < extend:
                self.chunked_req = req
                break
        return token_budget

    def _start(self, req: Req, take: int) -> bool:
        """Give a newly admitted request a row and `take` fresh slots after its cached prefix."""
        if not self.kv.start(req, take):
            return False
        first = not req.admitted_once
        if first:
            req.admitted_once = True
            # a prefix may cover output tokens the grammar forced before the first sample
            req.cached_tokens = min(req.prefix_len, len(req.origin_input_ids))
            req.charged_upto = req.prefix_len
            self._counters.input_tokens += len(req.origin_input_ids)
            self._counters.cached_tokens += req.cached_tokens
        self._charge(req, req.cached_tokens if first else 0, first)
        req.status = ReqStatus.RUNNING
        if not first and req.constraint is not None:
            req.constraint.resume(req.output_ids)
        return True

    def _charge(self, req: Req, cached_len: int, first: bool) -> None:
        """Tell the policy about prompt tokens computed for the first time. Recomputing what a
        retraction threw away is the server's doing, not the client's, so it is never charged."""
        new = max(0, req.kv_len - req.charged_upto)
        req.charged_upto = max(req.charged_upto, req.kv_len)
        if new or first:
            self.policy.on_admit(req, new, cached_len)
            self._count_service(req, new, 0)

    def _build_prefill(self, admitted: list[tuple[Req, int]]) -> ScheduledBatch:
        ids: list[int] = []
        positions: list[IntArray] = []
        out_slots: list[SlotArray] = []
        prefix_lens, extend_lens, rows, sample = [], [], [], []
        row_slots: list[IntArray] = []
        logprob_positions: list[tuple[IntArray, IntArray] | None] = []
        for req, take in admitted:
            start = req.kv_len - take  # KV tokens before this pass
            fill = req.fill_ids if req.output_ids else req.origin_input_ids  # read only: no copy
            ids.extend(fill[start : start + take])
            positions.append(np.arange(start, start + take, dtype=np.int64))
            out_slots.append(req.slots[start:])
            prefix_lens.append(start)
            extend_lens.append(take)
            rows.append(req.row)
            sample.append(start + take == len(fill))
            row_slots.append(req.slots)
            logprob_positions.append(self._prompt_logprob_positions(req, start, take))
            self._counters.prefill_tokens += take
        return ScheduledBatch(
            row_updates=self.kv.take_row_updates(),
            mode=BatchMode.PREFILL,
            reqs=[r for r, _ in admitted],
            input_ids=np.asarray(ids, dtype=np.int64),
            positions=np.concatenate(positions),
            out_slots=np.concatenate(out_slots),
            rows=np.asarray(rows, dtype=np.int64),
            prefix_lens=np.asarray(prefix_lens, dtype=np.int64),
            extend_lens=np.asarray(extend_lens, dtype=np.int64),
            sample=sample,
            row_slots=row_slots,
            logprob_positions=logprob_positions,
        )

    @staticmethod
    def _prompt_logprob_positions(req: Req, start: int, take: int) -> tuple[IntArray, IntArray] | None:
        """Extend-relative positions whose logits give the logprob of a prompt token >= start_len."""
        if not req.prompt_logprobs_wanted or req.output_ids:
            return None
        prompt = req.origin_input_ids
        # token t (t >= 1) is predicted by the logits at position t - 1
        first_t = max(req.logprob_start_len, 1, start + 1)
        last_t = min(len(prompt) - 1, start + take)
        if first_t > last_t:
            return None
        targets = np.arange(first_t, last_t + 1, dtype=np.int64)
        return targets - 1 - start, np.asarray(prompt[first_t : last_t + 1], dtype=np.int64)

    def _mix_in_decode(self, prefill: ScheduledBatch) -> ScheduledBatch:
        """`prefill` with a decode step of every running request in the same pass (SGLang's mixed
        chunked prefill), so a long prompt's chunks do not stall the streams. Falls back to the plain
        prefill when the decode step would need a retraction or carries grammar-forced tokens: the
        next pass is then a decode step that handles those."""
        reqs = list(self.running)
        if any(r.pending_extend for r in reqs) or not self.kv.ensure_free(len(reqs)):
            return prefill
        decode = self._decode_batch(reqs)
        return ScheduledBatch.mixed(prefill, decode)

    def _schedule_decode(self) -> ScheduledBatch | None:
        self._make_room(sum(1 + r.pending_extend for r in self.running))
        if not self.running:
            return None
        reqs = list(self.running)
        if any(r.pending_extend for r in reqs):
            return self._decode_with_forced_tokens(reqs)
        return self._decode_batch(reqs)

    def _decode_batch(self, reqs: list[Req]) -> ScheduledBatch:
        """One token for each of `reqs` (free slots for them ensured)."""
        positions = np.asarray([r.kv_len for r in reqs], dtype=np.int64)
        ids = np.asarray([r.output_ids[-1] for r in reqs], dtype=np.int64)
        new = self.kv.extend_by_one(reqs)
        for req in reqs:
            req.charged_upto = req.kv_len  # decode tokens are charged through on_decode
        self.new_token_ratio = max(self.config.min_new_token_ratio, self.new_token_ratio - self.config.new_token_ratio_decay)
        return ScheduledBatch(
            row_updates=self.kv.take_row_updates(),
            mode=BatchMode.DECODE,
            reqs=reqs,
            input_ids=ids,
            positions=positions,
            out_slots=new,
            rows=np.asarray([r.row for r in reqs], dtype=np.int64),
            prefix_lens=positions.copy(),
            extend_lens=np.ones(len(reqs), dtype=np.int64),
            sample=[True] * len(reqs),
            row_slots=[r.slots for r in reqs],  # lets the executor find prefixes the batch shares
        )

    def _decode_with_forced_tokens(self, reqs: list[Req]) -> ScheduledBatch:
        """A decode step in which requests whose grammar forced tokens after their last sampled one
        (jump-forward) compute those as extend tokens: several query tokens for such a request, each
        attending causally to its prefix, in the same pass as the others' single decode tokens, so
        nobody waits a pass for them. They were charged (w_in) when the grammar appended them."""
        counts = [1 + r.pending_extend for r in reqs]
        starts = [r.kv_len for r in reqs]
        ids: list[int] = []
        for r, start, n in zip(reqs, starts, counts, strict=True):
            fill = r.fill_ids
            ids.extend(fill[start : start + n])
        new = self.kv.extend(reqs, counts)
        for req in reqs:
            req.charged_upto = max(req.charged_upto, req.kv_len)
        self._counters.prefill_tokens += sum(counts) - len(reqs)
        self.new_token_ratio = max(self.config.min_new_token_ratio, self.new_token_ratio - self.config.new_token_ratio_decay)
        return ScheduledBatch(
            row_updates=self.kv.take_row_updates(),
            mode=BatchMode.DECODE,
            reqs=reqs,
            input_ids=np.asarray(ids, dtype=np.int64),
            positions=np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in zip(starts, counts, strict=True)]),
            out_slots=new,
            rows=np.asarray([r.row for r in reqs], dtype=np.int64),
            prefix_lens=np.asarray(starts, dtype=np.int64),
            extend_lens=np.asarray(counts, dtype=np.int64),
            sample=[True] * len(reqs),
            row_slots=[r.slots for r in reqs],
        )

    def _make_room(self, need: int) -> None:
        """Ensure `need` free slots for a decode step, evicting then retracting the newest requests."""
        while True:
            if self.kv.ensure_free(need):
                return
            if self.chunked_req is not None:
                # a half-prefilled prompt yields before any decoding request: its chunks stay in
                # the tree and it resumes from there
                partial = self.chunked_req
                self.chunked_req = None
                self._retract(partial)
                continue
            if len(self.running) <= 1:
                req = self.running[0] if self.running else None
                if req is None:
                    return
                # a single request that cannot grow: the pool is smaller than validation assumed
                self.running.remove(req)
                req.abort("the KV cache pool is too small to continue this request")
                self._release(req)
                self._dropped.append(req)
                return
            victim = self.policy.retract_victim(self.running)
            self.running.remove(victim)
            need -= 1 + victim.pending_extend
            self._retract(victim)

    def _retract(self, req: Req) -> None:
        """Send a running request back to the queue; its progress stays in the tree if enabled."""
        self._counters.retractions += 1
        req.num_retractions += 1
        self.kv.release(req)
        if req.constraint is not None:
            req.constraint.suspend()
        req.status = ReqStatus.WAITING
        self.waiting.append(req)
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.3)
        self.policy.on_arrival(req)
        logger.info("retracted %s (%d output tokens kept) to free KV slots", req.rid, len(req.output_ids))

    # ---- results ---------------------------------------------------------------------------
    def process_output(self, batch: ScheduledBatch, out: BatchOutput) -> list[Req]:
        """Apply sampled tokens; returns the requests that finished in this step."""
        finished: list[Req] = []
        n_prefill = batch.prefill_count
        for i, req in enumerate(batch.reqs):
            prefilled = i < n_prefill
            if prefilled:
                self._record_prompt_logprobs(req, batch, out, i)
            if req.finished:  # aborted while the batch ran
                self._leave(req)
                finished.append(req)
                continue
            if not batch.sample[i]:
                # a chunk of a long prompt: publish it in the tree so others can share it now
                self.kv.publish(req)
                continue
            if i in out.failed:
                req.fail(out.failed[i])
                self._leave(req)
                finished.append(req)
                continue
            token = out.next_token_ids[i]
            if req.return_logprob and req.sampling_params.max_new_tokens > 0:
                top = out.next_top_logprobs[i] if out.next_top_logprobs is not None else None
                lp = out.next_token_logprobs[i] if out.next_token_logprobs is not None else None
                req.output_token_logprobs.append(TokenLogprob(lp, token, None if top is None else tuple(top)))
            if req.sampling_params.max_new_tokens == 0:
                req.finish(FinishReason("length", length=0))
            else:
                forced_before = req.forced_tokens
                try:
                    req.append_token(token)
                except Exception:
                    # e.g. the detokenizer on a token it cannot decode: this request fails, the
                    # batch and the scheduler go on
                    logger.exception("request %s: could not apply its sampled token %d", req.rid, token)
                    req.fail("internal error while decoding the output")
                self.policy.on_decode(req, 1)
                self._count_service(req, 0, 1)
                self._counters.decode_tokens += 1
                forced = req.forced_tokens - forced_before
                if forced:
                    # tokens the grammar forced after the sampled one (jump-forward) are charged as
                    # extend tokens (w_in) as they are appended, as a sampled token is (w_out); the
                    # extend pass that computes them, or a re-prefill after retraction, adds nothing
                    self.policy.on_admit(req, forced, 0)
                    self._count_service(req, forced, 0)
                    req.charged_upto = len(req.origin_input_ids) + len(req.output_ids)
            if prefilled:
                if self.chunked_req is req:
                    self.chunked_req = None
                if not req.finished:
                    self.kv.publish(req)
                    self.running.append(req)
            if req.finished:
                self._leave(req)
                finished.append(req)
        return finished

    def _record_prompt_logprobs(self, req: Req, batch: ScheduledBatch, out: BatchOutput, i: int) -> None:
        pos = batch.logprob_positions[i] if batch.logprob_positions else None
        if pos is None or out.input_logprobs is None:
            if req.prompt_logprobs_wanted and not req.input_token_logprobs and req.logprob_start_len == 0:
                req.input_token_logprobs.append(TokenLogprob(None, req.origin_input_ids[0]))
            return
        lps = out.input_logprobs[i] or []
        tops = out.input_top_logprobs[i] if out.input_top_logprobs is not None else None
        if not req.input_token_logprobs and req.logprob_start_len == 0:
            req.input_token_logprobs.append(TokenLogprob(None, req.origin_input_ids[0]))
        for j, (lp, tok) in enumerate(zip(lps, pos[1].tolist(), strict=True)):
            req.input_token_logprobs.append(TokenLogprob(lp, tok, tuple(tops[j]) if tops else None))

    def _leave(self, req: Req) -> None:
        if req in self.running:
            self.running.remove(req)
        if self.chunked_req is req:
            self.chunked_req = None
        self._release(req)

    def _release(self, req: Req) -> None:
        self.kv.release(req)
        req.status = ReqStatus.FINISHED
        self._by_rid.pop(req.rid, None)
        self.policy.on_finish(req)

    # ---- maintenance ---------------------------------------------------------------------------
    def flush_cache(self) -> None:
        if not self.is_idle():
            raise RuntimeError(
                f"cannot flush the cache while requests are in flight "
                f"({len(self.running)} running, {len(self.waiting)} waiting)"
            )
        self.kv.flush()

    def check_invariant(self) -> tuple[int, int, int]:
        """(free, evictable, protected) KV slots; AssertionError when they do not add up to the
        pool (meaningful when no request holds private slots, e.g. at idle)."""
        return self.kv.check_invariant()
