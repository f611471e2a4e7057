"""Tensor names and shapes a model config implies; the check that a state dict has exactly those."""

from __future__ import annotations

import torch

from radixfair.engine.loaders.errors import ModelLoadError
from radixfair.engine.model_config import ModelConfig


def expected_shapes(config: ModelConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(required, optional) tensor name -> shape for `config`, in HF naming."""
    h, hd = config.hidden_size, config.head_dim
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd
    inter = config.intermediate_size
    required: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    optional: dict[str, tuple[int, ...]] = {}
    if not config.tie_word_embeddings:
        required["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        required.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q_out, h),
                p + "self_attn.k_proj.weight": (kv_out, h),
                p + "self_attn.v_proj.weight": (kv_out, h),
                p + "self_attn.o_proj.weight": (h, q_out),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
            }
        )
        biases = {
            p + "self_attn.q_proj.bias": (q_out,),
            p + "self_attn.k_proj.bias": (kv_out,),
            p + "self_attn.v_proj.bias": (kv_out,),
        }
        if config.attention_bias:
            required.update(biases)
        if config.qk_norm:
            required[p + "self_attn.q_norm.weight"] = (hd,)
            required[p + "self_attn.k_norm.weight"] = (hd,)
        # HF Llama with attention_bias=True also biases o_proj; kept so the model code can see and use it.
        optional[p + "self_attn.o_proj.bias"] = (h,)
    return required, optional


def check_state_dict(state: dict[str, torch.Tensor], config: ModelConfig, path: str) -> None:
    """Raise `ModelLoadError` unless `state` holds every required tensor of `config`, all with the right shape."""
    required, optional = expected_shapes(config)
    missing = [k for k in required if k not in state]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ModelLoadError(f"model {path!r} lacks tensors {missing[:3]}{more} that its config requires")
    for name, t in state.items():
        want = required.get(name, optional.get(name))
        if want is None:
            raise ModelLoadError(f"model {path!r} has unexpected tensor {name!r}: unsupported model variant")
        if tuple(t.shape) != want:
            raise ModelLoadError(
                f"model {path!r}: tensor {name!r} has shape {list(t.shape)}, expected {list(want)} from its config"
            )
