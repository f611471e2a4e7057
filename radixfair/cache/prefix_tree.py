"""A radix tree over token ids: longest-prefix match, insert, locking and LRU eviction of leaves.

Nodes may carry a value aligned with their tokens (the KV-pool slots that hold them, in
`RadixCache`) or none at all: the scheduler's in-batch index and a router's view of what each worker
has cached need only the shape of the prefixes. Sizes of locked and unlocked nodes are kept
incrementally, so `evictable_size()` / `protected_size()` are O(1); listeners hear about every change
of shape, so an index over the tree can stay exact without re-matching.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from radixfair.cache.allocator import SlotArray

TokenKey = tuple[int, ...]
# What callers may pass as token ids; stored keys are always tuples of Python ints.
TokenIds = Sequence[int] | npt.NDArray[np.integer[Any]]

# Below this many tokens a Python loop beats the slicing/allocation of a bisection step.
_LINEAR_SCAN_TOKENS = 8


class TreeNode:
    """One edge of the tree: a run of tokens and, optionally, the values (KV slots) that hold them."""

    __slots__ = ("children", "key", "last_access_time", "lock_ref", "node_id", "parent", "value")

    def __init__(
        self,
        key: TokenKey,
        value: SlotArray | None,
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


class PrefixMatch(NamedTuple):
    length: int  # tokens of the key the tree holds
    last_node: TreeNode  # the node the match ends at exactly (split there if it ended inside an edge)


class Anchor(NamedTuple):
    """Where a key's longest cached prefix ends, found without changing the tree."""

    node: TreeNode
    offset: int  # tokens matched inside node's edge (len(node.key) when the match ends at its end)
    length: int  # tokens matched in all


def as_key(key: TokenIds) -> TokenKey:
    if isinstance(key, tuple):
        return key
    if isinstance(key, np.ndarray):
        # tolist() yields Python ints; a tuple of np.int64 would compare equal but much slower.
        return tuple(key.tolist())
    return tuple(key)


def common_prefix_len(edge: TokenKey, key: TokenKey, start: int) -> int:
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


