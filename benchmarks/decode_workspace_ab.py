"""Same-process A/B of a decode step with the decode workspace and with the paged K/V gather.

    python benchmarks/decode_workspace_ab.py [--rounds 6] [--batch 16] [--context 400] [--steps 6]

One engine (the default model and flags) is loaded; `--batch` requests with `--context`-token contexts on
scattered pool slots are prefilled, then decode steps alternate between the two paths (the runner's
workspace swapped for None), `--steps` timed steps per turn after one untimed step (where the workspace
refills the rows that went stale while the gather ran). Prints each path's median ms/step and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from radixfair.engine.engine import Engine
from radixfair.sampling_params import SamplingParams
from radixfair.sched.batch import BatchMode, ScheduledBatch
from radixfair.sched.request import Req


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=400)
    ap.add_argument("--steps", type=int, default=6)
    ns = ap.parse_args()
    b, ctx = ns.batch, ns.context
    pool = 16384
    engine = Engine(max_total_tokens=pool, max_running_requests=b)
    runner = engine.runner
    ws = runner.workspace
    if ws is None:
        raise SystemExit("the engine runs without a decode workspace (CUDA graphs, or --decode-workspace-tokens 0)")
    rng = np.random.default_rng(0)
    free = rng.permutation(pool).astype(np.int64)  # scattered slots, as a long-running pool hands out
    taken = 0

    def take(n: int) -> np.ndarray:
        nonlocal taken
        taken += n
        return free[taken - n : taken]

    reqs = [Req(origin_input_ids=[1], sampling_params=SamplingParams()) for _ in range(b)]
    slots = [take(ctx) for _ in range(b)]
    for i in range(0, b, 4):
        idx = list(range(i, min(b, i + 4)))
        n = len(idx)
        runner.run(ScheduledBatch(
            mode=BatchMode.PREFILL, reqs=[reqs[j] for j in idx], input_ids=rng.integers(3, 20000, n * ctx),
            positions=np.tile(np.arange(ctx), n), out_slots=np.concatenate([slots[j] for j in idx]),
            rows=np.asarray(idx), prefix_lens=np.zeros(n, np.int64), extend_lens=np.full(n, ctx),
            sample=[True] * n, row_slots=[slots[j] for j in idx], logprob_positions=[None] * n))
    pos = np.full(b, ctx, dtype=np.int64)

    def step() -> None:
        nonlocal pos
        new = take(b)
        for j in range(b):
            slots[j] = np.concatenate([slots[j], new[j : j + 1]])
        runner.run(ScheduledBatch(
            mode=BatchMode.DECODE, reqs=reqs, input_ids=rng.integers(3, 20000, b), positions=pos.copy(),
            out_slots=new, rows=np.arange(b), prefix_lens=pos.copy(), extend_lens=np.ones(b, np.int64),
            sample=[True] * b, row_slots=list(slots)))
        pos = pos + 1

    times: dict[str, list[float]] = {"workspace": [], "gather": []}
    try:
        for rnd in range(ns.rounds):
            for name in times:
                runner.workspace = ws if name == "workspace" else None
                step()
                t = time.perf_counter()
                for _ in range(ns.steps):
                    step()
                times[name].append((time.perf_counter() - t) / ns.steps * 1e3)
            print(rnd, {k: round(v[-1], 1) for k, v in times.items()}, flush=True)
    finally:
        engine.shutdown()
    for k, v in times.items():
        print(f"{k}: median {statistics.median(v):.1f} ms/step, min {min(v):.1f}")
    print(f"gather / workspace (medians): {statistics.median(times['gather']) / statistics.median(times['workspace']):.2f}x;"
          f" workspace {ws.allocated_bytes() / 1e6:.0f} MB ({ws.rows_cap} rows x {ws.capacity} tokens)")


if __name__ == "__main__":
    main()
