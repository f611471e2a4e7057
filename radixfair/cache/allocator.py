"""Hands out KV-pool slot indices. Pure Python + numpy so the scheduler and simulator can use it."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

SlotArray = npt.NDArray[np.int64]


def empty_slots() -> SlotArray:
    return np.empty(0, dtype=np.int64)


class SlotAllocator:
    """A free list of slot indices `[0, size)`.

    Slots are handed out from the front of a sorted free list, so a fresh request's prefill
    usually gets a contiguous run (cheap to gather); freed slots are appended and the list is
    re-sorted lazily, only when an allocation needs more than the sorted head holds.
    """

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"KV pool size must be positive, got {size}")
        self.size = size
        self._free: SlotArray = np.arange(size, dtype=np.int64)
        self._released: list[SlotArray] = []
        self._released_count = 0

    def available(self) -> int:
        return len(self._free) + self._released_count

    def alloc(self, n: int) -> SlotArray | None:
        """`n` slots, or None when fewer than `n` are free (the caller evicts and retries)."""
        if n == 0:
            return empty_slots()
        if n > len(self._free):
            if n > self.available():
                return None
            self._merge_released()
        out = self._free[:n]
        self._free = self._free[n:]
        return out

    def free(self, slots: SlotArray) -> None:
        if len(slots):
            self._released.append(np.asarray(slots, dtype=np.int64))
            self._released_count += len(slots)

    def _merge_released(self) -> None:
        self._free = np.sort(np.concatenate([self._free, *self._released]))
        self._released = []
        self._released_count = 0

    def reset(self) -> None:
        self._free = np.arange(self.size, dtype=np.int64)
        self._released = []
        self._released_count = 0
