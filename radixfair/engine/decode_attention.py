"""Decode attention over the decode workspace in one C call per layer (`csrc/decode_attention.c`).

On a CPU, a decode step's attention in tensor ops is a dozen small ops per layer (the new K/V
written into the workspace, a batched matmul, a mask, a softmax, a cast, another matmul), each
reading the batch padded to its longest context; for a batch of one their fixed costs outweigh the
arithmetic many times. The kernel does it all per (request, kv head) over exactly the request's
context, in float32 on float32 or bf16 K/V.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from radixfair.engine.native import native_library, threads

MAX_GROUP = 16  # query heads per kv head the kernel takes
MAX_HEAD_DIM = 256
DTYPES = (torch.float32, torch.bfloat16)


class NativeDecodeAttention:
    def __init__(self, lib: ctypes.CDLL) -> None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._fn = lib.rf_decode_attention
        self._fn.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64,
                             ctypes.c_float, ctypes.c_int, ptr, ctypes.c_int]
        self._fn.restype = ctypes.c_int

    @staticmethod
    def supports(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
        return (device.type == "cpu" and dtype in DTYPES and head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM
                and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= MAX_GROUP)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kw: torch.Tensor, vw: torch.Tensor,
                 slots: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
        """`q [B, H, D]`, `k`/`v [B, KVH, D]` (rows may be strided, heads contiguous), workspace `kw
        [rows, KVH, D, cap]` and `vw [rows, KVH, cap, D]`, each request's workspace row `slots [B]` and
        context length with the new token `lens [B]` (int64). Writes the new K/V at position
        `lens - 1` and returns the attention output `[B, H * D]` in q's dtype."""
        b, h, d = q.shape
        kvh, cap = kw.shape[1], kw.shape[3]
        for t in (q, k, v):
            if t.stride(2) != 1 or t.stride(1) != d or t.dtype != kw.dtype:
                raise ValueError("decode attention wants [B, heads, D] rows with contiguous heads in the K/V dtype")
        out = torch.empty(b, h * d, dtype=q.dtype)
        rc = self._fn(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                      kw.data_ptr(), vw.data_ptr(), slots.data_ptr(), lens.data_ptr(), b, h, kvh, d, cap, scale,
                      int(kw.dtype == torch.bfloat16), out.data_ptr(), threads())
        if rc == -2:
            raise MemoryError("decode attention: out of memory for its scores")
        if rc != 0:
            raise ValueError(f"decode attention: unsupported shape (heads {h}, kv heads {kvh}, head_dim {d})")
        return out


@functools.cache
def native_decode_attention() -> NativeDecodeAttention | None:
    lib = native_library()
    return None if lib is None else NativeDecodeAttention(lib)
