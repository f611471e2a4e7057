"""Text <-> token ids for the engine: tokenizers built from GGUF metadata or HF tokenizer files.

Three jobs live here:

* building a `tokenizers.Tokenizer` that reproduces what the model was trained with, either from the vocabulary
  a GGUF file carries (it has no tokenizer.json) or from a HF model directory;
* rendering chat templates exactly as `transformers` does, so prompts (and therefore prefix-cache hits) are
  byte-identical to what users of the HF stack get;
* streaming detokenization that never emits half a UTF-8 character and never drops the space in front of a word.

Nothing here needs torch, so the API server can tokenize without loading the model stack.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

if TYPE_CHECKING:
    import gguf

logger = logging.getLogger(__name__)

__all__ = ["IncrementalDetokenizer", "Tokenizer"]

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


# --------------------------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------------------------


class _GenerationTagExtension(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` and render its body unchanged.

    transformers uses this tag to compute assistant-token masks for training. We never need the mask, but
    templates that contain the tag must still compile and render the same text.
    """

    tags = {"generation"}  # noqa: RUF012 - jinja reads this class attribute by name

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    # Templates call this to reject conversations they cannot format (e.g. roles that don't alternate).
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers replaces jinja's tojson: jinja's escapes <, >, &, ' as \u00XX (HTML-safe) and sorts keys,
    # which would put different bytes into the prompt than the model saw in training.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    # Used by e.g. Llama-3.1 templates to print today's date in the system prompt.
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without exposing the `dict` type itself (no attribute walking from it)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's `namespace()` but refusing underscore attributes, as transformers does for untrusted templates."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}"
            )


