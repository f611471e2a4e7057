"""The interface between the engine and a grammar library (structured outputs).

A backend compiles a request's constraint (a regex, a JSON schema or an EBNF grammar) into a
`Grammar`, from which each request gets its own `GrammarMatcher`: the state of one output, advanced
token by token. Token masks are bitmasks in the layout llguidance, xgrammar and outlines-core share:
int32 words, token `t` allowed when bit `t % 32` of word `t // 32` is set.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from radixfair.tokenizer import Tokenizer

GrammarKind = Literal["regex", "json_schema", "ebnf"]
Bitmask = npt.NDArray[np.int32]

# JSON output is compact (no whitespace between tokens, `,` and `:` as separators): with optional
# whitespace nothing between a value and the next key would be forced, so there would be nothing to
# jump over, and a model could pad with whitespace until max_new_tokens.
JSON_ITEM_SEPARATOR = ","
JSON_KEY_SEPARATOR = ":"


class GrammarError(ValueError):
    """The request's constraint cannot be served; the message starts with the field ("regex: ...")."""


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint as a request gives it: the `SamplingParams` field and its text."""

    kind: GrammarKind
    text: str


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(rows: int, vocab_size: int) -> Bitmask:
    return np.zeros((rows, bitmask_words(vocab_size)), dtype=np.int32)


def token_bits(token_ids: Sequence[int], vocab_size: int) -> Bitmask:
    """A one-row bitmask with exactly `token_ids` set."""
    words = np.zeros(bitmask_words(vocab_size), dtype=np.uint32)
    for t in token_ids:
        words[t // 32] |= np.uint32(1 << (t % 32))
    return words.view(np.int32).reshape(1, -1)


class GrammarMatcher(Protocol):
    """One output's position in its grammar."""

    def accept_token(self, token_id: int) -> bool:
        """Advance over `token_id`; False, with the state unchanged, if the grammar forbids it."""
        ...

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens."""
        ...

    def fill_bitmask(self, bitmask: Bitmask, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]` (the stop tokens where the grammar may end)."""
        ...

    def is_terminated(self) -> bool:
        """The grammar is complete and allows nothing more (a stop token at most)."""
        ...

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces from here, not yet accepted; [] when the next token is a choice."""
        ...


class Grammar(Protocol):
    """A compiled constraint; cheap to start matchers from."""

    def matcher(self) -> GrammarMatcher: ...


def encode_utf8(tokenizer: Tokenizer, data: bytes) -> list[int] | None:
    """`tokenizer`'s tokens for `data`, or None where `data` is not whole UTF-8 (a cut character): a
    `GrammarBackend.tokenize_bytes` for libraries that do not tokenize bytes themselves."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return tokenizer.encode(text, add_special_tokens=False)


class GrammarBackend(ABC):
    """A grammar library bound to one model's vocabulary."""

    name: str = "base"

    @abstractmethod
    def compile(self, spec: GrammarSpec) -> Grammar:
        """Compile `spec`; GrammarError naming the field and the library's message if it cannot be."""

    def fill_bitmasks(self, matchers: Sequence[GrammarMatcher], bitmask: Bitmask) -> None:
        """The next-token masks of `matchers` into `bitmask` rows 0..len-1 (a backend may batch them)."""
        for i, m in enumerate(matchers):
            m.fill_bitmask(bitmask, i)

    @abstractmethod
    def token_bytes(self, token_ids: Sequence[int]) -> bytes:
        """The bytes these tokens stand for in the output."""

    @abstractmethod
    def tokenize_bytes(self, data: bytes) -> list[int] | None:
        """The tokenizer's own tokenization of `data`, or None where it cannot say (e.g. a cut UTF-8
        character); used to re-tokenize a jump-forward at its boundary."""
