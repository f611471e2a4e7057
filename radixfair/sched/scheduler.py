"""Continuous batching over a radix-tree KV cache. Pure Python: no torch, no tensors.

Each `schedule()` returns one batch: a prefill batch when waiting requests can be admitted
(prefill first, as SGLang does, so new requests get their first token quickly), otherwise a
decode step over every running request. `process_output()` applies what the executor computed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from radixfair.cache.allocator import SlotAllocator, SlotArray
from radixfair.cache.radix_cache import RadixCache
from radixfair.sched.batch import BatchMode, BatchOutput, IntArray, ScheduledBatch
from radixfair.sched.policies.base import SchedulePolicy
from radixfair.sched.request import FinishReason, Req, ReqStatus, TokenLogprob

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
    # Share of each running request's remaining max_new_tokens that admission keeps free
    # (SGLang's new_token_ratio): high after a retraction, decaying while decoding goes well.
    init_new_token_ratio: float = 0.7
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay: float = 0.002
    # A waiting request whose uncached part starts with this many tokens that another request
    # of the same prefill batch is computing waits one batch and reuses them from the tree.
    in_batch_prefix_tokens: int = 32


@dataclass
class CacheStats:
    input_tokens: int = 0  # prompt tokens of admitted requests (first admission)
    cached_tokens: int = 0  # of which served from the radix cache
    prefill_tokens: int = 0  # tokens actually computed in prefill passes (incl. re-prefills)
    decode_tokens: int = 0
    retractions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.input_tokens if self.input_tokens else 0.0


class Scheduler:
    def __init__(self, config: SchedulerConfig, policy: SchedulePolicy) -> None:
        self.config = config
        self.policy = policy
        self.allocator = SlotAllocator(config.max_total_tokens)
        self.tree = RadixCache(self.allocator)
        policy.bind(self.tree)
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked_req: Req | None = None
        self.stats = CacheStats()
        self.new_token_ratio = config.init_new_token_ratio
        self._free_rows = list(range(config.max_running_requests + 1))[::-1]
        self._by_rid: dict[str, Req] = {}
        self._dropped: list[Req] = []  # left without a batch (aborted while waiting, pool too small)
        self._dirty_rows: list[Req] = []  # slots changed since the executor last wrote their rows
        # Set when a waiting request may have been aborted: the queue can hold thousands, so it is
        # scanned for them only then.
        self._abort_pending = False

    @property
    def num_rows(self) -> int:
        return self.config.max_running_requests + 1

    # ---- queue ---------------------------------------------------------------------------------
    def add_request(self, req: Req) -> None:
        if req.rid in self._by_rid:
            raise ValueError(f"duplicate request id {req.rid!r}")
        self.validate(req)
        req.status = ReqStatus.WAITING
        self._by_rid[req.rid] = req
        self.waiting.append(req)
        self.policy.on_arrival(req)

    def validate(self, req: Req) -> None:
        """Reject what can never be served, with a message that names the limit."""
        n = len(req.origin_input_ids)
        if n == 0:
            raise ValueError("the prompt is empty: give at least one token")
        cfg = self.config
        if n >= cfg.max_context_len:
            raise ValueError(
                f"the prompt has {n} tokens; this model's context is {cfg.max_context_len} tokens"
            )
        # SGLang clips max_new_tokens to the context instead of refusing the request
        room = cfg.max_context_len - n
        if req.sampling_params.max_new_tokens > room:
            req.sampling_params.max_new_tokens = room
            req.sampling_params.min_new_tokens = min(req.sampling_params.min_new_tokens, room)
        need = n + req.sampling_params.max_new_tokens
        if need > cfg.max_total_tokens:
            raise ValueError(
                f"prompt ({n} tokens) + max_new_tokens ({req.sampling_params.max_new_tokens}) needs {need} "
                f"KV slots but the pool holds {cfg.max_total_tokens} (--max-total-tokens)"
            )

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
            computed = int(batch.prefix_lens[i])
            if req.kv_len > computed:
                self.allocator.free(req.slots[computed:])
                req.slots = req.slots[:computed]
            req.abort(message)
            req.error = message
            self._leave(req)

    def _decode_reserve(self, reqs: Iterable[Req]) -> int:
        cap = 4096  # don't let one huge max_new_tokens block admission entirely
        return int(
            sum(min(r.sampling_params.max_new_tokens - len(r.output_ids), cap) for r in reqs)
            * self.new_token_ratio
        )

    def _available(self) -> int:
        return self.allocator.available() + self.tree.evictable_size()

    def _schedule_prefill(self) -> ScheduledBatch | None:
        cfg = self.config
        if not self.waiting and self.chunked_req is None:
            return None
        chunk = cfg.chunked_prefill_size if cfg.chunked_prefill_size > 0 else None
        # as in SGLang, the chunk size bounds the whole prefill batch, not just one request
        token_budget = min(cfg.max_prefill_tokens, chunk) if chunk is not None else cfg.max_prefill_tokens
        reserve = self._decode_reserve(self.running)
        admitted: list[tuple[Req, int]] = []  # (req, extend tokens this pass)
        batch_index = None if cfg.disable_radix_cache else RadixCache(SlotAllocator(1))

        # Only one request is mid-way through a chunked prompt at a time: while it stays partial
        # it has the batch to itself; the pass that completes it may start another.
        if self.chunked_req is not None:
            req = self.chunked_req
            n = len(req.fill_ids) - req.kv_len
            take = min(n, token_budget, chunk or n)
            if not self._grow(req, take):
                # not even the ongoing chunk fits: decode first so running requests free memory
                return None
            admitted.append((req, take))
            token_budget -= take
            if take < n:
                return self._build_prefill(admitted)
            if batch_index is not None:
                batch_index.insert(req.fill_ids, np.zeros(len(req.fill_ids), dtype=np.int64))

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
        batch_index: RadixCache | None,
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
            self._match(req, fill)
            extend = len(fill) - req.prefix_len
            if batch_index is not None and extend > cfg.in_batch_prefix_tokens:
                m = len(batch_index.match_prefix(fill).slots)
                if m - req.prefix_len >= cfg.in_batch_prefix_tokens:
                    self._unmatch(req)
                    continue
            take = extend
            if chunk is not None:
                take = min(take, chunk, token_budget)
            elif admitted and take > token_budget:
                self._unmatch(req)
                break
            need = take + (self._decode_reserve([req]) if take == extend else 0)
            if self._available() - reserve < need and (admitted or self.running):
                self._unmatch(req)
                break
            if not self._start(req, take):
                self._unmatch(req)
                break
            admitted.append((req, take))
            token_budget -= take
            # A later request can share at most `extend` tokens with this one beyond what the tree
            # gives it (the tree holds the rest, locked by this request), so after a short extend
            # there is nothing worth waiting a batch for: skip the insert, it costs per admission.
            if batch_index is not None and extend >= cfg.in_batch_prefix_tokens:
                batch_index.insert(fill, np.zeros(len(fill), dtype=np.int64))
            if take < extend:
                self.chunked_req = req
                break
        return token_budget

    def _match(self, req: Req, fill: list[int]) -> None:
        if self.config.disable_radix_cache:
            req.prefix_len = 0
            return
        anchor = self.policy.cached_prefix(req, self.tree)
        if anchor is not None:
            m = self.tree.match_at(*anchor)
        else:
            m = self.tree.match_prefix(fill[: req.max_prefix_len()])
        req.slots = m.slots
        req.prefix_len = len(m.slots)
        req.last_node = m.last_node
        self.tree.inc_lock_ref(m.last_node)

    def _unmatch(self, req: Req) -> None:
        if req.last_node is not None:
            self.tree.dec_lock_ref(req.last_node)
        req.reset_kv()

    def _alloc(self, n: int) -> SlotArray | None:
        slots = self.allocator.alloc(n)
        if slots is None and not self.config.disable_radix_cache:
            self.tree.evict(n - self.allocator.available())
            slots = self.allocator.alloc(n)
        return slots

    def _start(self, req: Req, take: int) -> bool:
        """Give a newly admitted request a row and `take` fresh slots after its cached prefix."""
        if not self._free_rows:
            return False
        new = self._alloc(take)
        if new is None:
            return False
        req.row = self._free_rows.pop()
        req.slots = Req.concat_slots(req.slots, new)
        first = not req.admitted_once
        if first:
            req.admitted_once = True
            req.cached_tokens = req.prefix_len
            req.charged_upto = req.prefix_len
            self.stats.input_tokens += len(req.origin_input_ids)
            self.stats.cached_tokens += req.prefix_len
        self._charge(req, req.prefix_len if first else 0, first)
        req.status = ReqStatus.RUNNING
        return True

    def _charge(self, req: Req, cached_len: int, first: bool) -> None:
        """Tell the policy about prompt tokens computed for the first time. Recomputing what a
        retraction threw away is the server's doing, not the client's, so it is never charged."""
        new = max(0, req.kv_len - req.charged_upto)
        req.charged_upto = max(req.charged_upto, req.kv_len)
        if new or first:
            self.policy.on_admit(req, new, cached_len)

    def _grow(self, req: Req, take: int) -> bool:
        new = self._alloc(take)
        if new is None:
            return False
        req.slots = Req.concat_slots(req.slots, new)
        self._charge(req, 0, False)
        return True

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
            self.stats.prefill_tokens += take
        return ScheduledBatch(
            row_updates=self._take_row_updates(),
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

    def _schedule_decode(self) -> ScheduledBatch | None:
        self._make_room(len(self.running))
        if not self.running:
            return None
        reqs = list(self.running)
        new = self._alloc(len(reqs))
        assert new is not None, "make_room guaranteed the slots"
        positions = np.empty(len(reqs), dtype=np.int64)
        ids = np.empty(len(reqs), dtype=np.int64)
        for i, req in enumerate(reqs):
            positions[i] = req.kv_len
            ids[i] = req.output_ids[-1]
            req.slots = Req.concat_slots(req.slots, new[i : i + 1])
            req.charged_upto = req.kv_len  # decode tokens are charged through on_decode
        self.new_token_ratio = max(self.config.min_new_token_ratio, self.new_token_ratio - self.config.new_token_ratio_decay)
        return ScheduledBatch(
            row_updates=self._take_row_updates(),
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

    def _take_row_updates(self) -> list[tuple[int, IntArray]]:
        updates = [(r.row, r.slots) for r in self._dirty_rows if r.row >= 0 and not r.finished]
        self._dirty_rows = []
        return updates

    def _make_room(self, need: int) -> None:
        """Ensure `need` free slots for a decode step, evicting then retracting the newest requests."""
        while True:
            if self.allocator.available() >= need:
                return
            if not self.config.disable_radix_cache:
                self.tree.evict(need - self.allocator.available())
                if self.allocator.available() >= need:
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
            victim = max(self.running, key=lambda r: (r.arrival_time, r.arrival_seq))
            self.running.remove(victim)
            self._retract(victim)
            need -= 1

    def _retract(self, req: Req) -> None:
        """Send a running request back to the queue; its progress stays in the tree if enabled."""
        self.stats.retractions += 1
        req.num_retractions += 1
        self._give_back_kv(req)
        req.status = ReqStatus.WAITING
        self.waiting.append(req)
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.3)
        self.policy.on_arrival(req)
        logger.info("retracted %s (%d output tokens kept) to free KV slots", req.rid, len(req.output_ids))

    # ---- results ---------------------------------------------------------------------------
    def process_output(self, batch: ScheduledBatch, out: BatchOutput) -> list[Req]:
        """Apply sampled tokens; returns the requests that finished in this step."""
        finished: list[Req] = []
        for i, req in enumerate(batch.reqs):
            if batch.mode is BatchMode.PREFILL:
                self._record_prompt_logprobs(req, batch, out, i)
            if req.finished:  # aborted while the batch ran
                self._leave(req)
                finished.append(req)
                continue
            if not batch.sample[i]:
                # a chunk of a long prompt: publish it in the tree so others can share it now
                self._cache_unfinished(req)
                continue
            token = out.next_token_ids[i]
            if req.return_logprob and req.sampling_params.max_new_tokens > 0:
                top = out.next_top_logprobs[i] if out.next_top_logprobs is not None else None
                lp = out.next_token_logprobs[i] if out.next_token_logprobs is not None else None
                req.output_token_logprobs.append(TokenLogprob(lp, token, top))
            if req.sampling_params.max_new_tokens == 0:
                req.finish(FinishReason("length", length=0))
            else:
                req.append_token(token)
                self.policy.on_decode(req, 1)
                self.stats.decode_tokens += 1
            if batch.mode is BatchMode.PREFILL:
                if self.chunked_req is req:
                    self.chunked_req = None
                if not req.finished:
                    self._cache_unfinished(req)
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
            req.input_token_logprobs.append(TokenLogprob(lp, tok, tops[j] if tops else None))

    def _leave(self, req: Req) -> None:
        if req in self.running:
            self.running.remove(req)
        if self.chunked_req is req:
            self.chunked_req = None
        self._release(req)

    def _cache_unfinished(self, req: Req) -> None:
        """Insert the request's computed KV into the tree and re-lock at the new, deeper node."""
        if self.config.disable_radix_cache:
            return
        n_kv = req.kv_len
        key = req.fill_ids[:n_kv]
        dup = self.tree.insert(key, req.slots)
        if dup > req.prefix_len:
            # the tree already held these tokens (another request computed them meanwhile): use its
            # slots and free ours; the executor's row must then be rewritten before the next pass
            self.allocator.free(req.slots[req.prefix_len : dup])
            self._dirty_rows.append(req)
        m = self.tree.match_prefix(key)
        assert len(m.slots) == n_kv, "the tree must now hold the whole computed sequence"
        assert req.last_node is not None
        self.tree.dec_lock_ref(req.last_node)
        self.tree.inc_lock_ref(m.last_node)
        req.last_node = m.last_node
        req.slots = m.slots
        req.prefix_len = n_kv

    def _give_back_kv(self, req: Req) -> None:
        """Hand the request's KV to the tree (or the allocator) and free its row."""
        if req.row >= 0:
            self._free_rows.append(req.row)
        if self.config.disable_radix_cache:
            self.allocator.free(req.slots)
        elif req.last_node is not None:
            n_kv = req.kv_len
            dup = self.tree.insert(req.fill_ids[:n_kv], req.slots)
            if dup > req.prefix_len:
                self.allocator.free(req.slots[req.prefix_len : dup])
            self.tree.dec_lock_ref(req.last_node)
        req.reset_kv()

    def _release(self, req: Req) -> None:
        self._give_back_kv(req)
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
        self.tree.reset()

    def check_invariant(self) -> tuple[int, int, int]:
        """`free + evictable + protected == pool size` when no request holds private slots."""
        free = self.allocator.available()
        ev = self.tree.evictable_size()
        prot = self.tree.protected_size()
        if free + ev + prot != self.config.max_total_tokens:
            raise AssertionError(
                f"KV invariant broken: free {free} + evictable {ev} + protected {prot} "
                f"!= pool size {self.config.max_total_tokens}"
            )
        return free, ev, prot
