"""Int4 / int8 weight matmuls on AVX512-VNNI CPUs (`csrc/vnni_matmul.c`), for decode-sized passes.

PyTorch's CPU weight-only kernels widen every weight to 16 bits before multiplying and stream the
weights well below the memory's speed; these keep the codes at 4 (8) bits up to an int8
dot-product instruction and quantize each token's activations to int8 in blocks of 32 inputs, as
llama.cpp does. The C source is compiled at first use (`radixfair.engine.native`). Where there is no
compiler, no AVX512-VNNI, or the build fails, `vnni_kernels()` is None and the layers keep their
other paths (`RADIXFAIR_DISABLE_VNNI=1` does the same, for comparisons).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import NamedTuple

import torch

from radixfair.engine.native import cpu_has, native_library, threads

logger = logging.getLogger(__name__)

GROUP = 32  # inputs per activation (and int4 weight) block
TILE = 16  # output rows per packed tile
Q4_CODES = TILE * GROUP // 2  # bytes of codes in an int4 tile's group block
VNNI_FLAGS = ("avx512_vnni",)
ACTIVATION_LEVELS = 2


class VnniKernels:
    """The compiled library's two entry points, over contiguous CPU tensors."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._q4 = lib.rf_q4_matmul
        self._q4.argtypes = [ptr, i64, i64, i64, ptr, ptr, ctypes.c_int, ctypes.c_int]
        self._q4.restype = ctypes.c_int
        self._q8 = lib.rf_q8_matmul
        self._q8.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ctypes.c_int, ctypes.c_int]
        self._q8.restype = ctypes.c_int
        # activation levels: 2 rounds each token's activations twice (codes, then their residual),
        # ~14 bits for twice the integer work; 1 is llama.cpp's single int8 rounding
        self.levels = ACTIVATION_LEVELS

    def q4_matmul(self, x: torch.Tensor, w: Q4Weights) -> torch.Tensor:
        """`x [T, K]` float32 contiguous times packed int4 weights -> `[T, N]` float32."""
        t, k = x.shape
        y = torch.empty(t, w.n)
        if self._q4(x.data_ptr(), t, k, w.n, w.blocks.data_ptr(), y.data_ptr(), self.levels, threads()):
            raise MemoryError("vnni int4 matmul: out of memory for its activation scratch")
        return y

    def q8_matmul(self, x: torch.Tensor, w: Q8Weights) -> torch.Tensor:
        """`x [T, K]` float32 contiguous times packed int8 weights -> `[T, N]` float32."""
        t, k = x.shape
        y = torch.empty(t, w.n)
        if self._q8(x.data_ptr(), t, k, w.n, w.codes.data_ptr(), w.scale.data_ptr(), y.data_ptr(), self.levels,
                    threads()):
            raise MemoryError("vnni int8 matmul: out of memory for its activation scratch")
        return y


@functools.cache
def vnni_kernels() -> VnniKernels | None:
    """The kernels, or None where they cannot run here (no AVX512-VNNI, no compiler: logged once)."""
    if os.environ.get("RADIXFAIR_DISABLE_VNNI") == "1":
        return None
    if not cpu_has(VNNI_FLAGS):
        logger.info("no AVX512-VNNI on this CPU: quantized layers use PyTorch's kernels")
        return None
    lib = native_library()
    return None if lib is None else VnniKernels(lib)


def supports_shape(n: int, k: int) -> bool:
    return n % TILE == 0 and k % GROUP == 0


class Q4Weights(NamedTuple):
    """int4 weights in the kernel's layout, `w = scale * (q - 8) + zero` per row and 32-input group:
    per 16-row tile and group one block of the codes, scale and zero (bf16) and the sum of the
    centred codes (int16), read in one stream."""

    blocks: torch.Tensor  # [N/16, K/32, 352] uint8
    n: int

    @classmethod
    def pack(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Q4Weights:
        """From codes `[N, K]` (0..15) and `[N, K/32]` scales and zeros (`quant.quantize_int4`'s form;
        they are kept as bf16)."""
        n, k = q.shape
        tiles, groups = n // TILE, k // GROUP
        # tile, group, chunk, r, j, half: byte (r, j) of a chunk holds inputs j and 4 + j
        t = q.to(torch.uint8).reshape(tiles, TILE, groups, GROUP // 8, 2, 4).permute(0, 2, 3, 1, 5, 4)
        codes = (t[..., 0] | (t[..., 1] << 4)).reshape(tiles, groups, -1)

        def per_tile(v: torch.Tensor) -> torch.Tensor:  # [N, G] 16-bit -> [tiles, G, 32] bytes
            return v.reshape(tiles, TILE, groups).transpose(1, 2).contiguous().view(torch.uint8)

        sums = (q.to(torch.int32).reshape(n, groups, GROUP).sum(-1) - 8 * GROUP).to(torch.int16)
        blocks = torch.cat((codes, per_tile(scale.to(torch.bfloat16)), per_tile(zero.to(torch.bfloat16)),
                            per_tile(sums)), dim=-1)
        return cls(blocks.contiguous(), n)

    def codes_2d(self) -> torch.Tensor:
        """The codes back as `[N, K]` (0..15)."""
        tiles, groups = self.blocks.shape[:2]
        c = self.blocks[..., :Q4_CODES].reshape(tiles, groups, GROUP // 8, TILE, 4)
        t = torch.stack((c & 0xF, c >> 4), dim=-1)  # tile, group, chunk, r, j, half
        return t.permute(0, 3, 1, 2, 5, 4).reshape(tiles * TILE, groups * GROUP)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()


class Q8Weights(NamedTuple):
    """int8 weights in the kernel's layout: `w = scale[n] * q`, stored as `q + 128`."""

    codes: torch.Tensor  # [N/16, K/4, 16, 4] uint8
    scale: torch.Tensor  # [N] float32
    n: int

    @classmethod
    def pack(cls, q: torch.Tensor, scale: torch.Tensor) -> Q8Weights:
        """From codes `[N, K]` (-127..127) and per-row scales `[N]` (`quant.quantize_int8`'s form)."""
        n, k = q.shape
        t = (q.to(torch.int16) + 128).to(torch.uint8).reshape(n // TILE, TILE, k // 4, 4).permute(0, 2, 1, 3)
        return cls(t.contiguous(), scale.float().contiguous(), n)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * 4
