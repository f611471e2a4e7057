"""Weight-only quantized linear layers: int8 (per output channel) and int4 (groups of 32 along the input).

A decode step at small batch reads every weight once and does little arithmetic per byte, so its
time is the weight bytes over the memory bandwidth: int8 halves them against bf16, int4 quarters
them. At large batches (prefill chunks, wide decode batches) the same matmul is compute-bound and
PyTorch's weight-only kernels, which widen every weight to 16 bits, lose. A layer then has two
other paths: int8 x int8 matmuls with per-token activation quantization (`radixfair.engine.w8a8`,
CPUs; an int8 copy of its weights, the codes themselves for int8 layers) and a dense copy of its
*dequantized* weights. Which path serves a pass of how many tokens is measured at load
(`tune_paths`, the layers of one shape streamed as a decode step streams them); copies no size
uses are freed. The weight-only and dense paths multiply by the same quantized model, the W8A8
path by its int8 rounding with int8 activations (`--disable-activation-quant` keeps it out).

The kernels are PyTorch's own (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`). Where
one does not run (the int4 one is CPU-only; a device or dtype an op lacks), the layer multiplies by
the weights dequantized on the fly, so the same code runs everywhere; `tune_dense_switch` then finds
the dense copy faster at every size and uses it.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from radixfair.engine.vnni import Q4Weights, Q8Weights, supports_shape, vnni_kernels
from radixfair.engine.w8a8 import W8A8Matmul, make_w8a8, smoothing

logger = logging.getLogger(__name__)

QUANT_MODES = ("auto", "none", "int8", "int4")
QUANT_KINDS = ("int8", "int4")
INT4_GROUP = 32  # a Q4_0 / Q4_1 block: a GGUF's groups map one to one
# row counts `tune_paths` times; past the largest, the largest's choice holds
TUNE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# layers of one shape timed together when tuning: enough weight bytes to leave the caches, as a
# decode step, which reads every layer once, does
TUNE_LAYERS = 12
TUNE_LAYERS_LARGE = 3  # from 64 rows on a pass is compute-bound: a few layers time it as well
SWITCH_MARGIN = 1.1  # how much faster another path must be to take over from the next size on


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
                 keep_dense: bool = True, w8a8: bool = False, act_absmax: torch.Tensor | None = None,
                 vnni: bool = False) -> None:
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
        # the same codes in the VNNI kernels' layout (see `radixfair.engine.vnni`), where they run
        kernels = vnni_kernels() if vnni and device.type == "cpu" and supports_shape(*weight.shape) else None
        self.vnni: Q4Weights | Q8Weights | None = None
        if kind == "int8":
            q, scale = quantize_int8(weight)
            scale = scale.to(self.kernel_dtype)  # what the kernel multiplies by: the dense copy uses the same
            self.register_buffer("qweight", q, persistent=False)
            self.register_buffer("scales", scale, persistent=False)
            self._kernel_fn: Callable[[torch.Tensor], torch.Tensor] = self._int8_kernel
            dense = dequantize_int8(q, scale, dtype)
            if kernels is not None:
                self.vnni = Q8Weights.pack(q, scale)
        else:
            q, scale, zero = quantize_int4(weight)
            scale, zero = scale.to(self.kernel_dtype), zero.to(self.kernel_dtype)
            dense = dequantize_int4(q, scale, zero, dtype)
            if kernels is not None:
                self.vnni = Q4Weights.pack(q, scale, zero)
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
        # int8 x int8 with per-token activations: an int8 rounding of the dequantized weights, smoothed
        # by `act_absmax` (the inputs' channel maxima) when given, else an int8 layer's own codes
        self.w8a8: W8A8Matmul | None = None
        if w8a8:
            smooth = None if act_absmax is None else smoothing(act_absmax.to(device), dense)
            if smooth is None and kind == "int8":
                self.w8a8 = make_w8a8(self.qweight, self.scales.float())
            else:
                self.w8a8 = make_w8a8(*quantize_int8(dense if smooth is None else dense.float() * smooth), smooth)
        # (first row count, path) ascending: a pass of `rows` tokens takes the last entry <= rows
        self.route: list[tuple[int, str]] = [(1, "weight_only")]
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

    def vnni_forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = vnni_kernels()
        assert self.vnni is not None and kernels is not None
        xf = x.float().contiguous()
        if isinstance(self.vnni, Q4Weights):
            y = kernels.q4_matmul(xf, self.vnni)
        else:
            y = kernels.q8_matmul(xf, self.vnni)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def w8a8_forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.w8a8 is not None
        y = self.w8a8(x)
        return y if self.bias is None else y + self.bias

    def path_forward(self, path: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return {"weight_only": self.quantized_forward, "vnni": self.vnni_forward, "w8a8": self.w8a8_forward,
                "dense": self.dense_forward}[path]

    def available_paths(self) -> list[str]:
        paths = ["weight_only"] if self.has_kernel or self.dense is None else []
        return (paths + (["vnni"] if self.vnni is not None else []) + (["w8a8"] if self.w8a8 is not None else [])
                + (["dense"] if self.dense is not None else []))

    def path_for(self, rows: int) -> str:
        return self.route[bisect.bisect_right(self.route, (rows, "~")) - 1][1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        path = self.path_for(x2.shape[0])
        if path == "dense":
            y = self.dense_forward(x2)
        elif path == "vnni":
            y = self.vnni_forward(x2)
        elif path == "w8a8":
            y = self.w8a8_forward(x2)
        else:
            y = self.quantized_forward(x2)
        return y.view(*shape[:-1], self.out_features)

    def set_route(self, route: Sequence[tuple[int, str]]) -> None:
        """Use `route` ((first row count, path) ascending, from 1) and free the copies it never uses."""
        merged: list[tuple[int, str]] = []
        for rows, path in route:
            if path != "weight_only" and path not in self.available_paths():  # weight_only always runs
                raise ValueError(f"{self.kind} layer has no {path} path")
            if not merged or merged[-1][1] != path:
                merged.append((rows, path))
        if not merged or merged[0][0] != 1:
            raise ValueError("a route starts at 1 row")
        self.route = merged
        used = {p for _, p in merged}
        if "dense" not in used:
            self.dense = None
        if "w8a8" not in used:
            self.w8a8 = None
        if "vnni" not in used:
            self.vnni = None

    def drop_dense(self) -> None:
        self.set_route([(r, p) for r, p in self.route if p != "dense"] or [(1, "weight_only")])

    def quantized_bytes(self) -> int:
        """Bytes the quantized kernel reads: codes, scales (and zeros), bias."""
        n = self.qweight.numel() * self.qweight.element_size()
        n += sum(t.numel() * t.element_size() for t in (getattr(self, "scales", None),
                                                       getattr(self, "scale_zeros", None), self.bias)
                 if t is not None)
        return n

    def bytes_read(self, rows: int) -> int:
        """Weight bytes one pass of `rows` tokens reads through this layer."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        path = self.path_for(rows)
        if path == "dense" and self.dense is not None:
            return self.dense.numel() * self.dense.element_size() + bias
        if path == "w8a8" and self.w8a8 is not None:
            return self.w8a8.nbytes + bias
        if path == "vnni" and self.vnni is not None:
            return self.vnni.nbytes + bias
        return self.quantized_bytes()

    def copy_bytes(self) -> int:
        """Memory of the layer's other paths' copies (dense, int8, VNNI layout), beside its codes."""
        dense = 0 if self.dense is None else self.dense.numel() * self.dense.element_size()
        return (dense + (0 if self.w8a8 is None else self.w8a8.nbytes)
                + (0 if self.vnni is None else self.vnni.nbytes))

    def extra_repr(self) -> str:
        route = ", ".join(f"{p} from {r}" for r, p in self.route)
        return f"{self.in_features} -> {self.out_features}, {self.kind}: {route} rows"


