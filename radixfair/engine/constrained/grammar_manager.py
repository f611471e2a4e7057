"""Structured outputs on the engine's side: checks and compiles a request's constraint before it is
queued, attaches its grammar state to the scheduler's `Req`, and computes the token masks of a batch."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch

from radixfair.engine.constrained.base import (
    Bitmask,
    Grammar,
    GrammarBackend,
    GrammarError,
    GrammarKind,
    GrammarMatcher,
    GrammarSpec,
    allocate_bitmask,
    token_bits,
)
from radixfair.engine.constrained.cache import GrammarCache
from radixfair.engine.constrained.constraint import RequestConstraint
from radixfair.engine.constrained.mask import TokenMask, unpack_bitmask
from radixfair.engine.constrained.min_length import min_output_tokens
from radixfair.sampling_params import SamplingParams
from radixfair.sched.request import Req
from radixfair.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

GRAMMAR_CACHE_SIZE = 256  # compiled grammars kept (LRU)

# backend name -> (module, class, pip hint)
_BACKENDS = {
    "llguidance": ("radixfair.engine.constrained.llguidance_backend", "LLGuidanceBackend",
                   "pip install llguidance"),
    "xgrammar": ("radixfair.engine.constrained.xgrammar_backend", "XGrammarBackend",
                 "pip install --no-deps xgrammar apache-tvm-ffi"),
    "outlines": ("radixfair.engine.constrained.outlines_backend", "OutlinesBackend",
                 "pip install outlines-core"),
}


def make_backend(name: str, tokenizer: Tokenizer, vocab_size: int,
                 stop_token_ids: Sequence[int]) -> GrammarBackend | None:
    """The named grammar library bound to this vocabulary; None for "none"."""
    if name == "none":
        return None
    if name not in _BACKENDS:
        raise ValueError(f"--grammar-backend must be one of {', '.join([*_BACKENDS, 'none'])}, got {name!r}")
    module, cls, hint = _BACKENDS[name]
    try:
        backend_cls = getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise ValueError(f"--grammar-backend {name}: its library is not installed ({e}); {hint}") from e
    backend: GrammarBackend = backend_cls(tokenizer, vocab_size, stop_token_ids)
    return backend


class GrammarManager:
    def __init__(self, backend: GrammarBackend | None, tokenizer: Tokenizer, vocab_size: int,
                 stop_token_ids: Sequence[int], device: torch.device, *, jump_forward: bool = True,
                 compile_timeout_s: float = 10.0, cache_size: int = GRAMMAR_CACHE_SIZE) -> None:
        self.backend = backend
        self.vocab_size = vocab_size
        self.device = device
        self.jump_forward = jump_forward
        self.stop_token_ids = tuple(stop_token_ids)
        self._stop_bits = token_bits(self.stop_token_ids, vocab_size)[0]
        self.cache = GrammarCache(backend.compile, cache_size, compile_timeout_s) if backend is not None else None
        # no token spells more bytes than this: bounds the tokens an output of N bytes needs
        # (a byte-level piece spells one byte per character; special tokens never occur in a grammar)
        hf = tokenizer.backend_tokenizer
        special = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
        self.max_token_bytes = max((len(p) for p in hf.get_vocab() if p not in special), default=1)
        # time spent computing and unpacking masks, for `bench structured`
        self.mask_seconds = 0.0
        self.mask_passes = 0
        self.mask_rows = 0

    # ---- before a request is queued ----------------------------------------------------------------
    def check(self, sp: SamplingParams) -> Grammar | None:
        """The compiled constraint of a request, or None if it has none; ValueError naming the field
        if it cannot be served (invalid, unsupported, too slow to compile, or longer than
        max_new_tokens can hold). A prefill-only request (max_new_tokens 0) produces no output to
        constrain: its constraint is checked but not held to a length."""
        c = sp.constraint
        if c is None:
            return None
        field, text = c
        if self.cache is None:
            raise GrammarError(f"{field}: structured outputs are off on this server (--grammar-backend none)")
        spec = GrammarSpec(cast(GrammarKind, field), text)
        grammar = self.cache.get(spec)
        need = min_output_tokens(spec, self.max_token_bytes)
        if 0 < sp.max_new_tokens < need:
            raise GrammarError(f"{field}: every output it accepts needs at least {need} tokens, more than "
                               f"max_new_tokens ({sp.max_new_tokens})")
        return grammar

    def constraint(self, grammar: Grammar, return_logprob: bool) -> RequestConstraint:
        """A new request's grammar state. Forced tokens are not sampled, so they would have no
        logprob: a request that asks for logprobs samples every token (no jump-forward)."""
        assert self.backend is not None
        return RequestConstraint(grammar, self.backend, self.jump_forward and not return_logprob)

    # ---- each forward pass -------------------------------------------------------------------------
    def masks(self, reqs: Sequence[Req]) -> TokenMask | None:
        """The allowed next tokens of the constrained ones among `reqs` (the rows that sample)."""
        rows: list[int] = []
        matchers: list[GrammarMatcher] = []
        for i, req in enumerate(reqs):
            c = req.constraint
            if isinstance(c, RequestConstraint) and not c.suspended:
                rows.append(i)
                matchers.append(c.matcher)
        if not rows:
            return None
        assert self.backend is not None
        t0 = time.perf_counter()
        bitmask = allocate_bitmask(len(rows), self.vocab_size)
        self.backend.fill_bitmasks(matchers, bitmask)
        self._fix_stop_tokens(bitmask, [reqs[i] for i in rows])
        mask = TokenMask(torch.tensor(rows, dtype=torch.long, device=self.device),
                         unpack_bitmask(bitmask, self.vocab_size, self.device))
        self.mask_seconds += time.perf_counter() - t0
        self.mask_passes += 1
        self.mask_rows += len(rows)
        return mask

    def _fix_stop_tokens(self, bitmask: Bitmask, reqs: Sequence[Req]) -> None:
        """Every stop token where the grammar may end (a library knows one or some of them), none
        where the request may not stop yet (`ignore_eos`) unless the grammar allows nothing else, and
        never an empty row: a matcher that allows nothing (an error state) ends its request."""
        words = bitmask.view(np.uint32)
        stop = self._stop_bits.view(np.uint32)
        can_stop = (words & stop).any(axis=1)
        words[can_stop] |= stop
        ignore = np.fromiter((r.sampling_params.ignore_eos for r in reqs), dtype=bool, count=len(reqs))
        ignore &= can_stop & (words & ~stop).any(axis=1)
        words[ignore] &= ~stop
        empty = ~words.any(axis=1)
        for i in np.flatnonzero(empty).tolist():
            logger.error("request %s: its grammar allows no token; ending it", reqs[i].rid)
        words[empty] |= stop

    def shutdown(self) -> None:
        if self.cache is not None:
            self.cache.shutdown()
