"""What the scheduler hands the executor for one forward pass, and what comes back."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from radixfair.sched.request import Req

IntArray = npt.NDArray[np.int64]


class BatchMode(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    # a prefill batch with the running requests' decode steps riding along (--enable-mixed-chunk):
    # the first `num_prefill` requests extend, the others decode one token each
    MIXED = "mixed"


@dataclass
class ScheduledBatch:
    mode: BatchMode
    reqs: list[Req]
    # flat: every request's extend tokens (prefill) or its last token (decode; also the tokens a
    # grammar forced after it, where extend_lens > 1: see Scheduler._decode_with_forced_tokens)
    input_ids: IntArray
    positions: IntArray  # flat, absolute position of each input token
    out_slots: IntArray  # flat, KV slot each input token is written to
    rows: IntArray  # [B] req_to_token rows
    prefix_lens: IntArray  # [B] tokens already in the KV pool before this pass
    extend_lens: IntArray  # [B] input tokens of each request in this pass
    sample: list[bool]  # [B] whether a token is sampled for the request after this pass
    # prefill only: slots to write into each request's req_to_token row, from position 0
    row_slots: list[IntArray] = field(default_factory=list)
    # any mode, applied first: (row, slots from position 0) of running requests whose slots the
    # scheduler swapped for the tree's copies after their last pass
    row_updates: list[tuple[int, IntArray]] = field(default_factory=list)
    # prefill only: per request, extend-relative positions whose next-token logprob is wanted,
    # and the token ids those positions predict (prompt logprobs); None when not wanted
    logprob_positions: list[tuple[IntArray, IntArray] | None] = field(default_factory=list)
    # mixed only: requests (at the front) that extend; the rest decode
    num_prefill: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def prefill_count(self) -> int:
        """Requests of the batch, from the front, that run a prefill (extend) in this pass."""
        if self.mode is BatchMode.MIXED:
            return self.num_prefill
        return len(self.reqs) if self.mode is BatchMode.PREFILL else 0

    def split_mixed(self) -> tuple[ScheduledBatch, ScheduledBatch]:
        """A mixed batch as its prefill part and its decode part (the tokens of the first come first)."""
        if self.mode is not BatchMode.MIXED:
            raise ValueError(f"not a mixed batch: {self.mode.value}")
        n, t = self.num_prefill, int(self.extend_lens[: self.num_prefill].sum())
        prefill = ScheduledBatch(
            mode=BatchMode.PREFILL, reqs=self.reqs[:n], input_ids=self.input_ids[:t], positions=self.positions[:t],
            out_slots=self.out_slots[:t], rows=self.rows[:n], prefix_lens=self.prefix_lens[:n],
            extend_lens=self.extend_lens[:n], sample=self.sample[:n], row_slots=self.row_slots[:n],
            row_updates=self.row_updates, logprob_positions=self.logprob_positions[:n])
        decode = ScheduledBatch(
            mode=BatchMode.DECODE, reqs=self.reqs[n:], input_ids=self.input_ids[t:], positions=self.positions[t:],
            out_slots=self.out_slots[t:], rows=self.rows[n:], prefix_lens=self.prefix_lens[n:],
            extend_lens=self.extend_lens[n:], sample=self.sample[n:], row_slots=self.row_slots[n:])
        return prefill, decode

    @staticmethod
    def mixed(prefill: ScheduledBatch, decode: ScheduledBatch) -> ScheduledBatch:
        """One pass computing `prefill` (extend tokens) and `decode` (one token per request) together."""
        return ScheduledBatch(
            mode=BatchMode.MIXED, reqs=prefill.reqs + decode.reqs,
            input_ids=np.concatenate([prefill.input_ids, decode.input_ids]),
            positions=np.concatenate([prefill.positions, decode.positions]),
            out_slots=np.concatenate([prefill.out_slots, decode.out_slots]),
            rows=np.concatenate([prefill.rows, decode.rows]),
            prefix_lens=np.concatenate([prefill.prefix_lens, decode.prefix_lens]),
            extend_lens=np.concatenate([prefill.extend_lens, decode.extend_lens]),
            sample=prefill.sample + decode.sample, row_slots=prefill.row_slots + decode.row_slots,
            row_updates=prefill.row_updates + decode.row_updates,
            logprob_positions=prefill.logprob_positions + [None] * len(decode.reqs),
            num_prefill=len(prefill.reqs))

    @property
    def seq_lens(self) -> IntArray:
        return self.prefix_lens + self.extend_lens


@dataclass
class BatchOutput:
    """Per request of the batch (same order); entries for requests that did not sample are -1/None."""

    next_token_ids: list[int]
    next_token_logprobs: list[float | None] | None = None
    next_top_logprobs: list[list[tuple[float, int]] | None] | None = None
    # prompt logprobs aligned with ScheduledBatch.logprob_positions
    input_logprobs: list[list[float] | None] | None = None
    input_top_logprobs: list[list[list[tuple[float, int]]] | None] | None = None
    # batch index -> why that request could not be continued (its sampling failed): it alone fails
    failed: dict[int, str] = field(default_factory=dict)
