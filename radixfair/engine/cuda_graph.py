"""Decode steps replayed from captured CUDA graphs (`--cuda-graph-max-bs`, `--disable-cuda-graph`).

A small model's decode step on a GPU is bound by kernel launches, not by the GPU: replaying a
captured graph issues the whole step at once. A graph fixes every tensor's address and shape, so a
step is padded to a captured *bucket*: batch size up to the next captured size, K/V width up to the
next power of two. The addressing is made graph-safe by writing the step's inputs into static
buffers: padding rows read and write one scratch KV slot (the pool's last, which the scheduler never
hands out) and attend to it alone; padding K/V columns of real rows point at it too, masked out.

Graphs are captured lazily, on a bucket's first use, and share one memory pool. Steps a graph cannot
express run eagerly: several length groups or a cascade group, grammar-forced tokens (several query
rows per request), batches past `--cuda-graph-max-bs`, or K/V wider than the cap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from radixfair.engine.forward_batch import DecodeGroup, ForwardBatch, ForwardMode
from radixfair.engine.kv_pool import KVPool

logger = logging.getLogger(__name__)

MIN_KV_BUCKET = 256  # K/V widths are padded to a power of two from here


def batch_buckets(max_bs: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then every 8 up to `max_bs` (SGLang's spacing)."""
    sizes = [b for b in (1, 2, 4) if b < max_bs] + list(range(8, max_bs + 1, 8))
    if not sizes or sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sorted(set(sizes))


def kv_bucket(lmax: int) -> int:
    width = MIN_KV_BUCKET
    while width < lmax:
        width *= 2
    return width


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    logits: torch.Tensor  # [bs, vocab], written by each replay


class StaticDecodeInputs:
    """The static buffers a captured step reads, and the padded `ForwardBatch` over them. K/V
    addressing has a buffer per width so that every bucket's view is contiguous."""

    def __init__(self, max_bs: int, scratch_slot: int, device: torch.device) -> None:
        self.max_bs, self.scratch, self.device = max_bs, scratch_slot, device
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.out_slots = torch.full((max_bs,), scratch_slot, dtype=torch.int64, device=device)
        self.logits_index = torch.arange(max_bs, device=device)
        self._kv_index: dict[int, torch.Tensor] = {}  # width -> [max_bs, width]
        self._kv_mask: dict[int, torch.Tensor] = {}  # width -> [1, max_bs, 1, width]

    def _width(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        if width not in self._kv_index:
            self._kv_index[width] = torch.full((self.max_bs, width), self.scratch, dtype=torch.int64,
                                               device=self.device)
            self._kv_mask[width] = torch.full((1, self.max_bs, 1, width), float("-inf"), device=self.device)
        return self._kv_index[width], self._kv_mask[width]

    def forward_batch(self, bs: int, width: int) -> ForwardBatch:
        """The padded batch of bucket (bs, width), over the static buffers (whose addresses a graph keeps)."""
        kv_index, kv_mask = self._width(width)
        group = DecodeGroup(None, kv_index[:bs], kv_mask[:, :bs])
        return ForwardBatch(mode=ForwardMode.DECODE, input_ids=self.input_ids[:bs], positions=self.positions[:bs],
                            out_slots=self.out_slots[:bs], logits_index=self.logits_index[:bs],
                            decode_groups=[group])

    def fill(self, fb: ForwardBatch, bs: int, width: int) -> None:
        """Copy a plain decode batch (one group, one token per request) into bucket (bs, width)."""
        assert fb.decode_groups is not None
        g = fb.decode_groups[0]
        b, lmax = g.kv_index.shape
        kv_index, kv_mask = self._width(width)
        self.input_ids[:b].copy_(fb.input_ids)
        self.input_ids[b:bs].zero_()
        self.positions[:b].copy_(fb.positions)
        self.positions[b:bs].zero_()
        self.out_slots[:b].copy_(fb.out_slots)
        self.out_slots[b:bs].fill_(self.scratch)
        kv_index[:bs].fill_(self.scratch)
        kv_index[:b, :lmax].copy_(g.kv_index)
        kv_mask[:, :bs].fill_(float("-inf"))
        kv_mask[:, :b, :, :lmax].copy_(g.kv_mask)
        kv_mask[:, b:bs, :, 0] = 0.0  # a padding row attends to the scratch slot: no all -inf row


class CudaGraphRunner:
    """Runs plain decode steps of `model` through captured graphs; `None` from `run` means: run it
    eagerly."""

    def __init__(self, model: Any, kv: KVPool, max_bs: int, max_context_len: int) -> None:
        self.model, self.kv = model, kv
        self.buckets = batch_buckets(max_bs)
        self.max_width = kv_bucket(max_context_len)
        self.static = StaticDecodeInputs(self.buckets[-1], kv.scratch_slot, kv.k[0].device)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool: Any = None
        self.replays = 0

    def can_run(self, fb: ForwardBatch) -> bool:
        if fb.mode is not ForwardMode.DECODE or fb.decode_groups is None or len(fb.decode_groups) != 1:
            return False
        g = fb.decode_groups[0]
        b, lmax = g.kv_index.shape
        return (g.index is None and g.shared_index is None and b == len(fb.input_ids) <= self.buckets[-1]
                and lmax <= self.max_width)

    def bucket(self, fb: ForwardBatch) -> tuple[int, int]:
        assert fb.decode_groups is not None
        b, lmax = fb.decode_groups[0].kv_index.shape
        return next(s for s in self.buckets if s >= b), kv_bucket(lmax)

    def run(self, fb: ForwardBatch) -> torch.Tensor | None:
        if not self.can_run(fb):
            return None
        bs, width = self.bucket(fb)
        self.static.fill(fb, bs, width)
        g = self.graphs.get((bs, width))
        if g is None:
            g = self._capture(bs, width)
        g.graph.replay()
        self.replays += 1
        return g.logits[: len(fb.input_ids)]

    def _capture(self, bs: int, width: int) -> _Graph:
        padded = self.static.forward_batch(bs, width)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy initialisations happen outside the capture
                self.model(padded, self.kv)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model(padded, self.kv)
        if self.pool is None:
            self.pool = graph.pool()
        logger.info("captured a CUDA graph for decode batch %d, K/V width %d", bs, width)
        out = _Graph(graph, logits)
        self.graphs[(bs, width)] = out
        return out