# ---- choosing the path per batch size ------------------------------------------------------------
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


def measure_route(layers: Sequence[QuantLinear], reps: int = 5,
                  pass_threads: Callable[[int], None] | None = None) -> list[tuple[int, str]]:
    """The fastest path at each of TUNE_ROWS for layers of one shape, timed over up to TUNE_LAYERS
    of them in turn (a single layer's weights stay in cache and flatter the bandwidth-bound paths).
    `pass_threads(rows)`, when given, sets the threads a pass of that size runs on."""
    group = list(layers[:TUNE_LAYERS])
    first = group[0]
    device = first.qweight.device
    paths = first.available_paths()
    gen = torch.Generator(device).manual_seed(0)  # not the global generator: sampling seeds stay as set
    route: list[tuple[int, str]] = []
    lo = 1
    with torch.inference_mode():
        for rows in TUNE_ROWS:
            if pass_threads is not None:
                pass_threads(rows)
            x = torch.randn(rows, first.in_features, generator=gen, device=device).to(first.dtype)
            timed = group if rows < 64 else group[:TUNE_LAYERS_LARGE]
            fns = {p: [layer.path_forward(p) for layer in timed] for p in paths}
            times = {p: _best_time(lambda: [f(x) for f in fns[p]], device, reps)  # noqa: B023 - used at once
                     for p in paths}
            best = min(times, key=lambda p: times[p])
            # once passes are compute-bound, a path twice as slow as the best does not catch up at
            # larger sizes: stop timing it
            if rows >= 32:
                paths = [p for p in paths if times[p] <= 2 * times[best]]
            # the previous size's path stays unless another is clearly faster: a noisy timing should
            # not flip the route back and forth
            if route and times[route[-1][1]] <= SWITCH_MARGIN * times[best]:
                best = route[-1][1]
            route.append((lo, best))
            lo = rows + 1
    return route


def tune_paths(layers: list[QuantLinear], reps: int = 5,
               pass_threads: Callable[[int], None] | None = None) -> dict[tuple[int, int, str], list[tuple[int, str]]]:
    """Measure once per (shape, kind) and set every layer's route; copies no size uses are freed. A
    layer without a weight-only kernel on its device never takes that path. `pass_threads`: as for
    `measure_route`."""
    by_key: dict[tuple[int, int, str], list[QuantLinear]] = {}
    for layer in layers:
        by_key.setdefault((layer.out_features, layer.in_features, layer.kind), []).append(layer)
    found: dict[tuple[int, int, str], list[tuple[int, str]]] = {}
    for key, group in by_key.items():
        paths = group[0].available_paths()
        route = [(1, paths[0])] if len(paths) == 1 else measure_route(group, reps, pass_threads)
        for layer in group:
            layer.set_route(route)
        found[key] = group[0].route  # as set: runs of one path merged
    return found
