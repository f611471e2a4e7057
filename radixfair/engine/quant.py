"""Weight-only quantized linear layers: int8 (per output channel) and int4 (groups of 32 along the input).

A decode step at small batch reads every weight once and does little arithmetic per byte, so its
time is the weight bytes over the memory bandwidth: int8 halves them against bf16, int4 quarters
them. At large batches (prefill chunks, wide decode batches) the same matmul is compute-bound and
PyTorch's weight-only kernels lose to a dense one, so a layer can keep a dense copy of its
*dequantized* weights and switch to it from a measured row count (`dense_min_rows`): both paths
multiply by the same quantized model; only the kernel differs.

The kernels are PyTorch's own (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`). Where
one does not run (the int4 one is CPU-only; a device or dtype an op lacks), the layer multiplies by
the weights dequantized on the fly, so the same code runs everywhere; `tune_dense_switch` then finds
the dense copy faster at every size and uses it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

QUANT_MODES = ("auto", "none", "int8", "int4")
QUANT_KINDS = ("int8", "int4")
INT4_GROUP = 32  # a Q4_0 / Q4_1 block: a GGUF's groups map one to one
NEVER = 1 << 62  # dense_min_rows of a layer that has no dense copy
# row counts `tune_dense_switch` times; past the largest the dense kernel is assumed to win
TUNE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class QuantChoice:
    """What `--quantization` resolved to for a model, and why (for the startup line)."""

    mode: str  # none | int8 | int4
    reason: str


def resolve_quantization(requested: str, model_format: str, gguf_types: dict[str, int] | None) -> QuantChoice:
    """`auto` keeps a GGUF's quantization family (int4 for Q4_*, int8 for Q8_0) and is `none` for
    safetensors models; `gguf_types` counts the GGUF's matrix tensors per type name."""
    if requested not in QUANT_MODES:
        raise ValueError(f"--quantization must be one of {', '.join(QUANT_MODES)}, got {requested!r}")
    if requested != "auto":
        return QuantChoice(requested, "--quantization " + requested)
    if model_format != "gguf" or not gguf_types:
        return QuantChoice("none", "auto: unquantized weights")
    dominant = max(gguf_types.items(), key=lambda kv: kv[1])[0]
    # the nearest kept family at no fewer bits: 4 bits and below -> int4, 5 to 8 bits -> int8
    if dominant.startswith(("Q2_", "Q3_", "Q4_", "IQ")):
        return QuantChoice("int4", f"auto: {dominant} GGUF")
    if dominant.startswith(("Q5_", "Q6_", "Q8_")):
        return QuantChoice("int8", f"auto: {dominant} GGUF")
    return QuantChoice("none", f"auto: {dominant} weights")


