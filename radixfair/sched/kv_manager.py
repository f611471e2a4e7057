"""Who owns which KV slot: the free list, the radix tree, and each admitted request's slots and row.

A request's `slots` cover the first `kv_len` tokens of its `fill_ids`; the first `prefix_len` of
them belong to the radix tree, locked through `last_node` so they cannot be evicted while the
request uses them, and the rest are the request's own until it publishes them to the tree (after
each prefill chunk, and when it leaves). With the radix cache disabled nothing is ever published:
a request's slots go straight back to the free list when it leaves.

The executor keeps a `req_to_token` row per admitted request; when the tree hands a request its own
copy of slots the request computed twice, the row is stale and is rewritten before the next pass
(`take_row_updates`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from radixfair.cache.allocator import SlotAllocator, SlotArray
from radixfair.cache.radix_cache import RadixCache
from radixfair.sched.batch import IntArray

if TYPE_CHECKING:
    from radixfair.cache.prefix_tree import TreeNode
    from radixfair.sched.request import Req


class KVManager:
    def __init__(self, pool_size: int, num_rows: int, cache_enabled: bool = True,
                 allocator: SlotAllocator | None = None) -> None:
        self.pool_size = pool_size
        self.cache_enabled = cache_enabled
        self.allocator = allocator or SlotAllocator(pool_size)
        self.tree = RadixCache(self.allocator)
        self._free_rows = list(range(num_rows))[::-1]
        self._dirty_rows: list[Req] = []  # slots changed since the executor last wrote their rows

    # ---- capacity --------------------------------------------------------------------------------
    def available(self) -> int:
        """Slots an allocation can get: free ones plus what eviction can free."""
        return self.allocator.available() + self.tree.evictable_size()

    def has_free_row(self) -> bool:
        return bool(self._free_rows)

    def alloc(self, n: int) -> SlotArray | None:
        slots = self.allocator.alloc(n)
        if slots is None and self.cache_enabled:
            self.tree.evict(n - self.allocator.available())
            slots = self.allocator.alloc(n)
        return slots

    def ensure_free(self, n: int) -> bool:
        """Evict until `n` slots are free, if the tree can give them up."""
        if self.allocator.available() < n and self.cache_enabled:
            self.tree.evict(n - self.allocator.available())
        return self.allocator.available() >= n

    # ---- a request's KV --------------------------------------------------------------------------
    def match(self, req: Req, fill: list[int], anchor: tuple[TreeNode, int] | None) -> None:
        """Give `req` the longest cached prefix of `fill` it may reuse, locked; `anchor` is where
        that match is already known to end (a prefix index tracks it), sparing the token walk."""
        if not self.cache_enabled:
            req.prefix_len = 0
            return
        m = self.tree.match_prefix_at(*anchor) if anchor is not None else self.tree.match_prefix(
            fill[: req.max_prefix_len()])
        req.slots = m.slots
        req.prefix_len = len(m.slots)
        req.last_node = m.last_node
        self.tree.inc_lock_ref(m.last_node)

    def unmatch(self, req: Req) -> None:
        if req.last_node is not None:
            self.tree.dec_lock_ref(req.last_node)
        req.reset_kv()

    def start(self, req: Req, take: int) -> bool:
        """A row and `take` fresh slots after the matched prefix, for a request being admitted."""
        if not self._free_rows:
            return False
        new = self.alloc(take)
        if new is None:
            return False
        req.row = self._free_rows.pop()
        req.slots = req.concat_slots(req.slots, new)
        return True

    def grow(self, req: Req, take: int) -> bool:
        new = self.alloc(take)
        if new is None:
            return False
        req.slots = req.concat_slots(req.slots, new)
        return True

    def extend_by_one(self, reqs: list[Req]) -> SlotArray:
        """One more slot for each of `reqs` (a decode step); the caller made room first."""
        new = self.alloc(len(reqs))
        assert new is not None, "ensure_free guaranteed the slots"
        for i, req in enumerate(reqs):
            req.slots = req.concat_slots(req.slots, new[i : i + 1])
        return new

    def extend(self, reqs: list[Req], counts: list[int]) -> SlotArray:
        """`counts[i]` more slots for `reqs[i]`, in one allocation (a decode step in which some
        requests also compute forced tokens); the caller made room first."""
        new = self.alloc(sum(counts))
        assert new is not None, "ensure_free guaranteed the slots"
        off = 0
        for req, n in zip(reqs, counts, strict=True):
            req.slots = req.concat_slots(req.slots, new[off : off + n])
            off += n
        return new

    def discard_uncomputed(self, req: Req, computed: int) -> None:
        """Free the slots past the first `computed` (a pass that never ran)."""
        if req.kv_len > computed:
            self.allocator.free(req.slots[computed:])
            req.slots = req.slots[:computed]

    def publish(self, req: Req) -> None:
        """Insert the request's computed KV into the tree and re-lock at the new, deeper node, so
        other requests can share it while this one goes on."""
        if not self.cache_enabled:
            return
        n_kv = req.kv_len
        key = req.fill_ids[:n_kv]
        dup = self.tree.insert(key, req.slots)
        if dup > req.prefix_len:
            # the tree already held these tokens (another request computed them meanwhile): use its
            # slots and free ours; the executor's row must then be rewritten before the next pass
            self.allocator.free(req.slots[req.prefix_len : dup])
            self._dirty_rows.append(req)
        m = self.tree.match_prefix(key)
        assert len(m.slots) == n_kv, "the tree must now hold the whole computed sequence"
        assert req.last_node is not None
        self.tree.dec_lock_ref(req.last_node)
        self.tree.inc_lock_ref(m.last_node)
        req.last_node = m.last_node
        req.slots = m.slots
        req.prefix_len = n_kv

    def release(self, req: Req) -> None:
        """The request leaves (finished, aborted or retracted): its KV goes to the tree (or the free
        list) and its row is free again."""
        if req.row >= 0:
            self._free_rows.append(req.row)
        if not self.cache_enabled:
            self.allocator.free(req.slots)
        elif req.last_node is not None:
            dup = self.tree.insert(req.fill_ids[: req.kv_len], req.slots)
            if dup > req.prefix_len:
                self.allocator.free(req.slots[req.prefix_len : dup])
            self.tree.dec_lock_ref(req.last_node)
        req.reset_kv()

    def take_row_updates(self) -> list[tuple[int, IntArray]]:
        updates = [(r.row, r.slots) for r in self._dirty_rows if r.row >= 0 and not r.finished]
        self._dirty_rows = []
        return updates

    # ---- maintenance -----------------------------------------------------------------------------
    def flush(self) -> None:
        self.tree.reset()

    def check_invariant(self) -> tuple[int, int, int]:
        """`free + evictable + protected == pool size`, when no request holds private slots, and the
        tree's own bookkeeping; AssertionError naming the figures otherwise."""
        self.tree.check_invariant()
        free = self.allocator.available()
        ev = self.tree.evictable_size()
        prot = self.tree.protected_size()
        if free + ev + prot != self.pool_size:
            raise AssertionError(
                f"KV invariant broken: free {free} + evictable {ev} + protected {prot} "
                f"!= pool size {self.pool_size}"
            )
        return free, ev, prot
