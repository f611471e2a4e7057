"""GGUF `tokenizer.*` metadata -> a `tokenizers.Tokenizer` that reproduces what the model was trained with.

A GGUF file carries no tokenizer.json, only the vocabulary, its token types, the merges (or SentencePiece
scores) and the name of llama.cpp's pre-tokenizer; this rebuilds the equivalent HF tokenizer from those.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from radixfair.tokenizer.spec import TokenizerSpec, unique_ids

if TYPE_CHECKING:
    import gguf

logger = logging.getLogger(__name__)

# llama.cpp's token types (gguf.TokenType): only these change how a token is treated in text.
_TOKEN_TYPE_NORMAL = 1
_TOKEN_TYPE_UNKNOWN = 2
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4
_TOKEN_TYPE_UNUSED = 5  # padding rows past the real vocabulary (llama.cpp's [PADn])

# Split regexes of the pre-tokenizers llama.cpp names in `tokenizer.ggml.pre`. They are the patterns of the
# corresponding HF tokenizer.json files (and of transformers' GGUF loader); a different split changes which
# merges apply, so a wrong one silently produces different ids than the model was trained on.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRE_TOKENIZERS: dict[str, str] = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    "gpt-4o": _GPT4O_SPLIT,
    "llama4": _GPT4O_SPLIT,
}
# llama.cpp groups these: digits are split one by one, then the GPT-2 regex runs. HF expresses the same thing
# as Digits(individual_digits=True) + ByteLevel(use_regex=True), which is what SmolLM2's tokenizer.json holds.
_DIGITS_THEN_GPT2_PRE_TOKENIZERS = frozenset({"smollm", "starcoder", "refact"})
_GPT2_PRE_TOKENIZERS = frozenset({"gpt2", "default"})
# Llama-3 style vocabularies were built to look a whole pre-token up before merging (llama.cpp and the HF
# tokenizer.json both set ignore_merges for them); merging instead can pick a different segmentation.
_IGNORE_MERGES_PRE_TOKENIZERS = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe"})

# Control tokens llama.cpp treats as end-of-generation even when the file names a different eos id. A GGUF has no
# generation_config.json, so without this a chat model that ends its turn with e.g. <|eot_id|> while the file's
# eos is <|end_of_text|> would never stop.
_EOG_TOKEN_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "<|eom_id|>",
        "<｜end▁of▁sentence｜>",
    }
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


_BYTE_LEVEL_ALPHABET = frozenset(_bytes_to_unicode().values())


def read_gguf_vocab(reader_or_path: gguf.GGUFReader | str | os.PathLike[str]) -> TokenizerSpec:
    """The tokenizer described by a GGUF file's `tokenizer.*` metadata (a path, or an already open reader)."""
    reader, where = _gguf_reader(reader_or_path)
    model = _gguf_get(reader, "tokenizer.ggml.model")
    tokens: list[str] | None = _gguf_get(reader, "tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise ValueError(f"{where} has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    token_types: list[int] = list(_gguf_get(reader, "tokenizer.ggml.token_type") or [])
    raw_merges: list[str] | None = _gguf_get(reader, "tokenizer.ggml.merges")

    def token_id(key: str) -> int | None:
        value = _gguf_get(reader, f"tokenizer.ggml.{key}")
        # Some converters write -1 (as uint32 0xFFFFFFFF) for "none".
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    bos_id, eos_id = token_id("bos_token_id"), token_id("eos_token_id")
    unk_id, pad_id = token_id("unknown_token_id"), token_id("padding_token_id")

    if model not in ("gpt2", "llama"):
        raise ValueError(
            f"{where}: unsupported GGUF tokenizer model {model!r} (tokenizer.ggml.model); "
            "supported: 'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE)"
        )
    try:
        if model == "gpt2":
            pre = str(_gguf_get(reader, "tokenizer.ggml.pre", "default"))
            if raw_merges is None:
                raise ValueError("byte-level BPE vocabulary without tokenizer.ggml.merges")
            backend = _build_byte_level_bpe(tokens, token_types, _gguf_merges(raw_merges), pre)
            default_add_bos = False
        else:
            add_space_prefix = bool(_gguf_get(reader, "tokenizer.ggml.add_space_prefix", True))
            scores = _gguf_get(reader, "tokenizer.ggml.scores")
            backend = _build_sentencepiece_bpe(
                tokens, token_types, scores, raw_merges, unk_id, add_space_prefix
            )
            # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
            default_add_bos = True
    except Exception as e:  # tokenizers reports inconsistent vocab/merges as a bare Exception
        raise ValueError(f"{where}: invalid {model!r} tokenizer metadata: {e}") from e

    # Control tokens (and <unk>) are special: parsed whole from text and dropped by skip_special_tokens.
    # User-defined tokens (e.g. <think>) are parsed whole too but are ordinary text when decoding, which is
    # how both llama.cpp and transformers treat them.
    special: list[AddedToken] = []
    user: list[AddedToken] = []
    for i, tok in enumerate(tokens):
        ttype = token_types[i] if i < len(token_types) else _TOKEN_TYPE_NORMAL
        # unused padding tokens are special too, so that decoding drops them as llama.cpp does
        if ttype in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_UNUSED) or (
            ttype == _TOKEN_TYPE_UNKNOWN and model == "llama"
        ):
            special.append(AddedToken(tok, special=True, normalized=False))
        elif ttype == _TOKEN_TYPE_USER_DEFINED:
            user.append(AddedToken(tok, special=False, normalized=False))
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)

    eos_ids: list[int | None] = [eos_id, token_id("eot_token_id"), token_id("eom_token_id")]
    eos_ids += [
        i
        for i, tok in enumerate(tokens)
        if tok in _EOG_TOKEN_TEXTS and i < len(token_types) and token_types[i] == _TOKEN_TYPE_CONTROL
    ]

    templates: dict[str, str] = {}
    default_template = _gguf_get(reader, "tokenizer.chat_template")
    if isinstance(default_template, str):
        templates["default"] = default_template
    for name in _gguf_get(reader, "tokenizer.chat_templates") or []:
        source = _gguf_get(reader, f"tokenizer.chat_template.{name}")
        if isinstance(source, str):
            templates[str(name)] = source

    return TokenizerSpec(
        backend,
        vocab_size=len(tokens),  # the embedding size; the backend may count duplicate spellings once
        bos_token_id=bos_id,
        eos_token_ids=unique_ids(eos_ids),
        pad_token_id=pad_id,
        unk_token_id=unk_id,
        chat_templates=templates,
        add_bos_token=bool(_gguf_get(reader, "tokenizer.ggml.add_bos_token", default_add_bos)),
    )


