"""Weight-only quantization: the layer against its own dequantized weights, the model against the
dequantized model, the real model's top-1 agreement, and what `--quantization auto` picks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_real_model
from fixtures.tiny_models import KQuantModel
from test_model import SeqState, prefill_batch, run_logits

from radixfair.engine.loaders import inspect_model, load_state_dict, weight_types
from radixfair.engine.model_runner import ModelRunner, RunnerConfig
from radixfair.engine.quant import (
    INT4_GROUP,
    NEVER,
    QuantLinear,
    dequantize_int4,
    quantize_int4,
    quantize_int8,
    resolve_quantization,
    tune_dense_switch,
)

# The quantized kernels run on 16-bit activations (see QuantLinear.kernel_dtype): against a float32
# product with the same (dequantized) weights they may differ by bf16 rounding of the inputs and
# output, ~2^-8 relative per term; summed over K terms of random sign that stays under this share
# of the output's scale.
KERNEL_RTOL = 0.02


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


def test_int8_codes_are_within_half_a_step_of_the_weights() -> None:
    w = _weights(96, 64)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())


def test_int4_codes_are_within_half_a_step_of_the_weights() -> None:
    w = _weights(96, 128)
    q, scale, zero = quantize_int4(w)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    deq = dequantize_int4(q, scale, zero, torch.float32)
    step = scale.repeat_interleave(INT4_GROUP, dim=1)
    assert bool(((deq - w).abs() <= step / 2 + 1e-6).all())
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_int4(_weights(16, 48))


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features", [96, 72])  # 72: not a multiple of 16, the int4 CPU packing's unit
def test_quantized_kernel_multiplies_by_the_dequantized_weights(kind: str, dtype: torch.dtype,
                                                                out_features: int) -> None:
    w, bias = _weights(out_features, 64), torch.randn(out_features) * 0.1
    layer = QuantLinear(w.to(dtype), bias.to(dtype), kind, dtype)
    deq = layer.dequantized().float()
    # the quantized model is near the float one: each weight within half a quantization step
    assert float((deq - w).abs().max()) < (0.05 * 4.5 / (15 if kind == "int4" else 127))
    x = torch.randn(5, 64).to(dtype)
    ref = F.linear(x.float(), deq, bias.to(dtype).float())
    got = layer(x).float()
    assert got.shape == (5, out_features)
    assert float((got - ref).abs().max()) <= KERNEL_RTOL * float(ref.abs().max())
    # without the dense copy the layer still knows its weights (read back through the kernel when its
    # packing is opaque: exact up to a rounding to the kernel's 16-bit dtype)
    lean = QuantLinear(w.to(dtype), bias.to(dtype), kind, dtype, keep_dense=False)
    assert lean.dense is None
    torch.testing.assert_close(lean.dequantized().float(), deq, rtol=2**-7, atol=2**-8 * float(deq.abs().max()))


def test_dense_copy_is_used_from_its_row_count_on() -> None:
    w = _weights(64, 64)
    layer = QuantLinear(w, None, "int4", torch.float32)
    assert layer.dense is not None
    layer.dense_min_rows = 8
    small, large = torch.randn(4, 64), torch.randn(8, 64)
    # the dense path is the float32 product exactly; the kernel's (bf16 activations) is not
    assert torch.equal(layer(large), F.linear(large, layer.dense))
    assert torch.equal(layer(small), layer.quantized_forward(small))
    assert layer.bytes_read(8) == 64 * 64 * 4
    assert layer.bytes_read(4) == layer.quantized_bytes() < 64 * 64 * 4 / 2
    layer.drop_dense()
    assert layer.dense is None and layer.bytes_read(8) == layer.quantized_bytes()


def test_tuning_sets_a_switch_per_shape_and_frees_unused_copies() -> None:
    layers = [QuantLinear(_weights(64, 64, s), None, "int8", torch.float32) for s in range(3)]
    found = tune_dense_switch(layers, reps=1)
    assert set(found) == {(64, 64, "int8")}
    switch = found[(64, 64, "int8")]
    for layer in layers:
        assert layer.dense_min_rows == switch
        assert (layer.dense is None) == (switch >= NEVER)


def test_a_layer_without_a_kernel_always_uses_its_dense_copy() -> None:
    # 72 outputs: not a multiple of 16, so no int4 CPU packing: the codes are dequantized per call
    layers = [QuantLinear(_weights(72, 64), None, "int4", torch.float32), QuantLinear(_weights(96, 64), None,
                                                                                      "int4", torch.float32)]
    assert not layers[0].has_kernel and layers[1].has_kernel
    tune_dense_switch(layers, reps=1)
    assert layers[0].dense is not None and layers[0].dense_min_rows == 1


def test_auto_keeps_the_gguf_family_and_is_none_for_safetensors() -> None:
    assert resolve_quantization("auto", "gguf", {"Q4_1": 210, "Q8_0": 1}).mode == "int4"
    assert resolve_quantization("auto", "gguf", {"Q4_K": 100, "Q6_K": 20}).mode == "int4"
    assert resolve_quantization("auto", "gguf", {"Q8_0": 211}).mode == "int8"
    assert resolve_quantization("auto", "gguf", {"Q6_K": 211}).mode == "int8"
    assert resolve_quantization("auto", "gguf", {"F32": 211}).mode == "none"
    assert resolve_quantization("auto", "hf", None).mode == "none"
    assert resolve_quantization("int8", "hf", None).mode == "int8"
    with pytest.raises(ValueError, match="--quantization"):
        resolve_quantization("fp8", "hf", None)


def _runner(path: Path, mode: str, dense_min_rows: int | None, dtype: torch.dtype = torch.float32) -> ModelRunner:
    files = inspect_model(str(path))
    sd = load_state_dict(files, dtype)
    return ModelRunner(files.config, sd, RunnerConfig(512, 8, 1024, mode, dense_min_rows), dtype,
                       torch.device("cpu"))


def _prefill_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    return run_logits(runner, prefill_batch([(SeqState(ids, 0, 0), 0, len(ids))]))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_matches_the_dequantized_model(tiny_llama_tied: Path, mode: str) -> None:
    """Same quantized weights through the kernels (small passes) and through the dense copy (the
    dequantized model): logits within KERNEL_RTOL of their scale, and the same argmax nearly everywhere."""
    ids = list(np.random.default_rng(0).integers(3, 200, 24))
    kernels = _prefill_logits(_runner(tiny_llama_tied, mode, NEVER), ids)
    dense = _prefill_logits(_runner(tiny_llama_tied, mode, 1), ids)
    assert float((kernels - dense).abs().max()) <= KERNEL_RTOL * float(dense.abs().max())
    assert float((kernels.argmax(-1) == dense.argmax(-1)).float().mean()) >= 0.9
    none = _prefill_logits(_runner(tiny_llama_tied, "none", None), ids)
    assert not torch.equal(none, dense)  # the quantized model is a different (nearby) model


def test_gguf_k_quant_is_quantized_by_auto(tiny_kquant_gguf: KQuantModel) -> None:
    files = inspect_model(str(tiny_kquant_gguf.gguf))
    choice = resolve_quantization("auto", files.format, weight_types(files))
    assert choice.mode in ("int4", "int8") and "GGUF" in choice.reason


NATURAL = [
    "The capital of France is Paris. It is known for the Eiffel Tower, museums such as the Louvre, and its cafes.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Once upon a time, there was a little girl who lived in a village near the forest. Every morning she",
    "Photosynthesis is the process by which green plants use sunlight to make food from carbon dioxide and water.",
]


@requires_real_model
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_real_model_top1_agrees_with_the_unquantized_model(mode: str) -> None:
    from radixfair.tokenizer import Tokenizer

    files = inspect_model(None)
    from radixfair.engine.loaders import open_gguf

    tok = Tokenizer.from_gguf(open_gguf(files.path))
    none = ModelRunner(files.config, load_state_dict(files, torch.float32),
                       RunnerConfig(1024, 4, 1024, "none"), torch.float32, torch.device("cpu"))
    quant = ModelRunner(files.config, load_state_dict(files, torch.float32),
                        RunnerConfig(1024, 4, 1024, mode, NEVER), torch.float32, torch.device("cpu"))
    agree = total = 0
    for text in NATURAL:
        ids = tok.encode(text)
        a, b = _prefill_logits(none, ids), _prefill_logits(quant, ids)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(ids)
    # teacher-forced next-token predictions over natural text: the quantized model picks the same
    # token as the unquantized one at >= 85% (int4) / 95% (int8) of positions
    assert agree / total >= (0.95 if mode == "int8" else 0.85), (agree, total)
