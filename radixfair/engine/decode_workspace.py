"""Contiguous per-request copies of the K/V context that decode attention reads in place.

The paged pool scatters a request's tokens over arbitrary slots, so attending to them needs a
gather of the whole context in every layer of every step. The workspace keeps each decoding
request's context contiguous instead: filled once from the pool (by one gather) when the request
joins the decode set or its context changes, then appended one token per step beside the pool
write. Attention then multiplies strided views of it, with no copy. The pool stays the source of
truth: a workspace row is only trusted while its request, its length and its slots are unchanged.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from radixfair.engine.forward_batch import WorkspaceStep
from radixfair.engine.kv_pool import KVPool
from radixfair.sched.request import Req

MIN_CAPACITY = 256  # tokens per row; capacities grow by doubling from here
MIN_ROWS = 1
# Attention reads each row up to its group's longest context. Rows are kept in length order (longest
# first) so that contiguous groups have similar lengths: a join or a finish breaks the order, and the
# rows are re-sorted when the reads saved over SORT_HORIZON steps outweigh the copy.
MAX_GROUPS = 4
GROUP_OVERHEAD = 384  # row x columns read that one more group's ops cost (measured: ~30 us a layer)
SORT_HORIZON = 4  # steps a sorted order is counted on to last (joins come every few steps)


def length_groups(lens_desc: np.ndarray) -> tuple[tuple[int, int, int], ...]:
    """Contiguous (start, end, longest) groups over rows sorted longest first, minimizing the row x
    columns read plus GROUP_OVERHEAD per extra group."""
    n = len(lens_desc)
    best: tuple[tuple[int, int, int], ...] = ((0, n, int(lens_desc[0])),)
    best_cost = n * int(lens_desc[0])
    for k in range(2, min(MAX_GROUPS, n) + 1):
        bounds = np.linspace(0, n, k + 1).astype(int)
        groups = tuple((int(a), int(b), int(lens_desc[a])) for a, b in itertools.pairwise(bounds))
        cost = sum((b - a) * c for a, b, c in groups) + (k - 1) * GROUP_OVERHEAD
        if cost < best_cost:
            best, best_cost = groups, cost
    return best


@dataclass
class _Entry:
    owner: Req  # compared by identity: request ids are only unique per client
    slot: int  # workspace row
    filled: int  # positions 0..filled-1 hold the request's K/V


class DecodeWorkspace:
    """Workspace rows for the requests of the decode set, bounded by `max_tokens` (rows x capacity)."""

    def __init__(self, kv: KVPool, max_tokens: int, native: bool = False) -> None:
        self.kv = kv
        self.max_tokens = max_tokens
        # attention by the C kernel: it reads each row to its own length, so rows are never sorted
        # and no mask or write indices are built
        self.native = native
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.rows_cap = 0
        self.capacity = 0
        self._by_row: dict[int, _Entry] = {}  # req_to_token row -> entry
        self._pending: list[tuple[_Entry, int]] = []  # set `filled` once the pass has run

    def allocated_bytes(self) -> int:
        k0 = self.kv.k[0]
        per_token = KVPool.bytes_per_token(self.kv.num_layers, k0.shape[0], k0.shape[2], k0.dtype)
        return self.rows_cap * self.capacity * per_token

    def invalidate(self, row: int) -> None:
        """The slots of table row `row` changed (a prefill, a new occupant, deduplicated slots)."""
        self._by_row.pop(row, None)

    def drop_finished(self) -> None:
        """Free the rows of finished requests, and the memory once no row is used."""
        for r in [r for r, e in self._by_row.items() if e.owner.finished]:
            del self._by_row[r]
        if not self._by_row:
            self.release()

    def release(self) -> None:
        """Give the memory back (past the bound, or nothing decodes)."""
        self.k, self.v = [], []
        self.rows_cap = self.capacity = 0
        self._by_row.clear()

    def commit(self) -> None:
        """The pass prepared last ran: its rows now hold their new token too."""
        for entry, filled in self._pending:
            entry.filled = filled
        self._pending = []

    def prepare(
        self, reqs: list[Req], rows: list[int], positions: list[int], table: torch.Tensor
    ) -> WorkspaceStep | None:
        """Assign and fill workspace rows for a decode step of one token per request (`rows`: their
        req_to_token rows, `positions`: where each new token goes). None past the memory bound:
        the caller gathers from the pool instead."""
        self._pending = []
        present = set(rows)
        for r in [r for r in self._by_row if r not in present]:  # left the decode set
            del self._by_row[r]
        need_cap = max(positions) + 1
        need_rows = len(rows)
        cap = max(self.capacity, MIN_CAPACITY)
        while cap < need_cap:
            cap *= 2
        rows_cap = max(self.rows_cap, MIN_ROWS)
        while rows_cap < need_rows:
            rows_cap *= 2
        if rows_cap * cap > self.max_tokens:
            self.release()
            return None
        if (rows_cap, cap) != (self.rows_cap, self.capacity):
            self._grow(rows_cap, cap)
        used = {e.slot for e in self._by_row.values()}
        free = iter(s for s in range(self.rows_cap) if s not in used)
        stale: list[tuple[int, int, int]] = []  # (table row, workspace row, length)
        slots: list[int] = []
        for req, row, pos in zip(reqs, rows, positions, strict=True):
            e = self._by_row.get(row)
            if e is None or e.owner is not req:
                e = _Entry(req, next(free), 0) if e is None else _Entry(req, e.slot, 0)
                self._by_row[row] = e
            if e.filled != pos:
                stale.append((row, e.slot, pos))
            slots.append(e.slot)
            self._pending.append((e, pos + 1))
        dev = table.device
        if stale:
            self._fill(stale, table)
        lens_np = np.asarray(positions, dtype=np.int64) + 1
        if self.native:
            slots_t = torch.tensor(slots, dtype=torch.int64, device=dev)
            return WorkspaceStep(self.k, self.v, slots_t, torch.from_numpy(lens_np).to(dev), True, None, None,
                                 None, max(slots) + 1, need_cap, None, ())
        slots, groups = self._sort(rows, slots, lens_np)
        width = max(slots) + 1
        lmax = need_cap
        slots_t = torch.tensor(slots, dtype=torch.int64, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        kvh = self.kv.k[0].shape[0]
        heads = torch.arange(kvh, device=dev)
        base = (slots_t.unsqueeze(1) * kvh + heads).view(-1)  # [B * kv_heads] (row, head) of each new K/V
        write_index = base * self.capacity + pos_t.repeat_interleave(kvh)
        # K is held transposed, [.., head_dim, capacity] (the scores' matmul reads it ~1.7x faster
        # that way on a CPU): a new key is a column, written through a [row, head, position] view
        k_write = (slots_t.repeat_interleave(kvh), heads.repeat(len(slots)), pos_t.repeat_interleave(kvh))
        lens = torch.ones(width, dtype=torch.int64, device=dev)  # rows outside the batch: one column
        lens[slots_t] = pos_t + 1
        valid = torch.arange(lmax, device=dev).unsqueeze(0) < lens.unsqueeze(1)
        dtype = self.kv.k[0].dtype
        mask = torch.zeros(width, lmax, dtype=dtype, device=dev).masked_fill_(~valid, float("-inf"))
        mask = mask.repeat_interleave(kvh, dim=0).unsqueeze(1)  # [width * kv_heads, 1, lmax]
        identity = slots == list(range(len(slots)))
        return WorkspaceStep(self.k, self.v, slots_t, pos_t + 1, False, write_index, k_write,
                             None if identity else slots_t, width, lmax, mask, groups)

    def _sort(self, rows: list[int], slots: list[int],
              lens: np.ndarray) -> tuple[list[int], tuple[tuple[int, int, int], ...]]:
        """Move the batch's rows to slots 0..n-1, longest first, when that pays (see SORT_HORIZON).
        Returns each batch row's slot and the attention groups: length groups over sorted rows, else
        one group of every slot up to the widest."""
        n = len(slots)
        order = np.argsort(-lens, kind="stable")  # batch indices, longest first
        groups = length_groups(lens[order])
        lmax = int(lens.max())
        width = max(slots) + 1
        if width == n:  # compact: sorted if the lengths do not rise along the slots (ties in any order)
            by_slot = np.empty(n, dtype=np.int64)
            by_slot[slots] = lens
            if bool((np.diff(by_slot) <= 0).all()):
                return slots, groups
        grouped = sum((b - a) * c for a, b, c in groups)
        if (width * lmax - grouped) * SORT_HORIZON <= 2 * n * lmax:  # a move reads and writes K and V
            return slots, ((0, width, lmax),)
        target = np.empty(n, dtype=np.int64)
        target[order] = np.arange(n)
        dev = self.kv.k[0].device
        perm = torch.tensor([slots[i] for i in order], dtype=torch.int64, device=dev)
        for i in range(self.kv.num_layers):
            k, v = self.k[i], self.v[i]
            k[:n, :, :, :lmax].copy_(k[:, :, :, :lmax].index_select(0, perm))
            v[:n, :, :lmax].copy_(v[:, :, :lmax].index_select(0, perm))
        for row, new in zip(rows, target.tolist(), strict=True):
            self._by_row[row].slot = new
        return target.tolist(), groups

    def _grow(self, rows_cap: int, cap: int) -> None:
        kvh, d = self.kv.k[0].shape[0], self.kv.k[0].shape[2]
        dtype, dev = self.kv.k[0].dtype, self.kv.k[0].device
        old_r, old_c = self.rows_cap, self.capacity
        new_k, new_v = [], []
        for i in range(self.kv.num_layers):
            nk = torch.zeros(rows_cap, kvh, d, cap, dtype=dtype, device=dev)  # transposed
            nv = torch.zeros(rows_cap, kvh, cap, d, dtype=dtype, device=dev)
            if self.k:  # sizes only grow
                nk[:old_r, :, :, :old_c] = self.k[i]
                nv[:old_r, :, :old_c] = self.v[i]
            new_k.append(nk)
            new_v.append(nv)
        self.k, self.v = new_k, new_v
        self.rows_cap, self.capacity = rows_cap, cap

    def _fill(self, stale: list[tuple[int, int, int]], table: torch.Tensor) -> None:
        """Copy positions 0..length-1 of each stale row from the pool, one gather per layer."""
        dev = table.device
        rows_t = torch.tensor([r for r, _, _ in stale], dtype=torch.int64, device=dev)
        dst = torch.tensor([s for _, s, _ in stale], dtype=torch.int64, device=dev)
        width = max(n for _, _, n in stale)
        if width == 0:
            return
        index = table[rows_t, :width]  # entries past a row's length are stale but valid slots
        n = len(stale)
        kvh, d = self.kv.k[0].shape[0], self.kv.k[0].shape[2]
        flat = index.reshape(-1)
        for i in range(self.kv.num_layers):
            k = self.kv.k[i].index_select(1, flat).view(kvh, n, width, d).permute(1, 0, 3, 2)
            self.k[i][:, :, :, :width].index_copy_(0, dst, k)
            v = self.kv.v[i].index_select(1, flat).view(kvh, n, width, d).transpose(0, 1)
            self.v[i][:, :, :width].index_copy_(0, dst, v)