def _gguf_reader(reader_or_path: gguf.GGUFReader | str | os.PathLike[str]) -> tuple[gguf.GGUFReader, str]:
    if not isinstance(reader_or_path, (str, os.PathLike)):
        # GGUFReader memory-maps the file; the memmap remembers the path, which makes errors point somewhere.
        filename = getattr(getattr(reader_or_path, "data", None), "filename", None)
        return reader_or_path, str(filename or "<GGUFReader>")
    path = os.fspath(reader_or_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    import gguf  # deferred: importing gguf pulls numpy and is only needed for this format

    try:
        return gguf.GGUFReader(path), path
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise ValueError(f"Cannot read {path} as a GGUF file: {e}") from e


def _gguf_get(reader: gguf.GGUFReader, name: str, default: Any = None) -> Any:
    field = reader.fields.get(name)
    if field is None:
        return default
    return field.contents()


def _gguf_merges(raw: Sequence[str]) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    for m in raw:
        # Pieces of both byte-level and SentencePiece vocabularies never contain a literal space (it is spelled
        # "Ġ" / "▁"), so the single space is an unambiguous separator.
        left, sep, right = m.partition(" ")
        if not sep or not left or not right:
            raise ValueError(f"Malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((left, right))
    return merges


def _merges_from_scores(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list[tuple[str, str]]:
    """Recover BPE merges from a SentencePiece vocabulary's piece scores (what transformers' converter does).

    SentencePiece BPE applies the merge producing the highest-scoring piece first, so every way of splitting a
    piece into two known pieces becomes a merge ranked by the piece's score. Ties are broken exactly as in
    `transformers.tokenization_utils_base.generate_merges` (longer left piece, longer right piece, then piece
    order, then the ids of the two halves), so both produce the same ids.
    """
    ranked: list[tuple[float, int, int, int, int, int, str, str]] = []
    for order, (piece, score) in enumerate(scores.items()):
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                ranked.append(
                    (-score, -len(left), -len(right), order, vocab[left], vocab[right], left, right)
                )
    ranked.sort(key=lambda r: r[:6])
    return [(r[6], r[7]) for r in ranked]


def _build_byte_level_bpe(
    tokens: Sequence[str], token_types: Sequence[int], merges: list[tuple[str, str]], pre: str
) -> HFTokenizer:
    spelling = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        ttype = token_types[i] if i < len(token_types) else _TOKEN_TYPE_NORMAL
        if (
            ttype not in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
            and not set(tok) <= _BYTE_LEVEL_ALPHABET
        ):
            # A normal token written with raw characters: respell it in the byte alphabet so BPE can reach it.
            # Control/user-defined tokens keep their raw text because they are matched verbatim in the input.
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        # First id wins on duplicates; every id still decodes through the added-token table or the byte decoder.
        vocab.setdefault(tok, i)

    bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES_PRE_TOKENIZERS)
    tk = HFTokenizer(bpe)
    if pre in _DIGITS_THEN_GPT2_PRE_TOKENIZERS:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in _SPLIT_PRE_TOKENIZERS:
        # The Split carries the model's regex; ByteLevel then only maps bytes to the alphabet (use_regex=False),
        # otherwise GPT-2's regex would split the pieces a second time.
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PRE_TOKENIZERS[pre]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        if pre not in _GPT2_PRE_TOKENIZERS:
            logger.warning(
                "Unknown tokenizer.ggml.pre %r: falling back to the GPT-2 byte-level pre-tokenizer; token ids may "
                "differ from the model's own tokenizer",
                pre,
            )
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    return tk


def _build_sentencepiece_bpe(
    tokens: Sequence[str],
    token_types: Sequence[int],
    scores: Sequence[float] | None,
    raw_merges: Sequence[str] | None,
    unk_id: int | None,
    add_space_prefix: bool,
) -> HFTokenizer:
    """SentencePiece BPE ('llama' GGUF vocabularies) the way transformers' Llama tokenizer builds it."""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    if raw_merges:
        merges = _gguf_merges(raw_merges)
    elif scores is not None and len(scores) == len(tokens):
        # Only pieces that BPE may produce take part; control/byte/unused tokens would add bogus merges.
        mergeable = {
            tok: float(scores[i])
            for i, tok in enumerate(tokens)
            if (token_types[i] if i < len(token_types) else _TOKEN_TYPE_NORMAL)
            in (_TOKEN_TYPE_NORMAL, _TOKEN_TYPE_USER_DEFINED)
        }
        merges = _merges_from_scores(vocab, mergeable)
    else:
        raise ValueError("SentencePiece GGUF vocabulary has neither tokenizer.ggml.merges nor usable scores")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    # byte_fallback: characters outside the vocabulary become <0xXX> byte tokens instead of <unk>.
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    tk = HFTokenizer(bpe)
    tk.normalizer = None
    # prepend_scheme="first": the dummy-prefix space goes in front of the text only, not after every special
    # token (transformers' non-legacy Llama behaviour).
    tk.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps: list[decoders.Decoder] = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1))  # undo the dummy prefix
    tk.decoder = decoders.Sequence(steps)
    return tk
