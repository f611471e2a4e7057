"""Streaming detokenization: never half a UTF-8 character, never a dropped space in front of a word."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from radixfair.tokenizer.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Streaming detokenization: feed output token ids one (or several) at a time, get new text.

    Decoding each new token alone is wrong twice over: a character may span several byte-level tokens (its
    first bytes decode to U+FFFD), and SentencePiece decoders strip the leading space of whatever sequence they
    decode first. So, as in vLLM/SGLang, we decode a window starting a few tokens back (`_prefix_offset`) twice,
    once up to the last emitted token (`_read_offset`) and once to the end, and emit the difference -- but only
    once the window no longer ends in U+FFFD.

    The window never reaches into the prompt: the contract is that the concatenated deltas equal
    `tokenizer.decode(output_ids)`, and with a SentencePiece decoder prompt context would add a leading space
    that `decode(output_ids)` does not have. `prompt_ids` is accepted for API parity with SGLang; for
    byte-level BPE the prompt cannot change the output text anyway.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: a token already emitted, re-decoded for context
        self._read_offset = 0  # tokens before this are emitted
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset]), cached since it changes only on emit
        self.text = ""  # everything emitted so far

    @property
    def token_ids(self) -> list[int]:
        """All output ids fed so far."""
        return list(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _emit(self, new_text: str) -> str:
        if new_text.startswith(self._prefix_text):
            delta = new_text[len(self._prefix_text) :]
        else:
            # A decoder that rewrites earlier text when more tokens follow (not the case for byte-level BPE or
            # SentencePiece): fall back to a full decode so the output still equals decode(all ids).
            full = self._decode(self._ids)
            delta = full[len(self.text) :] if full.startswith(self.text) else ""
        # The next window starts at the tokens just emitted: they give the next token its context (e.g. the
        # space SentencePiece would strip from a sequence's first token), and the old read offset is known to
        # be a character boundary, which an arbitrary earlier token position is not.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        self.text += delta
        return delta

    def add(self, token_ids: Sequence[int]) -> str:
        """Append output ids; return the text they finalize ("" while a character or word is incomplete)."""
        self._ids.extend(int(t) for t in token_ids)
        if len(self._ids) == self._read_offset:
            return ""
        new_text = self._decode(self._ids[self._prefix_offset :])
        # A trailing U+FFFD means the last token ended inside a multi-byte character: wait for the rest. Text that
        # did not grow (skipped special tokens) is also left for later, keeping the window unchanged.
        if new_text.endswith("\ufffd") or len(new_text) <= len(self._prefix_text):
            return ""
        return self._emit(new_text)

    def flush(self) -> str:
        """At the end of generation: emit whatever is held back, even an incomplete character (as U+FFFD)."""
        if len(self._ids) == self._read_offset:
            return ""
        return self._emit(self._decode(self._ids[self._prefix_offset :]))