class PrefixTree:
    """Token-id radix tree. With `max_tokens`, inserts evict least-recently-used unlocked leaves
    beyond that many tokens (a bounded index); without, only `evict` does."""

    def __init__(self, max_tokens: int | None = None) -> None:
        if max_tokens is not None and max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self.max_tokens = max_tokens
        self.evicted_tokens = 0
        self._ids = itertools.count()
        self._tick = 0
        self._listeners: list[TreeListener] = []
        self._new_root()

    def _new_root(self) -> None:
        # The root holds no tokens and is never locked, counted or evicted; lock_ref 1 keeps any
        # code that looks only at lock_ref from treating it as evictable.
        self.root_node = TreeNode((), None, None, next(self._ids), lock_ref=1)
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

    def match(self, key: TokenIds) -> PrefixMatch:
        """Longest held prefix of `key`. Refreshes access times along the path and splits the edge
        the match ends inside, so the returned node ends exactly at the match (it can be locked)."""
        k = as_key(key)
        n = len(k)
        tick = self._next_tick()
        node = self.root_node
        i = 0
        while i < n:
            child = node.children.get(k[i])
            if child is None:
                break
            child.last_access_time = tick
            ck = child.key
            m = len(ck)
            if k[i : i + m] == ck:
                i += m
                node = child
                continue
            matched = common_prefix_len(ck, k, i)
            # matched >= 1 because the child was found by its first token.
            node = self._split(child, matched)
            i += matched
            break
        return PrefixMatch(i, node)

    def peek(self, key: TokenIds, node: TreeNode | None = None, matched: int = 0) -> Anchor:
        """Where the longest held prefix of `key` ends, without touching the tree (no split, no
        access-time refresh: ordering a queue must not change the cache). Starts at the root, or
        at `node` for a key whose first `matched` tokens are known to end exactly at `node`."""
        k = as_key(key)
        n = len(k)
        if node is None:
            node = self.root_node
        offset = len(node.key)
        while matched < n:
            child = node.children.get(k[matched])
            if child is None:
                break
            ck = child.key
            m = len(ck)
            if k[matched : matched + m] == ck:
                matched += m
                node, offset = child, m
                continue
            c = common_prefix_len(ck, k, matched)
            return Anchor(child, c, matched + c)
        return Anchor(node, offset, matched)

    def match_at(self, node: TreeNode, offset: int) -> TreeNode:
        """What `match` returns as `last_node` for a key whose longest held prefix is known to end
        `offset` tokens into `node`'s edge (an index that tracks matches knows it): the same split
        and access-time refresh, without comparing a single token."""
        root = self.root_node
        if node is not root and node.parent is None:
            raise RuntimeError(f"match_at on a node detached from the tree: {node!r}")
        tick = self._next_tick()
        if node is not root and offset < len(node.key):
            node.last_access_time = tick  # match touches the edge it stops inside, too
            node = self._split(node, offset)
        walker = node
        while walker is not root:
            walker.last_access_time = tick
            parent = walker.parent
            assert parent is not None
            walker = parent
        return node

    def insert(self, key: TokenIds, value: SlotArray | None = None) -> int:
        """Hold `key` (with `value`, one entry per token, if the tree stores values); returns how
        many leading tokens it already held. The tree keeps what it had for that prefix; the tail
        of `value` is copied, so the caller may reuse its buffer."""
        k = as_key(key)
        n = len(k)
        if value is not None and len(value) != n:
            raise ValueError(f"insert: {n} tokens but {len(value)} values")
        tick = self._next_tick()
        node = self.root_node
        i = 0
        while i < n:
            child = node.children.get(k[i])
            if child is None:
                tail = None if value is None else np.array(value[i:], dtype=np.int64)
                self._add_leaf(node, k[i:], tail, tick)
                self._enforce_bound()
                return i
            child.last_access_time = tick
            ck = child.key
            m = len(ck)
            if k[i : i + m] == ck:
                i += m
                node = child
                continue
            matched = common_prefix_len(ck, k, i)
            node = self._split(child, matched)
            i += matched
            # The next lookup misses (the split-off child starts with a different token) or the
            # key is exhausted, so the loop ends on the next iteration.
        return n

    def path_values(self, node: TreeNode) -> SlotArray:
        """The values from the root down to `node`, concatenated (a copy)."""
        values: list[SlotArray] = []
        root = self.root_node
        while node is not root:
            if node.value is not None:
                values.append(node.value)
            parent = node.parent
            assert parent is not None, "a node on a live path is never detached"
            node = parent
        if not values:
            return np.empty(0, dtype=np.int64)
        values.reverse()
        return np.concatenate(values)

    def _add_leaf(self, parent: TreeNode, key: TokenKey, value: SlotArray | None, tick: int) -> None:
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
            None if child.value is None else child.value[:at],
            parent,
            next(self._ids),
            last_access_time=child.last_access_time,
            lock_ref=child.lock_ref,
        )
        parent.children[ck[0]] = upper
        child.key = ck[at:]
        if child.value is not None:
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
        """Drop least-recently-used unlocked leaves until `num_tokens` are gone or none is left;
        returns the tokens dropped."""
        if num_tokens <= 0 or not self._evictable_leaves:
            return 0
        root = self.root_node
        freed = 0
        values: list[SlotArray] = []
        while freed < num_tokens:
            node = self._pop_lru_leaf()
            if node is None:
                break
            parent = node.parent
            assert parent is not None
            if node.value is not None:
                values.append(node.value)
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
        self._release(values)
        self.evicted_tokens += freed
        return freed

    def _enforce_bound(self) -> None:
        if self.max_tokens is not None:
            over = self.total_tokens() - self.max_tokens
            if over > 0:
                self.evict(over)

    def _release(self, values: list[SlotArray]) -> None:
        """The values of dropped nodes (a tree that stores KV slots hands them back here)."""

    # ------------------------------------------------------------------ sizes / maintenance

    def evictable_size(self) -> int:
        return self._evictable_size

    def protected_size(self) -> int:
        return self._protected_size

    def total_tokens(self) -> int:
        """Tokens held, from the incremental counters (O(1))."""
        return self._evictable_size + self._protected_size

    def total_size(self) -> int:
        """Tokens held, recounted by walking the tree (tests)."""
        return sum(len(node.key) for node in self._iter_nodes())

    def _iter_nodes(self) -> Iterator[TreeNode]:
        """Every non-root node, depth first."""
        stack = list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def reset(self) -> None:
        """Drop the whole tree; nothing may be locked. `evicted_tokens` is left alone: a flush is
        not an eviction."""
        if self._protected_size:
            raise RuntimeError(f"reset with {self._protected_size} tokens still locked")
        nodes = list(self._iter_nodes())
        self._release([node.value for node in nodes if node.value is not None])
        for node in nodes:
            node.parent = None
        self._new_root()
        for listener in self._listeners:
            listener.on_reset()

    def check_invariant(self) -> None:
        """Recompute everything the tree keeps incrementally; AssertionError on any mismatch."""
        root = self.root_node
        if root.key or root.value is not None or root.parent is not None:
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
                if child.value is not None and len(child.key) != len(child.value):
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
