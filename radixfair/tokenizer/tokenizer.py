"""The `Tokenizer` facade: a `tokenizers.Tokenizer` plus the model-level facts the engine needs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer as HFTokenizer

from radixfair.tokenizer.chat_template import render_chat_template
from radixfair.tokenizer.detokenizer import IncrementalDetokenizer
from radixfair.tokenizer.gguf_vocab import read_gguf_vocab
from radixfair.tokenizer.hf_dir import read_hf_dir
from radixfair.tokenizer.spec import TokenizerSpec

if TYPE_CHECKING:
    import gguf


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the model-level facts the engine needs (bos/eos ids, chat template)."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        vocab_size: int | None = None,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        chat_template: str | None = None,
        chat_templates: Mapping[str, str] | None = None,
        add_bos_token: bool = False,
    ) -> None:
        self._backend = backend
        self.vocab_size: int = vocab_size if vocab_size is not None else backend.get_vocab_size(True)
        self.bos_token_id: int | None = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self.pad_token_id: int | None = pad_token_id
        self.unk_token_id: int | None = unk_token_id
        templates = dict(chat_templates or {})
        if chat_template is not None:
            templates["default"] = chat_template
        self.chat_templates: dict[str, str] = templates
        self.chat_template: str | None = templates.get("default")
        self.add_bos_token: bool = add_bos_token

    # ---------------------------------------------------------------- construction

    @staticmethod
    def from_gguf(reader_or_path: gguf.GGUFReader | str | os.PathLike[str]) -> Tokenizer:
        """Build the tokenizer described by a GGUF file's `tokenizer.*` metadata."""
        return Tokenizer._from_spec(read_gguf_vocab(reader_or_path))

    @staticmethod
    def from_hf_dir(path: str | os.PathLike[str]) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json, chat_template.*, generation_config.json) from a HF dir."""
        return Tokenizer._from_spec(read_hf_dir(path))

    @staticmethod
    def _from_spec(spec: TokenizerSpec) -> Tokenizer:
        return Tokenizer(
            spec.backend,
            vocab_size=spec.vocab_size,
            bos_token_id=spec.bos_token_id,
            eos_token_ids=spec.eos_token_ids,
            pad_token_id=spec.pad_token_id,
            unk_token_id=spec.unk_token_id,
            chat_templates=spec.chat_templates,
            add_bos_token=spec.add_bos_token,
        )

    def set_chat_template(self, source: str) -> None:
        """Use `source` for every chat, in place of the model's templates (named ones included)."""
        self.chat_templates = {"default": source}
        self.chat_template = source

    # ---------------------------------------------------------------- properties

    @property
    def backend_tokenizer(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (e.g. to save it as tokenizer.json)."""
        return self._backend

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary spelling of id `i` (byte-level pieces look like 'Ġthe'); None if out of range."""
        return self._backend.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. '<|im_start|>') become their ids."""
        # The backend's post-processor is bypassed so that BOS handling follows `add_bos_token` alone, the same
        # way for GGUF and HF models (and never appends an EOS, which would end generation immediately).
        ids: list[int] = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def incremental_detokenizer(
        self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- chat

    def special_token_strings(self) -> dict[str, str]:
        """The named special tokens as text (`bos_token`, `eos_token`, ...), the variables a chat
        template reads besides the messages."""
        # transformers exposes every named special token as a string; templates use bos_token most.
        out: dict[str, str] = {}
        for name, tid in (
            ("bos_token", self.bos_token_id),
            ("eos_token", self.eos_token_ids[0] if self.eos_token_ids else None),
            ("unk_token", self.unk_token_id),
            ("pad_token", self.pad_token_id),
        ):
            tok = self.id_to_token(tid) if tid is not None else None
            if tok is not None:
                out[name] = tok
        return out

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the model's chat template, byte-identical to transformers' output.

        Extra keyword arguments become template variables (e.g. `enable_thinking=False`, `documents=[...]`) and
        override bos_token/eos_token. A template named "tool_use" is preferred when tools are given, as in HF.
        """
        source = self.chat_templates.get("tool_use") if tools is not None else None
        source = source or self.chat_template
        if source is None:
            if self.chat_templates:
                raise ValueError(
                    f"No default chat template; available named templates: {sorted(self.chat_templates)}"
                )
            raise ValueError("This tokenizer has no chat template")

        variables: dict[str, Any] = self.special_token_strings()
        variables.update(kwargs)
        return render_chat_template(
            source, messages, add_generation_prompt=add_generation_prompt, tools=tools, variables=variables
        )
