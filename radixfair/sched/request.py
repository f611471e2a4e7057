"""A request as the scheduler sees it: token ids, progress, cache ownership, accounting."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from radixfair.cache.allocator import SlotArray, empty_slots
from radixfair.io_struct import FinishReason, TokenLogprob
from radixfair.sampling_params import SamplingParams

if TYPE_CHECKING:
    from radixfair.cache.prefix_tree import TreeNode
    from radixfair.sched.constraint import TokenConstraint


class Detokenizer(Protocol):
    """Streaming detokenizer owned by the request (radixfair.tokenizer.IncrementalDetokenizer)."""

    text: str

    def add(self, token_ids: Sequence[int]) -> str: ...

    def flush(self) -> str: ...


class ReqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_rid_counter = itertools.count()


@dataclass(eq=False)
class Req:
    origin_input_ids: list[int]
    sampling_params: SamplingParams
    rid: str = field(default_factory=lambda: f"req-{next(_rid_counter)}")
    client_id: str = "default"
    weight: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: no prompt logprobs
    top_logprobs_num: int = 0
    detokenizer: Detokenizer | None = None
    constraint: TokenConstraint | None = None  # structured outputs: the grammar the output must match

    output_ids: list[int] = field(default_factory=list)
    status: ReqStatus = ReqStatus.WAITING
    finish_reason: FinishReason | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None
    arrival_seq: int = field(default_factory=lambda: next(_rid_counter))

    # KV ownership. `slots` covers the first len(slots) tokens of fill_ids; its first
    # `prefix_len` entries belong to the radix tree (locked through `last_node`).
    slots: SlotArray = field(default_factory=empty_slots)
    prefix_len: int = 0
    last_node: TreeNode | None = None
    row: int = -1  # req_to_token row while it holds KV
    cached_tokens: int = 0  # prompt tokens served from the cache on first admission
    charged_upto: int = 0  # KV positions already charged to the client (computed once, or cached)
    admitted_once: bool = False
    num_retractions: int = 0
    error: str | None = None  # set when the server failed this request (not the client's doing)
    # output tokens the grammar forced (jump-forward) rather than a decode step sampled; charged as
    # extend tokens (w_in) when the grammar appends them
    forced_tokens: int = 0

    input_token_logprobs: list[TokenLogprob] = field(default_factory=list)
    output_token_logprobs: list[TokenLogprob] = field(default_factory=list)
    _stop_text_end: int | None = None  # cut point in the detokenized text once a stop string matched
    _max_stop_len: int = 0

    def __post_init__(self) -> None:
        self._max_stop_len = max((len(s) for s in self.sampling_params.stop), default=0)

    @property
    def fill_ids(self) -> list[int]:
        """Every token whose KV the request needs before it can sample its next token."""
        return self.origin_input_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def kv_len(self) -> int:
        return len(self.slots)

    @property
    def pending_extend(self) -> int:
        """Tokens past the next decode input whose KV is not computed: forced (jump-forward) tokens
        appended after the last sampled one, which the next decode pass computes with it."""
        return max(0, len(self.origin_input_ids) + len(self.output_ids) - 1 - self.kv_len)

    @property
    def prompt_logprobs_wanted(self) -> bool:
        return self.return_logprob and 0 <= self.logprob_start_len < len(self.origin_input_ids)

    def max_prefix_len(self) -> int:
        """Longest cached prefix the request may reuse: it must compute at least its last token
        (to get logits), and every prompt position whose logprob it asked for."""
        limit = len(self.origin_input_ids) + len(self.output_ids) - 1  # no fill_ids copy: called per decision
        if self.prompt_logprobs_wanted and not self.admitted_once:
            limit = min(limit, max(self.logprob_start_len - 1, 0))
        return max(limit, 0)

    # ---- output text -------------------------------------------------------------------------
    def output_text(self, final: bool = False) -> str:
        """Text to show so far. While running, hold back a tail that could still grow into a
        stop string, so a stream never shows text that the stop string later removes."""
        if self.detokenizer is None:
            return ""
        text = self.detokenizer.text
        if self._stop_text_end is not None:
            return text[: self._stop_text_end]
        if not final and not self.finished and self._max_stop_len > 1:
            return text[: max(0, len(text) - (self._max_stop_len - 1))]
        return text

    def append_token(self, token_id: int) -> None:
        """Add one sampled token and decide whether the request is now finished. Under a constraint
        the grammar advances over it and may force a continuation (jump-forward), appended too."""
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        c = self.constraint
        if c is None:
            self._append(token_id)
            return
        if not c.accept(token_id):
            self.abort(f"the output grammar rejected the sampled token {token_id}")
            return
        jf = c.jump_forward(token_id)
        tokens = [token_id] if jf is None else list(jf.tokens) if jf.replace_last else [token_id, *jf.tokens]
        for i, t in enumerate(tokens):
            if i > 0:
                self.forced_tokens += 1
            self._append(t)
            if self.finished:
                return
        if c.is_terminated():
            self.finish(FinishReason("stop", matched=tokens[-1]))

    def append_forced(self, tokens: Sequence[int]) -> None:
        """Tokens the grammar forces before anything is sampled (the constraint accepted them)."""
        for t in tokens:
            self.forced_tokens += 1
            self._append(t)
            if self.finished:
                return
        if self.constraint is not None and self.constraint.is_terminated():
            self.finish(FinishReason("stop", matched=self.output_ids[-1] if self.output_ids else None))

    def _append(self, token_id: int) -> None:
        self.output_ids.append(token_id)
        sp = self.sampling_params
        n = len(self.output_ids)
        if n >= sp.min_new_tokens and (
            token_id in sp.stop_token_set or (not sp.ignore_eos and token_id in self.eos_token_ids)
        ):
            # like SGLang, the matched stop token stays in output_ids but not in the text
            self.finish(FinishReason("stop", matched=token_id))
            return
        prev_len = 0
        if self.detokenizer is not None:
            prev_len = len(self.detokenizer.text)
            self.detokenizer.add([token_id])
        if n >= sp.min_new_tokens and sp.stop and self.detokenizer is not None:
            text = self.detokenizer.text
            # a match must end in the new text; it may start up to max_stop_len - 1 chars before it
            window_start = max(0, prev_len - self._max_stop_len + 1)
            best: tuple[int, str] | None = None
            for s in sp.stop:
                pos = text.find(s, window_start)
                if pos != -1 and (best is None or pos < best[0]):
                    best = (pos, s)
            if best is not None:
                self._stop_text_end = best[0]
                self.finish(FinishReason("stop", matched=best[1]))
                return
        if n >= sp.max_new_tokens:
            self.finish(FinishReason("length", length=n))

    def finish(self, reason: FinishReason) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.finish_time = time.monotonic()
            if self.detokenizer is not None:
                self.detokenizer.flush()

    def abort(self, message: str = "aborted") -> None:
        self.finish(FinishReason("abort", message=message))

    def fail(self, message: str) -> None:
        """End the request because the server could not go on with it (an internal error)."""
        if self.error is None and not self.finished:
            self.error = message
        self.abort(message)

    def reset_kv(self) -> None:
        self.slots = empty_slots()
        self.prefix_len = 0
        self.last_node = None
        self.row = -1

    @staticmethod
    def concat_slots(a: SlotArray, b: SlotArray) -> SlotArray:
        return np.concatenate([a, b]) if len(a) else b
