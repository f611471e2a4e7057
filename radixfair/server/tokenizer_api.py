"""`GET /get_tokenizer`: the served model's tokenizer, for a router that routes by token prefixes
(`radixfair router` builds the same `Tokenizer` from it, so its prefixes match the worker's cache)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from radixfair.server.state import State

router = APIRouter()


@router.get("/get_tokenizer")
def get_tokenizer(state: State) -> dict[str, Any]:
    tok = state.engine.tokenizer
    return {"tokenizer_json": tok.backend_tokenizer.to_str(), "vocab_size": tok.vocab_size,
            "bos_token_id": tok.bos_token_id, "eos_token_ids": list(tok.eos_token_ids),
            "pad_token_id": tok.pad_token_id, "unk_token_id": tok.unk_token_id,
            "add_bos_token": tok.add_bos_token, "chat_templates": tok.chat_templates}
