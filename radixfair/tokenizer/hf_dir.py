"""A Hugging Face tokenizer folder (tokenizer.json and the config files around it) -> a `TokenizerSpec`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from radixfair.tokenizer.spec import TokenizerSpec, unique_ids


def read_hf_dir(path: str | os.PathLike[str]) -> TokenizerSpec:
    """Read tokenizer.json (+ tokenizer_config.json, chat_template.*, generation_config.json) of a HF dir."""
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

    return TokenizerSpec(
        backend,
        bos_token_id=bos_id,
        eos_token_ids=unique_ids(eos_ids),
        pad_token_id=pad_id,
        unk_token_id=unk_id,
        chat_templates=templates,
        add_bos_token=add_bos,
    )


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
