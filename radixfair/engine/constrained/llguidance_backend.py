"""llguidance (Microsoft's Rust grammar engine): regexes, JSON schemas and Lark/GBNF grammars over a
lazily built lexer and an Earley parser; masks for a batch are computed in its own thread pool."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import llguidance
import llguidance.numpy as llnp

from radixfair.engine.constrained.base import (
    JSON_ITEM_SEPARATOR,
    JSON_KEY_SEPARATOR,
    Bitmask,
    GrammarBackend,
    GrammarError,
    GrammarMatcher,
    GrammarSpec,
)
from radixfair.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": JSON_ITEM_SEPARATOR,
    "key_separator": JSON_KEY_SEPARATOR,
}


class LLGuidanceMatcher:
    def __init__(self, m: llguidance.LLMatcher) -> None:
        self._m = m

    def accept_token(self, token_id: int) -> bool:
        # try_consume_tokens refuses a token without putting the matcher into its error state
        return bool(self._m.try_consume_tokens([token_id]) == 1)

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)

    def fill_bitmask(self, bitmask: Bitmask, row: int) -> None:
        llnp.fill_next_token_bitmask(self._m, bitmask, row)

    def is_terminated(self) -> bool:
        return bool(self._m.is_stopped())

    def forced_tokens(self) -> list[int]:
        # llguidance leaves out a last token that could merge with what follows the forced text
        return list(self._m.compute_ff_tokens())

    @property
    def inner(self) -> llguidance.LLMatcher:
        return self._m


class LLGuidanceGrammar:
    def __init__(self, pristine: llguidance.LLMatcher) -> None:
        self._pristine = pristine

    def matcher(self) -> GrammarMatcher:
        return LLGuidanceMatcher(self._pristine.deep_copy())


class LLGuidanceBackend(GrammarBackend):
    name = "llguidance"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self._tok = llguidance.LLTokenizer(tokenizer.backend_tokenizer.to_str(), n_vocab=vocab_size,
                                           eos_token=list(stop_token_ids))
        self._executor = llguidance.LLExecutor()

    def _grammar(self, spec: GrammarSpec) -> str:
        if spec.kind == "regex":
            return str(llguidance.LLMatcher.grammar_from_regex(spec.text))
        if spec.kind == "json_schema":
            return str(llguidance.LLMatcher.grammar_from_json_schema(spec.text, defaults=JSON_OPTIONS))
        return llguidance.grammar_from("ebnf", spec.text)  # GBNF, as SGLang takes it (Lark works too)

    def compile(self, spec: GrammarSpec) -> LLGuidanceGrammar:
        try:
            grammar = self._grammar(spec)
        except ValueError as e:
            raise GrammarError(f"{spec.kind}: {e}") from e
        m = llguidance.LLMatcher(self._tok, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(f"{spec.kind}: {m.get_error()}")
        return LLGuidanceGrammar(m)

    def fill_bitmasks(self, matchers: Sequence[GrammarMatcher], bitmask: Bitmask) -> None:
        pairs = [(m.inner, i) for i, m in enumerate(matchers) if isinstance(m, LLGuidanceMatcher)]
        if len(pairs) != len(matchers):
            super().fill_bitmasks(matchers, bitmask)
            return
        llnp.fill_next_token_bitmask_par(self._executor, pairs, bitmask)

    def token_bytes(self, token_ids: Sequence[int]) -> bytes:
        return bytes(self._tok.decode_bytes(list(token_ids)))

    def tokenize_bytes(self, data: bytes) -> list[int] | None:
        return list(self._tok.tokenize_bytes(data))
