"""Write a float32 GGUF file the way llama.cpp's convert_hf_to_gguf.py would lay it out.

Used to build tiny GGUF models for tests (and to convert small HF checkpoints), so that the GGUF loader
is exercised against files with known weights, including llama.cpp's q/k permutation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from radixfair.engine.loaders.gguf import llama3_rope_factors, permute_qk
from radixfair.engine.loaders.shapes import expected_shapes
from radixfair.engine.model_config import ModelConfig

# HF name fragment -> llama.cpp name fragment (inverse of the loader's mapping).
_HF_GLOBAL_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
_HF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}

# llama.cpp token types (gguf.TokenType values).
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5


def gguf_arch(config: ModelConfig) -> str:
    """GGUF architecture name: llama.cpp writes Mistral models as 'llama'."""
    return "qwen2" if config.architecture == "qwen2" else "llama"


def hf_to_gguf_name(name: str) -> str:
    """HF tensor name -> llama.cpp tensor name; ValueError for names outside the supported model."""
    stem, _, kind = name.rpartition(".")
    if stem in _HF_GLOBAL_NAMES:
        return f"{_HF_GLOBAL_NAMES[stem]}.{kind}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[3] in _HF_LAYER_NAMES:
        return f"blk.{parts[2]}.{_HF_LAYER_NAMES[parts[3]]}.{kind}"
    raise ValueError(f"no GGUF name for tensor {name!r}")


def write_gguf(
    path: str | os.PathLike[str],
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    tokenizer_json_path: str | None = None,
    chat_template: str | None = None,
    *,
    name: str = "radixfair-test-model",
    tokenizer_pre: str = "gpt2",
    add_bos_token: bool | None = None,
) -> None:
    """Write `state_dict` (HF names) and `config` as an all-F32 GGUF file at `path`.

    `tokenizer_json_path` (a Hugging Face tokenizers `tokenizer.json` holding a BPE model) adds the
    tokenizer.ggml.* vocabulary keys; without it the file has weights and hyper-parameters only.
    """
    import gguf

    arch = gguf_arch(config)
    required, optional = expected_shapes(config)
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"state_dict lacks tensors required by the config: {missing[:3]}")

    writer = gguf.GGUFWriter(os.fspath(path), arch)
    writer.add_name(name)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    rs = config.rope_scaling
    if rs.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rs.factor)
    if config.bos_token_id is not None:
        writer.add_bos_token_id(int(config.bos_token_id))
    if config.eos_token_ids:
        writer.add_eos_token_id(int(config.eos_token_ids[0]))
    if add_bos_token is not None:
        writer.add_add_bos_token(add_bos_token)
    if tokenizer_json_path is not None:
        _add_tokenizer(writer, tokenizer_json_path, config.vocab_size, tokenizer_pre)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    for hf_name, tensor in state_dict.items():
        if hf_name not in required and hf_name not in optional:
            continue  # e.g. a tied lm_head or rotary caches: not part of the GGUF model
        t = tensor.detach().to(torch.float32).cpu()
        # llama.cpp runs 'llama' arch with interleaved (GPT-J style) rope, so its converter permutes
        # q/k rows; mirror it here so our test files look exactly like real converted ones.
        if arch == "llama" and ".self_attn.q_proj." in hf_name:
            t = permute_qk(t, config.num_attention_heads)
        elif arch == "llama" and ".self_attn.k_proj." in hf_name:
            t = permute_qk(t, config.num_key_value_heads)
        # GGUFWriter reverses numpy's shape itself, so the array is passed in torch order.
        writer.add_tensor(hf_to_gguf_name(hf_name), np.ascontiguousarray(t.numpy(), dtype=np.float32))
    if rs.rope_type == "llama3":
        factors = llama3_rope_factors(
            config.head_dim,
            config.rope_theta,
            rs.factor,
            rs.low_freq_factor,
            rs.high_freq_factor,
            rs.original_max_position_embeddings,
        )
        writer.add_tensor("rope_freqs.weight", factors)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tokenizer(writer: Any, tokenizer_json_path: str, vocab_size: int, pre: str) -> None:
    """Best-effort llama.cpp 'gpt2' (byte-level BPE) vocabulary from a tokenizers tokenizer.json."""
    with open(tokenizer_json_path, encoding="utf-8") as f:
        tok: dict[str, Any] = json.load(f)
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(
            f"{tokenizer_json_path!r}: only BPE tokenizers can be written, got {model.get('type')!r}"
        )
    by_id: dict[int, str] = {int(i): s for s, i in model.get("vocab", {}).items()}
    types: dict[int, int] = {}
    for added in tok.get("added_tokens", []):
        by_id[int(added["id"])] = str(added["content"])
        types[int(added["id"])] = _TOKEN_CONTROL if added.get("special") else _TOKEN_USER_DEFINED
    # llama.cpp requires one token per embedding row; fill holes and the tail as it does, with [PADn].
    size = max(vocab_size, max(by_id, default=-1) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    token_types = [types.get(i, _TOKEN_NORMAL if i in by_id else _TOKEN_UNUSED) for i in range(size)]
    # tokenizers writes merges as "a b" strings (older) or [a, b] pairs (newer); GGUF wants "a b".
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    if merges:
        writer.add_token_merges(merges)
