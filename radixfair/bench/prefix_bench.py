"""`radixfair bench prefix`: a few-shot workload (one shared prefix + unique suffixes), with the
radix cache and with `--disable-radix-cache`, in one process; plus the tree's own lookup cost."""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from radixfair.bench.report import print_table, write_json
from radixfair.config_flags import add_flags, flag_values
from radixfair.engine_args import EngineArgs

ENGINE_FLAGS = ("model", "dtype", "quantization", "disable_activation_quant", "max_total_tokens", "max_running_requests",
                "num_threads")


def make_requests(num: int, prefix_len: int, suffix_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lo = min(100, vocab // 4)
    prefix = rng.integers(lo, vocab, prefix_len).tolist()
    return [prefix + rng.integers(lo, vocab, suffix_len).tolist() for _ in range(num)]


def run_once(ns: argparse.Namespace, disable: bool, prompts: list[list[int]] | None) -> dict[str, Any]:
    from radixfair.engine.engine import Engine

    engine = Engine(disable_radix_cache=disable, **flag_values(EngineArgs, ns, only=ENGINE_FLAGS))
    try:
        if prompts is None:
            prompts = make_requests(ns.num_requests, ns.prefix_len, ns.suffix_len,
                                    engine.model_config.vocab_size, ns.seed)
        # warm-up on unrelated tokens, then start from an empty cache
        engine.generate(input_ids=[5, 6, 7, 8], sampling_params={"max_new_tokens": 2})
        engine.flush_cache()
        params = {"max_new_tokens": ns.output_len, "temperature": 0.0, "ignore_eos": True}
        t = time.perf_counter()
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        dt = time.perf_counter() - t
        stats = engine.get_stats()
    finally:
        engine.shutdown()
    tokens = sum(len(p) for p in prompts) + sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {"prompts": prompts, "seconds": dt, "tok_s": tokens / dt, "req_s": len(prompts) / dt,
            "hit_rate": stats.hit_rate, "outputs": [o["output_ids"] for o in outs]}


def main(ns: argparse.Namespace) -> int:
    from radixfair.bench.match_prefix_bench import bench_match_prefix

    print(f"{ns.num_requests} requests: shared prefix {ns.prefix_len} + unique suffix {ns.suffix_len} tokens, "
          f"{ns.output_len} output tokens each")
    cached = run_once(ns, disable=False, prompts=None)
    print(f"radix cache on:  {cached['seconds']:.1f} s")
    uncached = run_once(ns, disable=True, prompts=cached["prompts"])
    print(f"radix cache off: {uncached['seconds']:.1f} s")
    same = sum(a == b for a, b in zip(cached["outputs"], uncached["outputs"], strict=True))
    match_s = bench_match_prefix(tree_tokens=100_000, prompt_len=4096, repeats=200, seed=ns.seed)
    row = {
        "cached_tok_s": cached["tok_s"],
        "uncached_tok_s": uncached["tok_s"],
        "cached_req_s": cached["req_s"],
        "uncached_req_s": uncached["req_s"],
        "speedup": cached["tok_s"] / uncached["tok_s"],
        "hit_rate": cached["hit_rate"],
        "uncached_hit_rate": uncached["hit_rate"],
        "identical_outputs": same,
        "num_requests": ns.num_requests,
        "match_prefix_us_median": match_s * 1e6,
    }
    print_table(
        ["", "radix cache", "no cache", "ratio"],
        [
            ["tokens/s (prompt + output)", f"{row['cached_tok_s']:.0f}", f"{row['uncached_tok_s']:.0f}",
             f"{row['speedup']:.2f}x"],
            ["requests/s", f"{row['cached_req_s']:.2f}", f"{row['uncached_req_s']:.2f}", ""],
            ["prefix hit rate", f"{row['hit_rate']:.3f}", f"{row['uncached_hit_rate']:.3f}", ""],
            ["same greedy output", f"{same}/{ns.num_requests}", "", ""],
            ["match_prefix 4k prompt / 100k-token tree", f"{row['match_prefix_us_median']:.0f} µs median", "", ""],
        ],
    )
    write_json(ns.json, row)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("prefix", help="shared-prefix workload with and without the radix cache")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--suffix-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    add_flags(p.add_argument_group("engine"), EngineArgs, only=ENGINE_FLAGS,
              defaults={"max_total_tokens": 131072, "max_running_requests": 64})
    p.set_defaults(func=main)
