"""What the router reads of a request body to route it: the prompt's token ids (in the model's
tokenizer, so that prefixes match the workers' caches) and the output tokens to expect.

Reading is best effort and never refuses a request: a body the router cannot read is routed with
no prompt (by load) and the worker answers it, so a bad request gets exactly the worker's 4xx.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from radixfair.tokenizer import Tokenizer

DEFAULT_MAX_NEW_TOKENS = 128  # SamplingParams' default, when a body names none


def tokenizer_from_worker(info: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer a worker's `GET /get_tokenizer` describes."""
    return Tokenizer(HFTokenizer.from_str(info["tokenizer_json"]), vocab_size=info.get("vocab_size"),
                     bos_token_id=info.get("bos_token_id"), eos_token_ids=info.get("eos_token_ids") or (),
                     pad_token_id=info.get("pad_token_id"), unk_token_id=info.get("unk_token_id"),
                     chat_templates=info.get("chat_templates") or {}, add_bos_token=bool(info.get("add_bos_token")))


def load_tokenizer(path: str) -> Tokenizer:
    """`--tokenizer-path`: a .gguf file, a folder with tokenizer.json, or a cached repo id."""
    if not os.path.exists(path):
        from radixfair.engine.loaders.hub import locate_model  # only for a repo id: the hub lookup

        path = locate_model(path).path
    if path.lower().endswith(".gguf"):
        return Tokenizer.from_gguf(path)
    return Tokenizer.from_hf_dir(path)


def _first(x: Any) -> Any:
    """The first prompt of a batch (the router routes a batch as one request, by its first prompt)."""
    if isinstance(x, list) and x and isinstance(x[0], (list, str)):
        return x[0]
    return x


def _ids(x: Any) -> tuple[int, ...] | None:
    if isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
        return tuple(x)
    return None


def prompt_tokens(tokenizer: Tokenizer | None, path: str, body: Any) -> tuple[int, ...]:
    """The token ids of the (first) prompt of a `/generate`, `/v1/completions` or
    `/v1/chat/completions` body; () when there is no tokenizer yet or the body is not readable."""
    if not isinstance(body, dict):
        return ()
    try:
        if path == "/generate":
            if body.get("input_ids") is not None:
                return _ids(_first(body["input_ids"])) or ()
            text = _first(body.get("text"))
        elif path == "/v1/completions":
            prompt = _first(body.get("prompt"))
            if (ids := _ids(prompt)) is not None:
                return ids
            text = prompt
        else:
            messages = body.get("messages")
            if tokenizer is None or not isinstance(messages, list):
                return ()
            plain = [{**m, "content": _text_content(m.get("content"))} for m in messages if isinstance(m, dict)]
            text = tokenizer.apply_chat_template(plain)
        if tokenizer is None or not isinstance(text, str):
            return ()
        return tuple(tokenizer.encode(text))
    except Exception:  # a prompt the router cannot read is the worker's to refuse
        return ()


def _text_content(content: Any) -> str:
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def max_new_tokens(path: str, body: Any) -> int:
    """The output cap the request names (`sampling_params.max_new_tokens`, OpenAI's `max_tokens`)."""
    v: Any = None
    if isinstance(body, dict):
        if path == "/generate":
            sp = body.get("sampling_params")
            if isinstance(sp, list):
                sp = sp[0] if sp else None
            if isinstance(sp, dict):
                v = sp.get("max_new_tokens")
        else:
            v = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    return DEFAULT_MAX_NEW_TOKENS
