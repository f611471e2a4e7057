"""Hugging Face folders: config.json plus safetensors weights, one file or shards listed in an index."""

from __future__ import annotations

import json
import os
import re

import torch

from radixfair.engine.loaders.errors import ModelLoadError
from radixfair.engine.model_config import ModelConfig

# HF tensors that carry no learned weights (rotary caches written by old checkpoints); dropped on load.
_HF_IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def inspect_hf(folder: str, shown: str) -> ModelConfig:
    """The config of the model folder `folder` (`shown`: the path as the user gave it, for error messages)."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(
            f"model folder {shown!r} has no config.json: expected a Hugging Face model folder "
            "(config.json + *.safetensors)"
        )
    try:
        with open(cfg_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {cfg_path!r} in model folder {shown!r}: {e}") from e
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{cfg_path!r} in model folder {shown!r} is not a JSON object")
    if raw.get("mlp_bias"):
        raise ModelLoadError(f"model folder {shown!r} uses mlp_bias=True, which is not supported")
    try:
        config = ModelConfig.from_hf_dict(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(
            f"model folder {shown!r} has an unsupported config.json ({e}): expected a llama, mistral, "
            "qwen2 or qwen3 model with num_attention_heads, hidden_size, intermediate_size, num_hidden_layers, vocab_size"
        ) from e
    _safetensors_files(folder, shown)  # fail now, not at load time, if the weights are absent
    return config


def _safetensors_files(folder: str, shown: str) -> list[str]:
    """The safetensors files holding the model, sharded (via the index) or not."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(
                f"cannot read the shard index {index_path!r} of model folder {shown!r}: {e}"
            ) from e
        files = [os.path.join(folder, n) for n in names]
        absent = [n for n, p in zip(names, files, strict=True) if not os.path.isfile(p)]
        if absent:
            raise ModelLoadError(
                f"model folder {shown!r} lacks shards {absent} listed in model.safetensors.index.json"
            )
        return files
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not found:
        raise ModelLoadError(
            f"model folder {shown!r} has no *.safetensors weights: expected model.safetensors or shards "
            "listed in model.safetensors.index.json (PyTorch .bin checkpoints are not supported)"
        )
    return found


def load_hf(folder: str, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights of the model folder `folder`, converted to `dtype`."""
    from safetensors import SafetensorError, safe_open

    state: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(folder, folder):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    if _HF_IGNORED_RE.search(key):
                        continue
                    # Some tied checkpoints still store lm_head; the model reuses the embedding anyway.
                    if key == "lm_head.weight" and config.tie_word_embeddings:
                        continue
                    # Convert tensor by tensor so a bf16 checkpoint never sits in memory twice in full.
                    state[key] = f.get_tensor(key).to(dtype)
        except (OSError, SafetensorError) as e:
            raise ModelLoadError(f"cannot read safetensors file {file!r}: {e}") from e
    return state
