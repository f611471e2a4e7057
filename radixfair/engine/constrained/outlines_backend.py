"""outlines-core: a regex (a JSON schema is first turned into one) compiled into a token-level DFA
over the whole vocabulary; masks are then lookups. No context-free grammars (`ebnf`), and a JSON
schema's numeric bounds (minimum, maximum) are not enforced by its regex."""

from __future__ import annotations

from collections.abc import Sequence

import outlines_core
from outlines_core.json_schema import build_regex_from_schema

from radixfair.engine.constrained.base import (
    Bitmask,
    GrammarBackend,
    GrammarError,
    GrammarMatcher,
    GrammarSpec,
    encode_utf8,
)
from radixfair.tokenizer import Tokenizer

MAX_FORCED_TOKENS = 64  # forced tokens probed per step (each probe is an advance + rollback)


def _gpt2_byte_decoder() -> dict[str, int]:
    """Byte-level BPE spells byte b as a printable character (GPT-2's table); this inverts it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    byte_values = list(printable)
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(byte_values, chars, strict=True)}


def token_bytes_table(tokenizer: Tokenizer, vocab_size: int) -> list[bytes | None]:
    """Each token's output bytes; None for special tokens and ids the tokenizer does not know.
    Byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen) and SentencePiece byte fallback (Llama 2)."""
    backend = tokenizer.backend_tokenizer
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    decoder = _gpt2_byte_decoder()
    out: list[bytes | None] = []
    for i in range(vocab_size):
        piece = backend.id_to_token(i)
        if piece is None or piece in special:
            out.append(None)
        elif all(c in decoder for c in piece):
            out.append(bytes(decoder[c] for c in piece))
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out


class OutlinesMatcher:
    def __init__(self, guide: outlines_core.Guide, eos: int) -> None:
        self._g = guide
        self._eos = eos

    def accept_token(self, token_id: int) -> bool:
        try:
            self._g.advance(token_id, return_tokens=False)
        except ValueError:  # no transition: the state is unchanged
            return False
        return True

    def rollback(self, num_tokens: int) -> None:
        self._g.rollback_state(num_tokens)

    def fill_bitmask(self, bitmask: Bitmask, row: int) -> None:
        target = bitmask[row]
        self._g.write_mask_into(target.ctypes.data, target.size, 4)

    def is_terminated(self) -> bool:
        return bool(self._g.is_finished()) and list(self._g.get_tokens()) == [self._eos]

    def forced_tokens(self) -> list[int]:
        forced: list[int] = []
        while len(forced) < MAX_FORCED_TOKENS:
            allowed = self._g.get_tokens()
            if len(allowed) != 1 or allowed[0] == self._eos:
                break
            forced.append(allowed[0])
            self._g.advance(allowed[0], return_tokens=False)
        if forced:
            self._g.rollback_state(len(forced))
        return forced


class OutlinesGrammar:
    def __init__(self, index: outlines_core.Index, eos: int) -> None:
        self._index = index
        self._eos = eos

    def matcher(self) -> GrammarMatcher:
        return OutlinesMatcher(outlines_core.Guide(self._index, max_rollback=MAX_FORCED_TOKENS + 1), self._eos)


class OutlinesBackend(GrammarBackend):
    name = "outlines"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self._bytes = token_bytes_table(tokenizer, vocab_size)
        self._eos = stop_token_ids[0]
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(self._bytes):
            if b and i not in stop_token_ids:
                by_bytes.setdefault(b, []).append(i)
        self._vocab = outlines_core.Vocabulary(self._eos, by_bytes)
        self._tokenizer = tokenizer

    def compile(self, spec: GrammarSpec) -> OutlinesGrammar:
        if spec.kind == "ebnf":
            raise GrammarError("ebnf: the outlines grammar backend takes regex and json_schema only")
        try:
            regex = spec.text if spec.kind == "regex" else build_regex_from_schema(spec.text, "")
            index = outlines_core.Index(regex, self._vocab)
        except (ValueError, TypeError, RuntimeError) as e:
            raise GrammarError(f"{spec.kind}: {e}") from e
        return OutlinesGrammar(index, self._eos)

    def token_bytes(self, token_ids: Sequence[int]) -> bytes:
        return b"".join(self._bytes[t] or b"" for t in token_ids)

    def tokenize_bytes(self, data: bytes) -> list[int] | None:
        return encode_utf8(self._tokenizer, data)
