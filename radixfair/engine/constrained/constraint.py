"""One request's grammar state, as the scheduler's `TokenConstraint`: token acceptance, completion,
and jump-forward (SGLang's compressed FSM) with re-tokenization at the boundary."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from radixfair.engine.constrained.base import Grammar, GrammarBackend, GrammarMatcher
from radixfair.sched.constraint import JumpForward

logger = logging.getLogger(__name__)

# Forced tokens appended per jump: they are computed as one extend, which stays well under a prefill
# chunk; a longer forced run goes on after the next (forced, hence certain) sampled token.
MAX_JUMP_FORWARD_TOKENS = 64


class RequestConstraint:
    def __init__(self, grammar: Grammar, backend: GrammarBackend, jump_forward: bool) -> None:
        self._grammar = grammar
        self._backend = backend
        self.jump_forward_enabled = jump_forward
        self._matcher: GrammarMatcher | None = grammar.matcher()
        self._broken = False  # the state could not be rebuilt: every token is refused (the request aborts)

    @property
    def matcher(self) -> GrammarMatcher:
        if self._matcher is None:
            raise RuntimeError("the request's grammar state is suspended (retracted and not resumed)")
        return self._matcher

    @property
    def suspended(self) -> bool:
        return self._matcher is None

    # ---- the scheduler's TokenConstraint ---------------------------------------------------------
    def accept(self, token_id: int) -> bool:
        return not self._broken and self.matcher.accept_token(token_id)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    def jump_forward(self, last_token: int) -> JumpForward | None:
        if not self.jump_forward_enabled:
            return None
        m = self.matcher
        forced = m.forced_tokens()[:MAX_JUMP_FORWARD_TOKENS]
        if not forced:
            return None
        replace, tokens = self._retokenize(last_token, forced)
        if replace:
            m.rollback(1)
        done = self._accept_all(tokens)
        if done == len(tokens):
            return JumpForward(replace, tuple(tokens))
        # the grammar refused the re-tokenized text (it should not: the bytes are the same); undo it
        # and take the library's forced tokens as they are
        m.rollback(done)
        if replace and not m.accept_token(last_token):
            raise RuntimeError(f"the grammar no longer accepts token {last_token} it had accepted")
        done = self._accept_all(forced)
        return JumpForward(False, tuple(forced[:done])) if done else None

    def start(self) -> list[int]:
        """Tokens forced before anything is sampled (`{"` of a JSON object...), accepted; [] when
        jump-forward is off."""
        if not self.jump_forward_enabled:
            return []
        forced = self.matcher.forced_tokens()[:MAX_JUMP_FORWARD_TOKENS]
        return forced[: self._accept_all(forced)]

    def suspend(self) -> None:
        self._matcher = None

    def resume(self, output_ids: Sequence[int]) -> None:
        m = self._grammar.matcher()
        self._matcher = m
        for i, t in enumerate(output_ids):
            if not m.accept_token(t):
                logger.error("rebuilding a grammar state: output token %d (%d) is refused", i, t)
                self._broken = True
                return

    # ---- helpers -----------------------------------------------------------------------------------
    def _accept_all(self, tokens: Sequence[int]) -> int:
        m = self.matcher
        for i, t in enumerate(tokens):
            if not m.accept_token(t):
                return i
        return len(tokens)

    def _retokenize(self, last: int, forced: list[int]) -> tuple[bool, list[int]]:
        """The tokenizer's own tokens for the last sampled token's text followed by the forced text:
        the model would have written `","` rather than `"` and then `,"`. Returns whether the sampled
        token is replaced, and the tokens to append (starting with its replacement if so)."""
        b = self._backend
        data = b.token_bytes([last]) + b.token_bytes(forced)
        new = b.tokenize_bytes(data)
        if not new or b.token_bytes(new) != data:
            return False, forced
        if new[0] == last:
            return (False, new[1:]) if len(new) > 1 else (False, forced)
        return True, new