@functools.lru_cache(maxsize=32)
def _compile_chat_template(source: str) -> jinja2.Template:
    # Chat templates come from model files, i.e. untrusted code: the immutable sandbox blocks attribute access to
    # Python internals and in-place mutation of the messages. trim_blocks/lstrip_blocks/loopcontrols and the
    # globals below are exactly transformers' environment, since templates are written (and tested) against it.
    # Compiling takes milliseconds, far more than rendering, so every Tokenizer sharing a template shares this.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTagExtension, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def _plain_template_data(value: Any) -> Any:
    """Rebuild `value` from plain JSON-like types, as transformers does before rendering.

    Objects with methods the sandbox doesn't know about (pydantic models, numpy scalars, ...) could otherwise be
    reached from the template; converting also makes `tojson` output identical to transformers'.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, numpy strings) would carry their extra methods along
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_template_data(k): _plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(v) for v in value)
    if type(value).__module__ == "numpy" and callable(getattr(value, "item", None)):
        # numpy scalars: np.bool_(False) would otherwise become a truthy placeholder string.
        return _plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _normalize_message(message: Any) -> dict[str, Any]:
    if callable(getattr(message, "model_dump", None)):
        message = message.model_dump()
    elif dataclasses.is_dataclass(message) and not isinstance(message, type):
        message = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    if not isinstance(message, Mapping):
        raise TypeError(f"Chat messages must be dicts, got {message!r}")
    # OpenAI-style clients send `content=None` / `tool_calls=None`; many templates test `is defined` and would
    # print "None", so (like transformers) a None value counts as an absent key.
    plain: dict[str, Any] = _plain_template_data({k: v for k, v in message.items() if v is not None})
    # Different APIs name the reasoning text differently; templates read `reasoning_content` (or `thinking`).
    reasoning = next((plain[k] for k in _REASONING_FIELDS if plain.get(k) is not None), None)
    if reasoning is not None:
        plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
    return plain


# --------------------------------------------------------------------------------------------------------------
# GGUF metadata
# --------------------------------------------------------------------------------------------------------------


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


def _unique(ids: Iterable[int | None]) -> tuple[int, ...]:
    out: list[int] = []
    for i in ids:
        if i is not None and i not in out:
            out.append(i)
    return tuple(out)


# --------------------------------------------------------------------------------------------------------------
# HF directories
# --------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"Invalid JSON in {path}: {e}") from e


def _token_content(tok: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as serialized AddedToken dicts.
    if isinstance(tok, str):
        return tok
    if isinstance(tok, Mapping) and isinstance(tok.get("content"), str):
        return str(tok["content"])
    return None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _split_templates(value: Any) -> dict[str, str]:
    """A chat_template setting as {name: source}; HF allows one string or a list of {name, template}."""
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {
            str(t["name"]): str(t["template"])
            for t in value
            if isinstance(t, Mapping) and "name" in t and "template" in t
        }
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    return {}


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


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
        reader, where = _gguf_reader(reader_or_path)
        model = _gguf_get(reader, "tokenizer.ggml.model")
        tokens: list[str] | None = _gguf_get(reader, "tokenizer.ggml.tokens")
        if model is None or not tokens:
            raise ValueError(
                f"{where} has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)"
            )
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

        return Tokenizer(
            backend,
            vocab_size=len(tokens),  # the embedding size; the backend may count duplicate spellings once
            bos_token_id=bos_id,
            eos_token_ids=_unique(eos_ids),
            pad_token_id=pad_id,
            unk_token_id=unk_id,
            chat_templates=templates,
            add_bos_token=bool(_gguf_get(reader, "tokenizer.ggml.add_bos_token", default_add_bos)),
        )

    @staticmethod
    def from_hf_dir(path: str | os.PathLike[str]) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json, chat_template.*, generation_config.json) from a HF dir."""
        root = Path(path)
        if root.is_file() and root.name == "tokenizer.json":
            root = root.parent
        if not root.is_dir():
            raise FileNotFoundError(f"Tokenizer directory not found: {root}")
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"No tokenizer.json in {root} (expected {tokenizer_file})")
        try:
            backend = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception for parse errors
            raise ValueError(f"Cannot load {tokenizer_file}: {e}") from e

        def optional_json(name: str) -> dict[str, Any]:
            p = root / name
            data = _read_json(p) if p.is_file() else {}
            return data if isinstance(data, dict) else {}

        config = optional_json("tokenizer_config.json")
        gen_config = optional_json("generation_config.json")
        model_config = optional_json("config.json")

        # Same precedence as transformers: chat_template.jinja (current format) over chat_template.json (the older
        # processor format) over the field in tokenizer_config.json.
        templates = _split_templates(config.get("chat_template"))
        legacy = optional_json("chat_template.json")
        if "chat_template" in legacy:
            templates.update(_split_templates(legacy["chat_template"]))
        jinja_file = root / "chat_template.jinja"
        if jinja_file.is_file():
            templates["default"] = jinja_file.read_text(encoding="utf-8")
        extra_dir = root / "additional_chat_templates"
        if extra_dir.is_dir():
            for f in sorted(extra_dir.glob("*.jinja")):
                templates[f.stem] = f.read_text(encoding="utf-8")

        def id_of(key: str) -> int | None:
            content = _token_content(config.get(key))
            return backend.token_to_id(content) if content is not None else None

        bos_id = id_of("bos_token")
        if bos_id is None:
            bos_id = next(
                iter(_as_id_list(gen_config.get("bos_token_id", model_config.get("bos_token_id")))), None
            )
        eos_ids: list[int | None] = [id_of("eos_token")]
        # generation_config.json is where chat models list their turn terminators (e.g. Llama-3's <|eot_id|>).
        eos_ids += _as_id_list(gen_config.get("eos_token_id"))
        eos_ids += _as_id_list(model_config.get("eos_token_id"))

        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            # No explicit flag: the tokenizer.json post-processor is the source of truth (Llama-3 adds BOS there).
            with_special = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(with_special) and with_special[0] == bos_id
        pad_id = id_of("pad_token")
        unk_id = id_of("unk_token")

        return Tokenizer(
            backend,
            bos_token_id=bos_id,
            eos_token_ids=_unique(eos_ids),
            pad_token_id=pad_id,
            unk_token_id=unk_id,
            chat_templates=templates,
            add_bos_token=add_bos,
        )

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
        if not messages:
            raise ValueError("Cannot apply a chat template to an empty conversation")
        template = _compile_chat_template(source)

        tool_schemas: list[Any] | None = None
        if tools is not None:
            tool_schemas = []
            for tool in tools:
                if not isinstance(tool, Mapping):
                    raise TypeError(f"Tools must be JSON-schema dicts, got {tool!r}")
                tool_schemas.append(_plain_template_data(tool))

        variables: dict[str, Any] = {}
        # transformers exposes every named special token as a string; templates use bos_token most.
        for name, tid in (
            ("bos_token", self.bos_token_id),
            ("eos_token", self.eos_token_ids[0] if self.eos_token_ids else None),
            ("unk_token", self.unk_token_id),
            ("pad_token", self.pad_token_id),
        ):
            tok = self.id_to_token(tid) if tid is not None else None
            if tok is not None:
                variables[name] = tok
        variables.update(_plain_template_data(kwargs))
        documents = variables.pop("documents", None)
        return template.render(
            messages=[_normalize_message(m) for m in messages],
            tools=tool_schemas,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )


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
