"""RadixAttention: a prefix tree over token ids whose values are KV-pool slot indices.

Ownership: every slot stored in the tree belongs to the tree until `evict` or `reset` hands it back
to the allocator. `insert` never frees anything: it reports how much of the key was already cached
and the caller frees its own duplicate slots. Nodes with `lock_ref > 0` are in use by running
requests and are never evicted.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from radixfair.cache.allocator import SlotAllocator, SlotArray
from radixfair.cache.prefix_tree import PrefixTree, TokenIds, TreeNode


class MatchResult(NamedTuple):
    slots: SlotArray  # a copy: callers can never write into the tree's arrays
    last_node: TreeNode


class RadixCache(PrefixTree):
    def __init__(self, allocator: SlotAllocator) -> None:
        super().__init__()
        self.allocator = allocator

    def match_prefix(self, key: TokenIds) -> MatchResult:
        """Longest cached prefix of `key`: its slots and the node it ends at exactly."""
        m = self.match(key)
        return MatchResult(self.path_values(m.last_node), m.last_node)

    def match_prefix_at(self, node: TreeNode, offset: int) -> MatchResult:
        """`match_prefix` for a key whose match is known to end `offset` tokens into `node`."""
        last = self.match_at(node, offset)
        return MatchResult(self.path_values(last), last)

    def insert(self, key: TokenIds, value: SlotArray | None = None) -> int:
        """Cache `key` -> `value` (its slots); returns how many leading tokens were already
        cached: `value[:returned]` stay the caller's to free."""
        if value is None:
            raise ValueError("insert: a KV cache needs the slots of the tokens it caches")
        return super().insert(key, value)

    def _release(self, values: list[SlotArray]) -> None:
        if values:
            self.allocator.free(np.concatenate(values))
