"""Micro-benchmark of `RadixCache.match_prefix` (the scheduler calls it for every waiting request):
`bench prefix` reports it as `match_prefix_us_median`; `python -m radixfair.bench.match_prefix_bench`
prints it alone."""

from __future__ import annotations

import statistics
import time

import numpy as np

from radixfair.cache.allocator import SlotAllocator
from radixfair.cache.radix_cache import RadixCache

_VOCAB = 32_000
_SEQ_LEN = 1_000
_TURNS = 3  # multi-turn conversations: 3 turns of _SEQ_LEN tokens, each extending the previous


def build_tree(tree_tokens: int, seed: int = 0) -> tuple[RadixCache, list[list[int]]]:
    """A tree holding about `tree_tokens` tokens in ~1k-token sequences that share prefixes.

    Returns the cache and the multi-turn conversations (3k tokens each) that queries can share a
    2-3k prefix with. Tokens are drawn from [0, _VOCAB); queries diverge using tokens >= _VOCAB.
    """
    rng = np.random.default_rng(seed)
    allocator = SlotAllocator(tree_tokens + 2 * _TURNS * _SEQ_LEN)
    cache = RadixCache(allocator)
    seqs: list[list[int]] = []
    conversations: list[list[int]] = []
    held = 0

    def add(key: list[int]) -> None:
        nonlocal held
        slots = allocator.alloc(len(key))
        assert slots is not None
        cached = cache.insert(key, slots)
        allocator.free(slots[:cached])
        held += len(key) - cached

    while held < tree_tokens:
        if len(seqs) % 10 == 0:
            conv: list[int] = []
            for _ in range(_TURNS):
                conv = conv + rng.integers(0, _VOCAB, _SEQ_LEN).tolist()
                add(conv)
            conversations.append(conv)
            seqs.append(conv[:_SEQ_LEN])
            continue
        shared: list[int] = []
        if seqs and rng.random() < 0.5:
            base = seqs[int(rng.integers(len(seqs)))]
            shared = base[: int(rng.integers(1, _SEQ_LEN))]
        seq = shared + rng.integers(0, _VOCAB, _SEQ_LEN - len(shared)).tolist()
        add(seq)
        seqs.append(seq)
    return cache, conversations


def bench_match_prefix(
    tree_tokens: int = 100_000, prompt_len: int = 4096, repeats: int = 200, seed: int = 0
) -> float:
    """Median seconds of one `match_prefix` of a `prompt_len`-token list against the tree.

    Every repeat uses a fresh prompt that shares a random 2,000-3,000-token prefix with one
    conversation and diverges inside an edge, so each call pays the worst case: whole-edge
    compares, the in-edge bisection, a node split, and the list-to-tuple conversion.
    """
    cache, conversations = build_tree(tree_tokens, seed)
    rng = np.random.default_rng(seed + 1)
    times: list[float] = []
    for _ in range(repeats):
        conv = conversations[int(rng.integers(len(conversations)))]
        shared = int(rng.integers(2_000, min(3_000, prompt_len) + 1))
        tail = rng.integers(_VOCAB, 2 * _VOCAB, max(prompt_len - shared, 0)).tolist()
        prompt = conv[:shared] + tail
        t0 = time.perf_counter()
        result = cache.match_prefix(prompt)
        times.append(time.perf_counter() - t0)
        assert len(result.slots) == min(shared, prompt_len)
    return statistics.median(times)


if __name__ == "__main__":
    print(f"match_prefix median: {bench_match_prefix() * 1e6:.1f} us")
