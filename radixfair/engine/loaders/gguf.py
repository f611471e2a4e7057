"""GGUF files: model config from the metadata; llama.cpp tensor names and layouts -> Hugging Face ones."""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Any

import numpy as np
import torch

from radixfair.engine.loaders.errors import ModelLoadError
from radixfair.engine.model_config import ModelConfig, RopeScaling

# GGUF architecture names we can run. Mistral GGUFs are written with arch "llama" by llama.cpp.
SUPPORTED_GGUF_ARCHS = ("llama", "qwen2", "qwen3")

# llama.cpp tensor name -> HF name. Per-layer names are matched on the part after "blk.N.".
_GGUF_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GGUF_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")
# llama.cpp stores llama3-style rope scaling as a precomputed per-frequency divisor tensor.
_GGUF_ROPE_FREQS = "rope_freqs.weight"

# GGUF general.file_type values whose float weights are stored in 16 bit; anything quantized dequantizes
# to float32, so float32 is the honest `torch_dtype` hint for those.
_GGUF_FILE_TYPE_DTYPE = {0: "float32", 1: "float16", 32: "bfloat16"}


def open_gguf(path: str) -> Any:
    """The (cached) `gguf.GGUFReader` of `path`, so the tokenizer reuses the parse of the weights."""
    return _open_gguf(path, path)


def _open_gguf(path: str, shown: str) -> Any:
    try:
        st = os.stat(path)
        return _cached_reader(path, st.st_size, st.st_mtime_ns)
    except Exception as e:  # the reader raises ValueError, struct errors, IndexError... on corrupt files
        raise ModelLoadError(f"cannot read {shown!r} as a GGUF file ({type(e).__name__}: {e})") from e


@functools.lru_cache(maxsize=1)
def _cached_reader(path: str, size: int, mtime_ns: int) -> Any:
    # Parsing the metadata of a real model (~100k vocabulary strings) takes seconds in GGUFReader, and
    # inspect_model + load_state_dict would otherwise parse it twice. Size and mtime are part of the key
    # so a rewritten file is parsed afresh; one entry keeps at most one file memory-mapped.
    import gguf

    del size, mtime_ns
    return gguf.GGUFReader(path, "r")


def _field(reader: Any, key: str) -> Any:
    """A scalar or string metadata value, or None when the key is absent."""
    import gguf

    field = reader.fields.get(key)
    if field is None or not field.types:
        return None
    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.ARRAY:
        return None  # arrays are read with _array_len / directly where needed
    part = field.parts[field.data[0]]
    if vtype == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    value = part[0]
    return bool(value) if vtype == gguf.GGUFValueType.BOOL else value.item()


def _array_len(reader: Any, key: str) -> int | None:
    field = reader.fields.get(key)
    return None if field is None else len(field.data)


def inspect_gguf(path: str, shown: str) -> ModelConfig:
    """The config of the GGUF file `path` (`shown`: the path as the user gave it, for error messages)."""
    reader = _open_gguf(path, shown)
    return _gguf_config(reader, shown)


