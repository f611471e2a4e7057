"""The C decode attention (`radixfair.engine.decode_attention`): it writes each request's new K/V at
its position in its workspace row and attends over exactly its context, as softmax(q K^T) V does in
float64, for float32 and bf16 K/V, grouped query heads, strided rows and any lengths."""

from __future__ import annotations

import pytest
import torch

from radixfair.engine.decode_attention import NativeDecodeAttention, native_decode_attention

ATTEND = native_decode_attention()
pytestmark = pytest.mark.skipif(ATTEND is None, reason="no AVX512 CPU or no C compiler here")


def _reference(q: torch.Tensor, kw: torch.Tensor, vw: torch.Tensor, slots: list[int], lens: list[int],
               scale: float) -> torch.Tensor:
    b, h, d = q.shape
    kvh = kw.shape[1]
    out = torch.empty(b, h, d, dtype=torch.float64)
    for i, (s, n) in enumerate(zip(slots, lens, strict=True)):
        k = kw[s, :, :, :n].double()  # [KVH, D, n]
        v = vw[s, :, :n].double()  # [KVH, n, D]
        qh = q[i].double().view(kvh, h // kvh, d)
        p = torch.softmax(qh @ k * scale, dim=-1)
        out[i] = (p @ v).reshape(h, d)
    return out.reshape(b, h * d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 32), (8, 1, 128)])
def test_attention_and_kv_write_match_the_reference(dtype: torch.dtype, heads: int, kv_heads: int,
                                                    head_dim: int) -> None:
    assert ATTEND is not None
    gen = torch.Generator().manual_seed(heads * head_dim)
    rows, cap = 6, 96
    kw = torch.randn(rows, kv_heads, head_dim, cap, generator=gen).to(dtype)
    vw = torch.randn(rows, kv_heads, cap, head_dim, generator=gen).to(dtype)
    slots, lens = [4, 0, 2], [1, 37, 96]  # a first token, a length off the 16-column grid, a full row
    b = len(slots)
    # q | k | v of each token side by side, as the fused projection leaves them: strided rows
    qkv = torch.randn(b, heads + 2 * kv_heads, head_dim, generator=gen).to(dtype)
    q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    scale = head_dim**-0.5
    untouched = kw.clone(), vw.clone()
    out = ATTEND(q, k, v, kw, vw, torch.tensor(slots), torch.tensor(lens), scale)
    for i, (s, n) in enumerate(zip(slots, lens, strict=True)):
        assert torch.equal(kw[s, :, :, n - 1], k[i]) and torch.equal(vw[s, :, n - 1], v[i])
    # nothing else was written
    kw_mask = torch.ones_like(kw, dtype=torch.bool)
    vw_mask = torch.ones_like(vw, dtype=torch.bool)
    for s, n in zip(slots, lens, strict=True):
        kw_mask[s, :, :, n - 1] = False
        vw_mask[s, :, n - 1] = False
    assert torch.equal(kw[kw_mask], untouched[0][kw_mask]) and torch.equal(vw[vw_mask], untouched[1][vw_mask])
    ref = _reference(q, kw, vw, slots, lens, scale)
    assert out.dtype == dtype and out.shape == (b, heads * head_dim)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_a_single_position_returns_its_value() -> None:
    assert ATTEND is not None
    kw, vw = torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16)
    q, k, v = torch.randn(1, 2, 16), torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    out = ATTEND(q, k, v, kw, vw, torch.tensor([0]), torch.tensor([1]), 1.0)
    torch.testing.assert_close(out.view(2, 16), v[0].expand(2, 16))


def test_shapes_the_kernel_does_not_take_are_refused() -> None:
    cpu = torch.device("cpu")
    assert NativeDecodeAttention.supports(9, 3, 64, torch.bfloat16, cpu)
    assert not NativeDecodeAttention.supports(9, 3, 72, torch.float32, cpu)  # head_dim off the vector
    assert not NativeDecodeAttention.supports(9, 3, 64, torch.float16, cpu)
    assert not NativeDecodeAttention.supports(64, 2, 64, torch.float32, cpu)  # 32 query heads per kv head
    assert ATTEND is not None
    with pytest.raises(ValueError, match="contiguous heads"):
        ATTEND(torch.randn(1, 2, 32).transpose(1, 2), torch.randn(1, 1, 32), torch.randn(1, 1, 32),
               torch.zeros(1, 1, 32, 8), torch.zeros(1, 1, 8, 32), torch.tensor([0]), torch.tensor([1]), 1.0)
