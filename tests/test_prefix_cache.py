"""RadixAttention in the engine: prefix reuse, multi-turn reuse, eviction under a small pool."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from radixfair.engine.engine import Engine

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engines(tiny_llama: Path) -> Iterator[tuple[Engine, Engine]]:
    cached = Engine(str(tiny_llama), dtype="float32", max_total_tokens=4096, chunked_prefill_size=256)
    plain = Engine(str(tiny_llama), dtype="float32", max_total_tokens=4096, disable_radix_cache=True)
    try:
        yield cached, plain
    finally:
        cached.shutdown()
        plain.shutdown()


def tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 300, n).tolist()


def test_common_prefix_is_reused_with_identical_output(engines: tuple[Engine, Engine]) -> None:
    cached, plain = engines
    cached.flush_cache()
    prefix = tokens(1, 500)
    a, b = prefix + tokens(2, 20), prefix + tokens(3, 30)
    params = {"max_new_tokens": 12, **GREEDY}
    out_a = cached.generate(input_ids=a, sampling_params=params)
    out_b = cached.generate(input_ids=b, sampling_params=params)
    assert out_a["meta_info"]["cached_tokens"] == 0
    assert out_b["meta_info"]["cached_tokens"] >= 500
    ref_b = plain.generate(input_ids=b, sampling_params=params)
    assert ref_b["meta_info"]["cached_tokens"] == 0
    assert out_b["output_ids"] == ref_b["output_ids"]
    stats = cached.get_stats()
    assert stats.cached_tokens >= 500 and 0 < stats.hit_rate < 1


def test_requests_arriving_together_prefill_the_shared_prefix_once(engines: tuple[Engine, Engine]) -> None:
    cached, plain = engines
    cached.flush_cache()
    before = cached.get_stats().prefill_tokens
    prefix = tokens(4, 400)
    prompts = [prefix + tokens(10 + i, 8) for i in range(6)]
    params = {"max_new_tokens": 4, **GREEDY}
    outs = cached.generate(input_ids=prompts, sampling_params=params)
    computed = cached.get_stats().prefill_tokens - before
    # the prefix once, plus each request's own suffix
    assert computed <= 400 + 6 * 8 + 6, computed
    assert sum(o["meta_info"]["cached_tokens"] >= 400 for o in outs) == 5
    refs = plain.generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in refs]


def test_multi_turn_reuses_the_previous_answer(engines: tuple[Engine, Engine]) -> None:
    cached, _ = engines
    cached.flush_cache()
    turn1 = tokens(5, 120)
    out1 = cached.generate(input_ids=turn1, sampling_params={"max_new_tokens": 20, **GREEDY})
    turn2 = turn1 + out1["output_ids"] + tokens(6, 15)
    out2 = cached.generate(input_ids=turn2, sampling_params={"max_new_tokens": 5, **GREEDY})
    # the whole first turn, answer included (all but its last token, whose KV was never computed)
    assert out2["meta_info"]["cached_tokens"] >= len(turn1) + len(out1["output_ids"]) - 1


def test_small_pool_evicts_and_completes_everything(tiny_llama: Path) -> None:
    pool = 600
    with Engine(str(tiny_llama), dtype="float32", max_total_tokens=pool) as engine:
        prompts = [tokens(100 + i, 150) for i in range(10)]
        outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 10, **GREEDY})
        assert all(o["meta_info"]["completion_tokens"] == 10 for o in outs)
        stats = engine.get_stats()
        assert stats.evicted_tokens > 0
        engine.wait_idle()
        free, evictable, protected = engine.check_invariant()
        assert free + evictable + protected == pool and protected == 0


def test_flush_cache_empties_the_tree(engines: tuple[Engine, Engine]) -> None:
    cached, _ = engines
    cached.generate(input_ids=tokens(7, 50), sampling_params={"max_new_tokens": 2, **GREEDY})
    assert cached.get_stats().tree_tokens > 0
    cached.flush_cache()
    stats = cached.get_stats()
    assert stats.tree_tokens == 0 and stats.free_slots == stats.max_total_tokens
