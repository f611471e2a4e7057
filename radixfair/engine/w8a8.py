"""Int8 x int8 matmuls with dynamic per-token activation quantization (W8A8), for CPUs.

A CPU with AVX512-VNNI (or AMX) multiplies int8 by int8 into int32 at four times the rate of float32
FMAs, and reads a quarter of the bytes: for passes of more than a few tokens that beats both the
weight-only kernels (which widen every weight to 16 bits first) and a float matmul. Each token's
activations get their own scale (its absolute maximum over 127), as llama.cpp quantizes activations
for its quantized matmuls; the integer product is exact, so a token's result does not depend on the
other tokens of the pass.

Per-token scales alone lose too much where a few input channels carry most of the magnitude (LLM
activations do), so the activations are first smoothed as SmoothQuant does: input channel j is
divided by `s_j = max|x_j|^a / max|W_j|^(1-a)` and the weight's column j multiplied by it (the
product is unchanged), with `max|x_j|` measured at load on a short built-in text (`CALIBRATION_TEXT`).

Two backends: FBGEMM's prepacked dynamic linear (fastest; it quantizes per tensor, so each row is
first divided by its own maximum and an anchor row pins the range to [-1, 1], which makes the
per-tensor scale a per-token one), and `torch._int_mm` where FBGEMM is not built in.
"""

from __future__ import annotations

import functools
import warnings
from typing import Protocol

import torch

SMALL_PASS = 64  # rows up to which a layer keeps its input buffer between calls
# SmoothQuant's migration strength: how much of the activations' range moves into the weights
SMOOTH_ALPHA = 0.7
CALIBRATION_TEXT = (
    "The history of science is the study of how people came to understand the natural world. Early "
    "astronomers tracked the motion of the planets; later, Newton described gravity with a few equations.\n"
    "Q: What is the capital of Japan?\nA: Tokyo is the capital of Japan, and its largest city.\n"
    "def mean(values):\n    return sum(values) / len(values) if values else 0.0\n\n"
    "User: Can you suggest a recipe for dinner tonight?\nAssistant: Sure! A simple pasta with garlic, "
    "olive oil, tomatoes and basil takes about twenty minutes. 1. Boil the pasta. 2. Warm the oil.\n"
    '{"name": "Ada", "age": 36, "languages": ["English", "French"], "active": true}\n'
)


def smoothing(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = SMOOTH_ALPHA) -> torch.Tensor:
    """Per input channel factors `s` (`[K]`) for activations whose channels reach `act_absmax`:
    `x / s` goes through the int8 activations, `W * s` through the int8 weights."""
    w_absmax = weight.float().abs().amax(dim=0).clamp(min=1e-5)
    return (act_absmax.float().clamp(min=1e-5) ** alpha / w_absmax ** (1 - alpha)).clamp(min=1e-5)


class W8A8Matmul(Protocol):
    """`x [T, K] -> x @ W.T` for int8 weights `W` (per output channel scales)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    @property
    def nbytes(self) -> int: ...


@functools.cache
def cpu_has_int8_dot() -> bool:
    """VNNI or AMX: int8 dot products accumulate into int32 without the 16-bit saturation of older
    x86 kernels, so activations may use the full 8 bits."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_vnni", " avx_vnni", " amx_int8"))


def absmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`[T, 1]` each row's largest magnitude (never 0). (`vector_norm(x, inf)` is ~8x slower on a CPU.)"""
    return x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-20)


def _nbytes(q: torch.Tensor, scale: torch.Tensor, inv_smooth: torch.Tensor | None) -> int:
    """What a W8A8 matmul reads per pass: int8 codes, float32 scales and smoothing factors."""
    return q.numel() + scale.numel() * 4 + (0 if inv_smooth is None else inv_smooth.numel() * 4)


def _fbgemm_available() -> bool:
    return any(e in torch.backends.quantized.supported_engines for e in ("fbgemm", "x86"))


class FbgemmW8A8:
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, inv_smooth: torch.Tensor | None = None) -> None:
        n, k = q.shape
        self.inv_smooth = inv_smooth
        with warnings.catch_warnings():  # quantized tensors are deprecated as a user type, not the kernel
            warnings.simplefilter("ignore")
            wq = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(n, dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(wq, None)
        self.anchor = torch.zeros(k)
        self.anchor[0], self.anchor[min(1, k - 1)] = 1.0, -1.0
        self.reduce_range = not cpu_has_int8_dot()
        self._small: torch.Tensor | None = None
        self.nbytes = _nbytes(q, scale, inv_smooth)

    def _buffer(self, t: int) -> torch.Tensor:
        """`[t + 1, K]`: the anchor row, then room for the rows (no concatenation pass). Kept between
        calls for decode-sized passes, where an allocation and a copy are a measurable share."""
        if self._small is not None and t < self._small.shape[0]:
            return self._small[: t + 1]
        buf = torch.empty(max(t + 1, SMALL_PASS if t < SMALL_PASS else 0), self.anchor.shape[0])
        buf[0] = self.anchor
        if t < SMALL_PASS:
            self._small = buf
        return buf[: t + 1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        buf = self._buffer(x.shape[0])
        rows = buf[1:]
        if self.inv_smooth is None:
            s = absmax_rows(x.float())
            torch.div(x, s, out=rows)
        else:
            torch.mul(x, self.inv_smooth, out=rows)
            s = absmax_rows(rows)
            rows.div_(s)
        y = torch.ops.quantized.linear_dynamic(buf, self.packed, self.reduce_range)
        return y[1:].mul_(s).to(x.dtype)


class IntMmW8A8:
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, inv_smooth: torch.Tensor | None = None) -> None:
        self.inv_smooth = inv_smooth
        self.q = q  # [N, K]; its transpose is the [K, N] operand
        self.scale = scale.float()
        self.nbytes = _nbytes(q, scale, inv_smooth)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if self.inv_smooth is None else x.float() * self.inv_smooth
        s = absmax_rows(xf) / 127.0
        xq = torch.round(xf / s).to(torch.int8)
        return (torch._int_mm(xq, self.q.t()).float() * (s * self.scale)).to(x.dtype)


def make_w8a8(q: torch.Tensor, scale: torch.Tensor, smooth: torch.Tensor | None = None) -> W8A8Matmul | None:
    """A W8A8 matmul over int8 codes `q [N, K]` with float scales `[N]` (of the weight times `smooth`,
    by which the activations are then divided), or None where none runs (not on a CPU, or no backend)."""
    if q.device.type != "cpu":
        return None
    candidates: list[type[FbgemmW8A8] | type[IntMmW8A8]] = [IntMmW8A8]
    if _fbgemm_available():
        candidates.insert(0, FbgemmW8A8)
    x = torch.ones(2, q.shape[1])
    for cls in candidates:
        try:
            mm = cls(q.contiguous(), scale.float(), None if smooth is None else (1.0 / smooth).float())
            mm(x)
            return mm
        except (RuntimeError, NotImplementedError, AttributeError):
            continue
    return None