def _gguf_config(reader: Any, shown: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ModelLoadError(
            f"GGUF file {shown!r} has unsupported architecture {arch!r}: expected one of {list(SUPPORTED_GGUF_ARCHS)}"
        )

    def req(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ModelLoadError(f"GGUF file {shown!r} lacks metadata key '{arch}.{key}'")
        return value

    def opt(key: str) -> Any:
        return _field(reader, f"{arch}.{key}")

    hidden = int(req("embedding_length"))
    n_heads = int(req("attention.head_count"))
    n_kv = opt("attention.head_count_kv")
    head_dim = opt("attention.key_length") or opt("rope.dimension_count") or hidden // n_heads
    vocab = opt("vocab_size") or _array_len(reader, "tokenizer.ggml.tokens")
    tensor_names = {t.name for t in reader.tensors}
    if vocab is None:
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if embd is None:
            raise ModelLoadError(f"GGUF file {shown!r} has neither a vocabulary size nor token_embd.weight")
        vocab = int(embd.shape[-1])  # reader shapes are reversed: [hidden, vocab]
    rope_theta = float(opt("rope.freq_base") or 10000.0)
    eos_ids: list[int] = []
    # llama.cpp stops on both eos and eot (end of turn); keep eos first as the canonical one.
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        tok = _field(reader, key)
        if tok is not None and int(tok) not in eos_ids:
            eos_ids.append(int(tok))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    file_type = _field(reader, "general.file_type")
    return ModelConfig(
        architecture=str(arch),
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(req("feed_forward_length")),
        num_hidden_layers=int(req("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(n_kv or n_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(opt("attention.layer_norm_rms_epsilon") or 1e-5),
        rope_theta=rope_theta,
        rope_scaling=_gguf_rope_scaling(reader, str(arch), int(head_dim), rope_theta, shown),
        max_position_embeddings=int(opt("context_length") or 4096),
        tie_word_embeddings="output.weight" not in tensor_names,
        # qwen2 always has q/k/v biases; for llama it is whatever the file carries.
        attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensor_names,
        qk_norm=arch == "qwen3",
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos_ids),
        torch_dtype=_GGUF_FILE_TYPE_DTYPE.get(int(file_type) if file_type is not None else 0, "float32"),
    )


def llama3_rope_factors(
    head_dim: int,
    rope_theta: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> np.ndarray:
    """Per-frequency divisors of llama3 rope scaling, as llama.cpp's converter stores in rope_freqs.weight."""
    freqs = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _gguf_rope_scaling(reader: Any, arch: str, head_dim: int, rope_theta: float, shown: str) -> RopeScaling:
    scaling_type = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    orig_ctx = _field(reader, f"{arch}.rope.scaling.original_context_length")
    if scaling_type == "linear" and factor:
        kwargs: dict[str, Any] = {"rope_type": "linear", "factor": float(factor)}
        if orig_ctx:
            kwargs["original_max_position_embeddings"] = int(orig_ctx)
        return RopeScaling(**kwargs)
    if scaling_type not in (None, "none", "linear"):
        raise ModelLoadError(
            f"GGUF file {shown!r} uses rope scaling {scaling_type!r}: only linear and llama3 are supported"
        )
    rope_freqs = next((t for t in reader.tensors if t.name == _GGUF_ROPE_FREQS), None)
    if rope_freqs is None:
        return RopeScaling()
    # The file only stores the resulting divisors, not llama3's parameters. Llama 3.1/3.2 all use
    # low=1, high=4, original context 8192 (and llama.cpp's converter hard-codes 8192), so assume
    # those, take the factor from the largest divisor, and refuse the file if that does not
    # reproduce the stored divisors: running with the wrong rope would silently degrade output.
    stored = np.asarray(_dequantize(rope_freqs), dtype=np.float32).reshape(-1)
    guess = RopeScaling(
        rope_type="llama3",
        factor=float(stored.max()),
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=int(orig_ctx or 8192),
    )
    rebuilt = llama3_rope_factors(
        head_dim,
        rope_theta,
        guess.factor,
        guess.low_freq_factor,
        guess.high_freq_factor,
        guess.original_max_position_embeddings,
    )
    if rebuilt.shape != stored.shape or not np.allclose(rebuilt, stored, rtol=1e-3, atol=1e-4):
        raise ModelLoadError(
            f"GGUF file {shown!r} has a rope_freqs tensor that is not llama3 scaling with low_freq_factor=1, "
            "high_freq_factor=4: unsupported rope scaling"
        )
    return guess


def _dequantize(tensor: Any) -> np.ndarray:
    """A reader tensor as a float32 array in torch order ([out, in]); reader shapes are reversed."""
    import gguf

    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    # F(16/32) tensors come back as views of the read-only memmap, which torch must not share: copy
    # those; dequantized ones are fresh arrays already.
    copy = isinstance(data, np.memmap) or not data.flags.writeable
    return np.array(data, dtype=np.float32, copy=True if copy else None).reshape(shape)


def _gguf_to_hf_name(name: str) -> str | None:
    m = _GGUF_LAYER_RE.match(name)
    if m is not None:
        layer, part, kind = m.groups()
        hf = _GGUF_LAYER_NAMES.get(part)
        return None if hf is None else f"model.layers.{layer}.{hf}.{kind}"
    m = _GGUF_GLOBAL_RE.match(name)
    if m is not None:
        part, kind = m.groups()
        hf = _GGUF_GLOBAL_NAMES.get(part)
        return None if hf is None else f"{hf}.{kind}"
    return None


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate_half layout -> llama.cpp's interleaved rope layout (what convert_hf_to_gguf.py does).

    Works on weights [out, in] and biases [out]: rows are regrouped per head, dim 0 only.
    """
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `permute_qk`: llama.cpp's interleaved rope layout -> HF rotate_half layout."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_matrix_types(path: str) -> dict[str, int]:
    """How many of the file's matrices (2-D tensors) are stored in each type (`Q4_1`, `Q8_0`, `F16`...)."""
    reader = _open_gguf(path, path)
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        if len(tensor.shape) == 2:
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def load_gguf(path: str, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights of the GGUF file `path` with HF names and the HF q/k layout, dequantized to `dtype`."""
    reader = _open_gguf(path, path)
    # Only llama-arch GGUFs have permuted q/k (llama.cpp's Qwen2 and Qwen3 converters keep the HF
    # layout, since ggml runs them with NEOX-style rope, which is rotate_half).
    permute = config.architecture == "llama"
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.name == _GGUF_ROPE_FREQS:
            continue  # already folded into config.rope_scaling by inspect_model
        hf_name = _gguf_to_hf_name(tensor.name)
        if hf_name is None:
            raise ModelLoadError(
                f"GGUF file {path!r} has unexpected tensor {tensor.name!r}: unsupported model variant"
            )
        try:
            arr = _dequantize(tensor)
        except (NotImplementedError, ValueError) as e:
            raise ModelLoadError(
                f"GGUF file {path!r}: cannot dequantize {tensor.name!r} of type {tensor.tensor_type.name} ({e})"
            ) from e
        t = torch.from_numpy(arr)
        if permute and ".self_attn.q_proj." in hf_name:
            t = unpermute_qk(t, config.num_attention_heads)
        elif permute and ".self_attn.k_proj." in hf_name:
            t = unpermute_qk(t, config.num_key_value_heads)
        state[hf_name] = t.to(dtype)
    return state
