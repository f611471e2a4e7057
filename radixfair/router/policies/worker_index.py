"""The router's approximate view of what each worker has cached: one token-id radix tree per
worker, learned from the prompts the router sent there, forgetting least-recently-used prefixes.

One tree per worker rather than sgl-router's single tree with a set of tenants on every node:
each worker's KV cache is its own LRU radix tree, so a per-worker index forgets the way the worker
does (a prefix hot on one worker and cold on another is dropped from the cold one only), its size
bound is per worker as sgl-router's `max_tree_size` is per tenant, and each tree is the project's
one tested `PrefixTree`, unchanged. The price is one match per worker for each request (each
O(prompt) token comparisons, at C speed on tuples) and a prefix kept once per worker that holds it,
as the workers' caches keep it.
"""

from __future__ import annotations

from collections.abc import Iterable

from radixfair.cache.prefix_tree import PrefixTree, TokenKey


class WorkerPrefixIndex:
    def __init__(self, max_tree_size: int, eviction_interval_secs: float = 0.0) -> None:
        if max_tree_size <= 0:
            raise ValueError(f"max_tree_size must be positive, got {max_tree_size}")
        self.max_tree_size = max_tree_size
        self.eviction_interval_secs = eviction_interval_secs
        self.trees: dict[str, PrefixTree] = {}
        self._last_trim: float | None = None

    def match(self, tokens: TokenKey, workers: Iterable[str]) -> dict[str, int]:
        """Tokens of `tokens` each worker is believed to hold as a prefix (read-only: deciding where
        to send a request must not refresh what it only looked at)."""
        trees = self.trees
        out: dict[str, int] = {}
        for w in workers:
            tree = trees.get(w)
            out[w] = 0 if tree is None else tree.peek(tokens).length
        return out

    def insert(self, worker: str, tokens: TokenKey, now: float) -> None:
        """`worker` was sent `tokens`: it holds them now, most recently used."""
        tree = self.trees.get(worker)
        if tree is None:
            tree = self.trees[worker] = PrefixTree()
        tree.insert(tokens)
        self.trim(now)

    def trim(self, now: float) -> int:
        """Every `eviction_interval_secs` (on every call when it is 0), cut each tree back to
        `max_tree_size` tokens, least recently used leaves first, as sgl-router's eviction thread
        does; returns the tokens dropped."""
        if self._last_trim is not None and now - self._last_trim < self.eviction_interval_secs:
            return 0
        self._last_trim = now
        dropped = 0
        for tree in self.trees.values():
            over = tree.total_tokens() - self.max_tree_size
            if over > 0:
                dropped += tree.evict(over)
        return dropped

    def size(self, worker: str) -> int:
        tree = self.trees.get(worker)
        return 0 if tree is None else tree.total_tokens()

    def remove_worker(self, worker: str) -> None:
        self.trees.pop(worker, None)
