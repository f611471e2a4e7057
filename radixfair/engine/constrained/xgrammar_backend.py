"""xgrammar (SGLang's default): grammars compiled to a pushdown automaton with precomputed
context-independent token masks. Install it without its triton dependency (GPU kernels that this
backend does not use): `pip install --no-deps xgrammar apache-tvm-ffi`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import xgrammar as xgr

from radixfair.engine.constrained.base import (
    JSON_ITEM_SEPARATOR,
    JSON_KEY_SEPARATOR,
    Bitmask,
    GrammarBackend,
    GrammarError,
    GrammarMatcher,
    GrammarSpec,
    encode_utf8,
    token_bits,
)
from radixfair.tokenizer import Tokenizer


class XGrammarMatcher:
    def __init__(self, m: xgr.GrammarMatcher, tokenizer: Tokenizer, stop_words: Bitmask) -> None:
        self._m = m
        self._tokenizer = tokenizer
        self._stop_words = stop_words  # [1, words]: the stop tokens' bits

    def accept_token(self, token_id: int) -> bool:
        return bool(self._m.accept_token(token_id))

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)

    def fill_bitmask(self, bitmask: Bitmask, row: int) -> None:
        self._m.fill_next_token_bitmask(torch.from_numpy(bitmask), row)

    def is_terminated(self) -> bool:
        # xgrammar terminates only on a stop token; a complete structure that allows nothing but a
        # stop token is terminated here, as llguidance and outlines-core see it
        if self._m.is_terminated():
            return True
        if not self._m.is_completed():
            return False
        scratch = np.zeros_like(self._stop_words)
        self._m.fill_next_token_bitmask(torch.from_numpy(scratch), 0)
        return not bool((scratch & ~self._stop_words).any())

    def forced_tokens(self) -> list[int]:
        text = self._m.find_jump_forward_string()
        return self._tokenizer.encode(text, add_special_tokens=False) if text else []


class XGrammarGrammar:
    def __init__(self, compiled: xgr.CompiledGrammar, tokenizer: Tokenizer, stop_words: Bitmask) -> None:
        self._compiled = compiled
        self._tokenizer = tokenizer
        self._stop_words = stop_words

    def matcher(self) -> GrammarMatcher:
        return XGrammarMatcher(xgr.GrammarMatcher(self._compiled), self._tokenizer, self._stop_words)


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        backend = tokenizer.backend_tokenizer
        vocab = [backend.id_to_token(i) or "" for i in range(vocab_size)]
        metadata = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
        self._info = xgr.TokenizerInfo(vocab, metadata["vocab_type"], vocab_size=vocab_size,
                                       stop_token_ids=list(stop_token_ids),
                                       add_prefix_space=metadata["add_prefix_space"])
        self._decoded: list[bytes] = list(self._info.decoded_vocab)
        self._compiler = xgr.GrammarCompiler(self._info, max_threads=2)
        self._tokenizer = tokenizer
        self._stop_words = token_bits(stop_token_ids, vocab_size)

    def compile(self, spec: GrammarSpec) -> XGrammarGrammar:
        try:
            if spec.kind == "regex":
                compiled = self._compiler.compile_regex(spec.text)
            elif spec.kind == "json_schema":
                compiled = self._compiler.compile_json_schema(
                    spec.text, any_whitespace=False, separators=(JSON_ITEM_SEPARATOR, JSON_KEY_SEPARATOR))
            else:
                compiled = self._compiler.compile_grammar(spec.text)
        except (RuntimeError, ValueError) as e:
            raise GrammarError(f"{spec.kind}: {e}") from e
        return XGrammarGrammar(compiled, self._tokenizer, self._stop_words)

    def token_bytes(self, token_ids: Sequence[int]) -> bytes:
        return b"".join(self._decoded[t] for t in token_ids)

    def tokenize_bytes(self, data: bytes) -> list[int] | None:
        return encode_utf8(self._tokenizer, data)
