"""What a tokenizer source (GGUF metadata, a HF folder) yields: the backend and the model-level facts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tokenizers import Tokenizer as HFTokenizer


@dataclass(frozen=True)
class TokenizerSpec:
    backend: HFTokenizer
    vocab_size: int | None = None  # None: the backend's size, added tokens included
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    unk_token_id: int | None = None
    chat_templates: dict[str, str] = field(default_factory=dict)
    add_bos_token: bool = False


def unique_ids(ids: Iterable[int | None]) -> tuple[int, ...]:
    """The ids that are not None, first occurrence first."""
    out: list[int] = []
    for i in ids:
        if i is not None and i not in out:
            out.append(i)
    return tuple(out)