# ---- quantization (float -> codes) ---------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: `w ~= q * scale[:, None]`; returns (q int8 [N, K], scale f32 [N])."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of `group` inputs: `w ~= (q - 8) * scale + zero` per group (the
    layout of PyTorch's int4 kernels). Returns (q uint8 [N, K] in 0..15, scale, zero f32 [N, K/group])."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 needs the input size ({k}) to be a multiple of {group}")
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-10)
    q = torch.round((g - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15).to(torch.uint8).reshape(n, k)
    return q, scale, lo + 8.0 * scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype,
                    group: int = INT4_GROUP) -> torch.Tensor:
    n, k = q.shape
    g = (q.reshape(n, k // group, group).float() - 8.0) * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return g.reshape(n, k).to(dtype)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [N, K] -> [N, K/2], two per byte (even column in the low nibble)."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    n, half = p.shape
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(n, 2 * half)


# ---- the layer -------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """`y = x @ W.T + b` with W held as int8 or int4 codes (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kind: str, dtype: torch.dtype,
                 keep_dense: bool = True) -> None:
        super().__init__()
        if kind not in QUANT_KINDS:
            raise ValueError(f"unknown quantized weight kind {kind!r}")
        self.kind = kind
        self._nibbles = False
        self.out_features, self.in_features = weight.shape
        device = weight.device
        self.qweight: torch.Tensor
        self.scales: torch.Tensor  # int8: [N]
        self.scale_zeros: torch.Tensor  # int4: [K/group, N, 2]
        # The CPU weight-only kernels are vectorized for 16-bit activations only (float32 ones run a
        # scalar loop, 10x slower and more), so a float32 model casts its activations for them.
        self.kernel_dtype = torch.bfloat16 if device.type == "cpu" and dtype == torch.float32 else dtype
        self.dtype = dtype
        self.bias: torch.Tensor | None
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype), persistent=False)
        if kind == "int8":
            q, scale = quantize_int8(weight)
            scale = scale.to(self.kernel_dtype)  # what the kernel multiplies by: the dense copy uses the same
            self.register_buffer("qweight", q, persistent=False)
            self.register_buffer("scales", scale, persistent=False)
            self._kernel_fn: Callable[[torch.Tensor], torch.Tensor] = self._int8_kernel
            dense = dequantize_int8(q, scale, dtype)
        else:
            q, scale, zero = quantize_int4(weight)
            scale, zero = scale.to(self.kernel_dtype), zero.to(self.kernel_dtype)
            dense = dequantize_int4(q, scale, zero, dtype)
            # [K/group, N, 2]: the scales-and-zeros layout of the int4 kernels
            self.register_buffer("scale_zeros", torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous(),
                                 persistent=False)
            self._nibbles = True  # codes two per byte, multiplied through `dequantized`
            self.register_buffer("qweight", pack_nibbles(q), persistent=False)
            self._kernel_fn = self._dequant_kernel
            # the CPU kernel's packing needs N % 16 == 0 (true of real models, not of every tiny one)
            if device.type == "cpu" and self.out_features % 16 == 0:
                self._nibbles = False
                self.qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
                self._kernel_fn = self._int4_cpu_kernel
                if not self._kernel_runs():
                    self._nibbles = True
                    self.qweight = pack_nibbles(q)
                    self._kernel_fn = self._dequant_kernel
        self.dense: torch.Tensor | None
        self.register_buffer("dense", dense if keep_dense else None, persistent=False)
        # rows (tokens in the pass) from which the dense copy is used; set by tune_dense_switch
        self.dense_min_rows = NEVER
        if not self._kernel_runs():
            logger.info("%s weight kernel unavailable for %s on %s: dequantizing on the fly",
                        kind, dtype, device.type)
            self._kernel_fn = self._dequant_kernel

    def _kernel_runs(self) -> bool:
        try:
            x = torch.zeros(1, self.in_features, dtype=self.kernel_dtype, device=self.qweight.device)
            self._kernel_fn(x)
            return True
        except (RuntimeError, NotImplementedError):
            return False

    # the kernels: x [T, K] -> [T, N]
    def _int8_kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)

    def _int4_cpu_kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, INT4_GROUP, self.scale_zeros)

    def _dequant_kernel(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized())

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, as a dense `[N, K]` tensor."""
        if self.dense is not None:
            return self.dense
        if self.kind == "int8":
            return dequantize_int8(self.qweight, self.scales, self.dtype)
        sz = self.scale_zeros.transpose(0, 1)
        if not self._nibbles:  # the kernel's packing is opaque: multiply the identity through it
            eye = torch.eye(self.in_features, dtype=self.kernel_dtype, device=self.qweight.device)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, INT4_GROUP,
                                                              self.scale_zeros).t().to(self.dtype).contiguous()
        return dequantize_int4(unpack_nibbles(self.qweight), sz[..., 0], sz[..., 1], self.dtype)

    @property
    def has_kernel(self) -> bool:
        """Whether a weight-only kernel multiplies the codes (else they are dequantized per call)."""
        return self._kernel_fn != self._dequant_kernel

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_kernel:
            return F.linear(x, self.dequantized(), self.bias)
        y = self._kernel_fn(x.to(self.kernel_dtype)).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] >= self.dense_min_rows and self.dense is not None:
            y = F.linear(x2, self.dense, self.bias)
        else:
            y = self.quantized_forward(x2)
        return y.view(*shape[:-1], self.out_features)

    def drop_dense(self) -> None:
        self.dense = None
        self.dense_min_rows = NEVER

    def quantized_bytes(self) -> int:
        """Bytes the quantized kernel reads: codes, scales (and zeros), bias."""
        n = self.qweight.numel() * self.qweight.element_size()
        n += sum(t.numel() * t.element_size() for t in (getattr(self, "scales", None),
                                                       getattr(self, "scale_zeros", None), self.bias)
                 if t is not None)
        return n

    def bytes_read(self, rows: int) -> int:
        """Weight bytes one pass of `rows` tokens reads through this layer."""
        if self.dense is not None and rows >= self.dense_min_rows:
            return self.dense.numel() * self.dense.element_size() + (
                0 if self.bias is None else self.bias.numel() * self.bias.element_size())
        return self.quantized_bytes()

    def extra_repr(self) -> str:
        switch = "never" if self.dense_min_rows >= NEVER else str(self.dense_min_rows)
        return f"{self.in_features} -> {self.out_features}, {self.kind}, dense from {switch} rows"


# ---- choosing the kernel per batch size ----------------------------------------------------------
def _best_time(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """The fastest of `reps` runs: on a shared machine the others time the neighbours too."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return min(times)


def measure_dense_switch(layer: QuantLinear, reps: int = 5) -> int:
    """The smallest row count from which the dense copy is faster at every measured size (NEVER if
    the quantized kernel wins throughout)."""
    assert layer.dense is not None
    device = layer.qweight.device
    switch = NEVER
    gen = torch.Generator(device).manual_seed(0)  # not the global generator: sampling seeds stay as set
    with torch.inference_mode():
        for rows in reversed(TUNE_ROWS):
            x = torch.randn(rows, layer.in_features, generator=gen, device=device).to(layer.dtype)
            tq = _best_time(lambda: layer.quantized_forward(x), device, reps)  # noqa: B023 - used at once
            td = _best_time(lambda: layer.dense_forward(x), device, reps)  # noqa: B023
            if td >= tq:
                break
            switch = rows
    # the largest measured size is where dense is most likely to win: past it, assume it does
    return switch


def tune_dense_switch(layers: list[QuantLinear], reps: int = 5) -> dict[tuple[int, int, str], int]:
    """Measure once per (shape, kind) and set `dense_min_rows` on every layer; layers whose quantized
    kernel wins at every measured size drop their dense copy (its memory is freed). A layer without a
    kernel on its device keeps its copy and uses it for every pass."""
    found: dict[tuple[int, int, str], int] = {}
    for layer in layers:
        if layer.dense is None:
            continue
        if not layer.has_kernel:  # no kernel to win anywhere: the dense copy serves every pass
            layer.dense_min_rows = 1
            continue
        key = (layer.out_features, layer.in_features, layer.kind)
        if key not in found:
            found[key] = measure_dense_switch(layer, reps)
        layer.dense_min_rows = found[key]
        if found[key] >= NEVER:
            layer.drop_dense()
    return found
