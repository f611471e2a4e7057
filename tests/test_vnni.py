"""The AVX512-VNNI kernels (`radixfair.engine.vnni`): the packed layouts hold the codes, each kernel
computes exactly the documented product (int8 activations per 32-input block, integer dot products,
float scales) and stays near the float product with the dequantized weights, a token's result does
not depend on the rest of the pass, and a failing build is reported, not hidden."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from radixfair.engine import native, vnni
from radixfair.engine.quant import QuantLinear, dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

KERNELS = vnni.vnni_kernels()
requires_vnni = pytest.mark.skipif(KERNELS is None, reason="no AVX512-VNNI CPU or no C compiler here")
# int8 activations per 32 inputs: ~0.4% relative rounding per input, averaged down over K terms;
# two levels (the residual rounded again) leave ~1/127 of that
FLOAT_RTOL = {1: 0.015, 2: 5e-4}


@pytest.fixture(params=[1, 2], ids=["one_level", "two_levels"])
def levels(request: pytest.FixtureRequest) -> Iterator[int]:
    """The kernels with single (llama.cpp's) or two-level int8 activations."""
    assert KERNELS is not None
    before = KERNELS.levels
    KERNELS.levels = request.param
    yield request.param
    KERNELS.levels = before


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def _quantized_activations(x: torch.Tensor, levels: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The kernels' activation rounding: per level, per token and 32-input block, codes and scales
    `[T, G, 32]`, `[T, G]`; a second level rounds what the first left."""
    t, k = x.shape
    blocks = x.reshape(t, k // vnni.GROUP, vnni.GROUP)
    out = []
    for _ in range(levels):
        amax = blocks.abs().amax(-1, keepdim=True)
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        codes, step = torch.round(blocks * inv), amax / 127.0
        out.append((codes, step.squeeze(-1)))
        blocks = blocks - codes * step
    return out


def _q4_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  levels: int) -> torch.Tensor:
    """sum over blocks and levels of scale * dx * sum((q - 8) * xq), plus zero * sum(x): float64,
    exact integer dots."""
    n, k = q.shape
    qc = (q.double() - 8).reshape(n, k // vnni.GROUP, vnni.GROUP)
    s, z = scale.to(torch.bfloat16).double(), zero.to(torch.bfloat16).double()
    xs = x.double().reshape(x.shape[0], -1, vnni.GROUP).sum(-1)  # [T, G]
    y = (z[None] * xs[:, None, :]).sum(-1)
    for xq, dx in _quantized_activations(x, levels):
        dots = torch.einsum("tgk,ngk->tng", xq.double(), qc)  # integers
        y = y + (dots * s[None] * dx.double()[:, None, :]).sum(-1)
    return y


@pytest.mark.parametrize("shape", [(64, 96), (48, 32), (16, 1536)])
def test_int4_packing_keeps_every_code(shape: tuple[int, int]) -> None:
    q = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    w = vnni.Q4Weights.pack(q, torch.rand(shape[0], shape[1] // 32), torch.rand(shape[0], shape[1] // 32))
    assert torch.equal(w.codes_2d(), q)
    assert w.nbytes == shape[0] * shape[1] // 32 * (16 + 2 + 2 + 2)  # codes, bf16 scale and zero, int16 sum


def test_shapes_the_kernels_do_not_take_are_refused() -> None:
    assert vnni.supports_shape(960, 576) and not vnni.supports_shape(40, 576) and not vnni.supports_shape(64, 48)


@requires_vnni
@pytest.mark.parametrize("tokens", [1, 3, 4, 9])
def test_int4_kernel_computes_the_documented_product(tokens: int, levels: int) -> None:
    assert KERNELS is not None
    q, scale, zero = quantize_int4(_weights(96, 128))
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(tokens))
    y = KERNELS.q4_matmul(x, vnni.Q4Weights.pack(q, scale, zero))
    ref = _q4_reference(x, q, scale, zero, levels)
    assert y.shape == (tokens, 96) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@requires_vnni
@pytest.mark.parametrize("tokens", [1, 2, 5])
def test_int8_kernel_computes_the_documented_product(tokens: int, levels: int) -> None:
    assert KERNELS is not None
    q, scale = quantize_int8(_weights(80, 96))
    x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(tokens))
    y = KERNELS.q8_matmul(x, vnni.Q8Weights.pack(q, scale))
    blocks = q.double().reshape(80, -1, vnni.GROUP)
    ref = sum((torch.einsum("tgk,ngk->tng", xq.double(), blocks) * dx.double()[:, None, :]).sum(-1)
              for xq, dx in _quantized_activations(x, levels))
    assert isinstance(ref, torch.Tensor)
    ref = ref * scale.double()[None]
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@requires_vnni
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_kernels_stay_near_the_float_product_with_the_dequantized_weights(kind: str, levels: int) -> None:
    assert KERNELS is not None
    w = _weights(160, 576, seed=3)
    x = torch.randn(6, 576, generator=torch.Generator().manual_seed(4))
    x[:, 5] *= 40  # an outlier channel, as LLM activations have
    if kind == "int4":
        q, scale, zero = quantize_int4(w)
        y = KERNELS.q4_matmul(x, vnni.Q4Weights.pack(q, scale, zero))
        ref = x @ dequantize_int4(q, scale.to(torch.bfloat16), zero.to(torch.bfloat16), torch.float32).T
    else:
        q8, s8 = quantize_int8(w)
        y = KERNELS.q8_matmul(x, vnni.Q8Weights.pack(q8, s8))
        ref = x @ dequantize_int8(q8, s8, torch.float32).T
    assert float((y - ref).norm() / ref.norm()) < FLOAT_RTOL[levels]


@requires_vnni
def test_a_tokens_result_does_not_depend_on_the_rest_of_the_pass(levels: int) -> None:
    assert KERNELS is not None
    w4 = vnni.Q4Weights.pack(*quantize_int4(_weights(64, 64)))
    w8 = vnni.Q8Weights.pack(*quantize_int8(_weights(64, 64)))
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(5))
    for mm, w in ((KERNELS.q4_matmul, w4), (KERNELS.q8_matmul, w8)):
        together = mm(x, w)  # type: ignore[operator]
        for i in range(7):
            assert torch.equal(mm(x[i : i + 1].contiguous(), w)[0], together[i])  # type: ignore[operator]


@requires_vnni
@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_change_the_result(threads: int) -> None:
    assert KERNELS is not None
    w = vnni.Q4Weights.pack(*quantize_int4(_weights(256, 64)))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(6))
    before = native.threads()
    try:
        native.set_threads(1)
        one = KERNELS.q4_matmul(x, w)
        native.set_threads(threads)
        assert torch.equal(KERNELS.q4_matmul(x, w), one)
    finally:
        native.set_threads(before)


@requires_vnni
def test_quantized_layer_offers_the_vnni_path_where_the_shape_fits() -> None:
    fits = QuantLinear(_weights(64, 64), None, "int4", torch.float32, vnni=True)
    odd = QuantLinear(_weights(40, 64), None, "int4", torch.float32, vnni=True)
    assert "vnni" in fits.available_paths() and "vnni" not in odd.available_paths()
    fits.set_route([(1, "vnni"), (8, "weight_only")])
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(7))
    ref = x @ fits.dequantized().T  # read back through the bf16 weight-only kernel: bf16-rounded
    assert float((fits(x) - ref).norm() / ref.norm()) < 0.005
    fits.set_route([(1, "weight_only")])
    assert fits.vnni is None  # the unused copy is freed


def test_a_failing_build_names_the_compiler_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.c"
    bad.write_text("int broken( {\n")
    with pytest.raises(RuntimeError, match=r"failed on bad\.c"):
        native.build([bad], tmp_path / "out")
    with pytest.raises(RuntimeError, match="cannot run the C compiler"):
        native.build(None, tmp_path / "out2", compiler=str(tmp_path / "no-such-cc"))
    assert not list((tmp_path / "out").glob("*.so"))  # nothing half-built is left to load


@requires_vnni
def test_the_build_is_cached_by_source_hash(tmp_path: Path) -> None:
    first = native.build(None, tmp_path)
    mtime = first.stat().st_mtime_ns
    assert native.build(None, tmp_path) == first and first.stat().st_mtime_ns == mtime
    changed = tmp_path / "changed.c"
    changed.write_text(native.sources()[0].read_text() + "\n/* another version */\n")
    assert native.build([changed, *native.sources()[1:]], tmp_path) != first
