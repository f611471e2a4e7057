"""RadixAttention: a radix tree over token ids whose values are KV-pool slot indices.

Ownership: every slot stored in the tree belongs to the tree until `evict` or `reset` hands it back
to the allocator. `insert` never frees anything: it reports how much of the key was already cached
and the caller frees its own duplicate slots. Nodes with `lock_ref > 0` are in use by running
requests and are never evicted; the sizes of locked and unlocked nodes are kept incrementally so the
scheduler can read `evictable_size()` / `protected_size()` in O(1) on every admission decision.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from radixfair.cache.allocator import SlotAllocator, SlotArray, empty_slots

TokenKey = tuple[int, ...]
# What callers may pass as token ids; stored keys are always tuples of Python ints.
TokenIds = Sequence[int] | npt.NDArray[np.integer[Any]]

# Below this many tokens a Python loop beats the slicing/allocation of a bisection step.
_LINEAR_SCAN_TOKENS = 8


class TreeNode:
    """One edge of the radix tree: a run of tokens and the KV slots that hold them."""

    __slots__ = ("children", "key", "last_access_time", "lock_ref", "node_id", "parent", "value")

    def __init__(
        self,
        key: TokenKey,
        value: SlotArray,
        parent: TreeNode | None,
        node_id: int,
        last_access_time: int = 0,
        lock_ref: int = 0,
    ) -> None:
        # Tuples: whole-edge comparison `query[i:i+n] == key` then runs at C speed.
        self.key = key
        self.value = value
        self.parent = parent
        self.children: dict[int, TreeNode] = {}
        self.lock_ref = lock_ref
        self.last_access_time = last_access_time
        # Breaks LRU ties deterministically (creation order) and keeps heap entries from ever
        # comparing nodes.
        self.node_id = node_id

    def __repr__(self) -> str:
        head = self.key[:4]
        more = "..." if len(self.key) > 4 else ""
        return (
            f"TreeNode(id={self.node_id}, key={head}{more} len={len(self.key)}, "
            f"lock_ref={self.lock_ref}, t={self.last_access_time}, children={len(self.children)})"
        )


class TreeListener(Protocol):
    """Told about every change of the tree's shape, so an index over it (the waiting queue's
    prefix matches, see sched/prefix_index.py) can stay exact without re-matching everything."""

    def on_split(self, upper: TreeNode, lower: TreeNode) -> None:
        """`lower` (the same object as before) lost its first len(upper.key) tokens to the new
        node `upper`, which took its place under the parent."""

    def on_add_leaf(self, parent: TreeNode, leaf: TreeNode) -> None:
        """`leaf` was added as a new child of `parent`."""

    def on_evict(self, node: TreeNode, parent: TreeNode) -> None:
        """The childless `node` was removed from under `parent`."""

    def on_reset(self) -> None:
        """The whole tree was dropped; only a new, empty root remains."""


class MatchResult(NamedTuple):
    slots: SlotArray
    last_node: TreeNode


def _as_key(key: TokenIds) -> TokenKey:
    if isinstance(key, tuple):
        return key
    if isinstance(key, np.ndarray):
        # tolist() yields Python ints; a tuple of np.int64 would compare equal but much slower.
        return tuple(key.tolist())
    return tuple(key)


def _common_prefix_len(edge: TokenKey, key: TokenKey, start: int) -> int:
    """Length of the common prefix of `edge` and `key[start:]`.

    Bisection over slice equality: each step compares only the not-yet-confirmed window, so the
    total work is O(len) C-level comparisons plus O(log len) Python steps instead of a Python loop
    over every token of what may be a thousand-token edge.
    """
    hi = min(len(edge), len(key) - start)
    if edge[:hi] == key[start : start + hi]:
        return hi
    lo = 0  # edge[:lo] matches; edge[:hi] does not
    while hi - lo > _LINEAR_SCAN_TOKENS:
        mid = (lo + hi) // 2
        if edge[lo:mid] == key[start + lo : start + mid]:
            lo = mid
        else:
            hi = mid
    while lo < hi and edge[lo] == key[start + lo]:
        lo += 1
    return lo


common_prefix_len = _common_prefix_len  # for read-only walkers of the tree (sched/prefix_index.py)


class RadixCache:
    def __init__(self, allocator: SlotAllocator) -> None:
        self.allocator = allocator
        self.evicted_tokens = 0
        self._ids = itertools.count()
        self._tick = 0
        self._listeners: list[TreeListener] = []
        self._new_root()

    def _new_root(self) -> None:
        # The root holds no tokens and is never locked, counted or evicted; lock_ref 1 keeps any
        # code that looks only at lock_ref from treating it as evictable.
        self.root_node = TreeNode((), empty_slots(), None, next(self._ids), lock_ref=1)
        self._evictable_size = 0
        self._protected_size = 0
        # Unlocked childless non-root nodes: exactly evict()'s candidates, kept incrementally so
        # evict does not walk the whole tree.
        self._evictable_leaves: set[TreeNode] = set()
        # Those candidates by (last_access_time, node_id), kept across evict() calls because a busy
        # server evicts a little on nearly every admission and re-heapifying thousands of leaves
        # each time dominated the scheduling decision. Entries go stale lazily: a node that stopped
        # being a candidate is skipped, one whose access time moved on is re-filed when popped.
        self._evict_heap: list[tuple[int, int, TreeNode]] = []

    def add_listener(self, listener: TreeListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: TreeListener) -> None:
        self._listeners.remove(listener)

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    # ------------------------------------------------------------------ lookup / insert

    def match_prefix(self, key: TokenIds) -> MatchResult:
        """Longest cached prefix of `key`: its slots and the node it ends at exactly."""
        k = _as_key(key)
        n = len(k)
        tick = self._next_tick()
        node = self.root_node
        values: list[SlotArray] = []
        i = 0
        while i < n:
            child = node.children.get(k[i])
            if child is None:
                break
            child.last_access_time = tick
            ck = child.key
            m = len(ck)
            if k[i : i + m] == ck:
                values.append(child.value)
                i += m
                node = child
                continue
            matched = _common_prefix_len(ck, k, i)
            # matched >= 1 because the child was found by its first token.
            node = self._split(child, matched)
            values.append(node.value)
            i += matched
            break
        # concatenate copies, so callers can never write into the tree's arrays.
        slots = np.concatenate(values) if values else empty_slots()
        return MatchResult(slots, node)

    def match_at(self, node: TreeNode, offset: int) -> MatchResult:
        """What `match_prefix` returns for a key whose longest cached prefix is already known to end
        `offset` tokens into `node`'s edge (a listener that tracks matches knows it): the same split,
        access-time refresh and slots, without comparing a single token."""
        root = self.root_node
        if node is not root and node.parent is None:
            raise RuntimeError(f"match_at on a node detached from the tree: {node!r}")
        tick = self._next_tick()
        if node is not root and offset < len(node.key):
            node.last_access_time = tick  # match_prefix touches the edge it stops inside, too
            node = self._split(node, offset)
        values: list[SlotArray] = []
        walker = node
        while walker is not root:
            walker.last_access_time = tick
            values.append(walker.value)
            parent = walker.parent
            assert parent is not None
            walker = parent
        values.reverse()
        slots = np.concatenate(values) if values else empty_slots()
        return MatchResult(slots, node)

    def insert(self, key: TokenIds, slots: SlotArray) -> int:
        """Cache `key` -> `slots`; returns how many leading tokens were already cached.

        The tree keeps its existing slots for that prefix; `slots[:returned]` stay the caller's to
        free. The tail is copied, so the caller may reuse its buffer (e.g. a req_to_token row).
        """
        k = _as_key(key)
        n = len(k)
        if len(slots) != n:
            raise ValueError(f"insert: {n} tokens but {len(slots)} slots")
        tick = self._next_tick()
        node = self.root_node
        i = 0
        while i < n:
            child = node.children.get(k[i])
            if child is None:
                self._add_leaf(node, k[i:], np.array(slots[i:], dtype=np.int64), tick)
                return i
            child.last_access_time = tick
            ck = child.key
            m = len(ck)
            if k[i : i + m] == ck:
                i += m
                node = child
                continue
            matched = _common_prefix_len(ck, k, i)
            node = self._split(child, matched)
            i += matched
            # The next lookup misses (the split-off child starts with a different token) or the
            # key is exhausted, so the loop ends on the next iteration.
        return n

    def _add_leaf(self, parent: TreeNode, key: TokenKey, value: SlotArray, tick: int) -> None:
        leaf = TreeNode(key, value, parent, next(self._ids), last_access_time=tick)
        if not parent.children:
            self._evictable_leaves.discard(parent)
        parent.children[key[0]] = leaf
        self._evictable_size += len(key)
        self._add_candidate(leaf)
        for listener in self._listeners:
            listener.on_add_leaf(parent, leaf)

    def _split(self, child: TreeNode, at: int) -> TreeNode:
        """Cut `child`'s edge after `at` tokens; returns the new upper node.

        The new node inherits lock_ref and access time, so sizes, the lock invariant
        (parent lock_ref >= child lock_ref) and the set of evictable leaves are all unchanged.
        """
        parent = child.parent
        assert parent is not None, "the root is never split"
        ck = child.key
        upper = TreeNode(
            ck[:at],
            child.value[:at],
            parent,
            next(self._ids),
            last_access_time=child.last_access_time,
            lock_ref=child.lock_ref,
        )
        parent.children[ck[0]] = upper
        child.key = ck[at:]
        child.value = child.value[at:]
        child.parent = upper
        upper.children[child.key[0]] = child
        for listener in self._listeners:
            listener.on_split(upper, child)
        return upper

    # ------------------------------------------------------------------ locking

    def inc_lock_ref(self, node: TreeNode) -> None:
        root = self.root_node
        while node is not root:
            parent = node.parent
            if parent is None:
                # Only the starting node can be detached (evicted or from before a reset): evict
                # detaches leaves only, so this fires before any counter has moved.
                raise RuntimeError(f"inc_lock_ref on a node detached from the tree: {node!r}")
            if node.lock_ref == 0:
                size = len(node.key)
                self._evictable_size -= size
                self._protected_size += size
                self._evictable_leaves.discard(node)
            node.lock_ref += 1
            node = parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        root = self.root_node
        if node is not root and node.lock_ref <= 0:
            # Checked up front: ancestors' lock_ref >= node's, so no partial update can follow.
            raise RuntimeError(f"dec_lock_ref underflow on {node!r}")
        while node is not root:
            if node.lock_ref <= 0:
                raise RuntimeError(f"dec_lock_ref underflow on ancestor {node!r}")
            if node.lock_ref == 1:
                size = len(node.key)
                self._evictable_size += size
                self._protected_size -= size
                if not node.children:
                    self._add_candidate(node)
            node.lock_ref -= 1
            parent = node.parent
            assert parent is not None, "a locked node is never detached"
            node = parent

    # ------------------------------------------------------------------ eviction

    def _add_candidate(self, node: TreeNode) -> None:
        self._evictable_leaves.add(node)
        heap = self._evict_heap
        heapq.heappush(heap, (node.last_access_time, node.node_id, node))
        if len(heap) > 2 * len(self._evictable_leaves) + 64:
            # mostly stale entries: rebuild so the heap stays proportional to the candidates
            self._evict_heap = [(n.last_access_time, n.node_id, n) for n in self._evictable_leaves]
            heapq.heapify(self._evict_heap)

    def _pop_lru_leaf(self) -> TreeNode | None:
        heap = self._evict_heap
        leaves = self._evictable_leaves
        while heap:
            t, node_id, node = heap[0]
            if node not in leaves:
                heapq.heappop(heap)
            elif t != node.last_access_time:
                # access times only grow, so the entry was filed too early: re-file at its real time
                heapq.heapreplace(heap, (node.last_access_time, node_id, node))
            else:
                heapq.heappop(heap)
                return node
        return None

    def evict(self, num_tokens: int) -> int:
        """Free least-recently-used unlocked leaves until `num_tokens` are freed or none is left."""
        if num_tokens <= 0 or not self._evictable_leaves:
            return 0
        root = self.root_node
        freed = 0
        to_free: list[SlotArray] = []
        while freed < num_tokens:
            node = self._pop_lru_leaf()
            if node is None:
                break
            parent = node.parent
            assert parent is not None
            to_free.append(node.value)
            size = len(node.key)
            freed += size
            self._evictable_size -= size
            self._evictable_leaves.discard(node)
            del parent.children[node.key[0]]
            # Detached nodes must not be mistaken for live ones by a stale holder.
            node.parent = None
            for listener in self._listeners:
                listener.on_evict(node, parent)
            if parent is not root and not parent.children and parent.lock_ref == 0:
                self._add_candidate(parent)
        self.allocator.free(np.concatenate(to_free))
        self.evicted_tokens += freed
        return freed

    # ------------------------------------------------------------------ sizes / maintenance

    def evictable_size(self) -> int:
        return self._evictable_size

    def protected_size(self) -> int:
        return self._protected_size

    def total_size(self) -> int:
        return sum(len(node.key) for node in self._iter_nodes())

    def _iter_nodes(self) -> Iterator[TreeNode]:
        """Every non-root node, depth first."""
        stack = list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def reset(self) -> None:
        """Drop the whole tree, returning every slot to the allocator; nothing may be locked.

        `evicted_tokens` is left alone: a flush is not an eviction.
        """
        if self._protected_size:
            raise RuntimeError(f"reset with {self._protected_size} tokens still locked")
        values = [node.value for node in self._iter_nodes()]
        if values:
            self.allocator.free(np.concatenate(values))
        for node in self._iter_nodes():
            node.parent = None
        self._new_root()
        for listener in self._listeners:
            listener.on_reset()

    def check_invariant(self) -> None:
        """Recompute everything the tree keeps incrementally; AssertionError on any mismatch."""
        root = self.root_node
        if root.key or len(root.value) or root.parent is not None:
            raise AssertionError(f"malformed root {root!r}")
        evictable = protected = 0
        leaves: set[TreeNode] = set()
        stack = [root]
        while stack:
            node = stack.pop()
            for first, child in node.children.items():
                if child.parent is not node:
                    raise AssertionError(f"{child!r} has parent {child.parent!r}, expected {node!r}")
                if not child.key or child.key[0] != first:
                    raise AssertionError(f"{child!r} filed under token {first}")
                if len(child.key) != len(child.value):
                    raise AssertionError(f"{child!r}: {len(child.key)} tokens, {len(child.value)} slots")
                if child.lock_ref < 0:
                    raise AssertionError(f"negative lock_ref on {child!r}")
                if node is not root and node.lock_ref < child.lock_ref:
                    raise AssertionError(f"{node!r} has a smaller lock_ref than its child {child!r}")
                if child.lock_ref:
                    protected += len(child.key)
                else:
                    evictable += len(child.key)
                    if not child.children:
                        leaves.add(child)
                stack.append(child)
        if (evictable, protected) != (self._evictable_size, self._protected_size):
            raise AssertionError(
                f"sizes drifted: walked evictable={evictable} protected={protected}, "
                f"counters evictable={self._evictable_size} protected={self._protected_size}"
            )
        if leaves != self._evictable_leaves:
            raise AssertionError(
                f"evictable leaves drifted: {len(leaves)} in the tree, {len(self._evictable_leaves)} "
                f"tracked, missing {sorted(n.node_id for n in leaves - self._evictable_leaves)}, "
                f"stale {sorted(n.node_id for n in self._evictable_leaves - leaves)}"
            )
