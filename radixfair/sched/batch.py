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

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

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
