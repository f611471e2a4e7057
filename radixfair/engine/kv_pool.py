"""Preallocated per-layer K/V buffers addressed by slot index, and the request -> slots table."""

from __future__ import annotations

import torch


class KVPool:
    """K and V for `size` token slots in every layer: `k[layer]` is `[kv_heads, size, head_dim]`.

    Heads come first so that gathering a batch's slots yields `[kv_heads, B * L, head_dim]`,
    which views as `[kv_heads, B, L, head_dim]`: a batched matmul operand with no copy.
    Slot indices come from the scheduler's `SlotAllocator`; this class only owns memory.
    """

    def __init__(
        self,
        size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.size = size
        self.num_layers = num_layers
        # one slot past `size`, never handed out: what padding rows of a captured CUDA graph write and read
        self.scratch_slot = size
        self.k: list[torch.Tensor] = [
            torch.zeros(num_kv_heads, size + 1, head_dim, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        self.v: list[torch.Tensor] = [
            torch.zeros(num_kv_heads, size + 1, head_dim, dtype=dtype, device=device) for _ in range(num_layers)
        ]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * itemsize

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store `k`, `v` (`[T, kv_heads, head_dim]`) at `slots` (`[T]`)."""
        self.k[layer].index_copy_(1, slots, k.transpose(0, 1))
        self.v[layer].index_copy_(1, slots, v.transpose(0, 1))


class ReqToTokenTable:
    """Row r holds the KV slot of each position of the request that owns row r."""

    def __init__(self, rows: int, max_context_len: int, device: torch.device) -> None:
        self.rows = rows
        self.max_context_len = max_context_len
        self.table = torch.zeros(rows, max_context_len, dtype=torch.int64, device=device)
