"""`radixfair bench calibrate`: fit the simulator's cost model to this project's own executor.

Every forward pass of `ModelRunner.run` is timed while a short synthetic workload goes through a real
`Engine`: single prompts of several lengths (prefill only), prompts that share a cached prefix, and
groups of 1-16 requests at two context lengths that then decode together. Each pass gives
(prefill_tokens, decode_reqs, kv_tokens_read, seconds), the same features `CostModel.batch_time`
charges, and a non-negative least-squares fit of `t = a + b*prefill + c*decode_reqs + e*kv` becomes a
profile JSON. A random 30% of the passes is held out of a first fit to say how well it predicts
unseen passes (R^2, median relative error); the written coefficients are refitted on all passes.

`sim_vs_real` replays one small trace on the real engine and in the simulator with a cost model, to
compare throughput and mean latency.
"""

from __future__ import annotations

import argparse
import itertools
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from radixfair.bench.report import print_table, write_json
from radixfair.sim.cost_model import CostModel, batch_features

FEATURES = ("const", "prefill_tokens", "decode_reqs", "kv_tokens_read")


@dataclass(frozen=True)
class PassSample:
    mode: str  # "prefill" | "decode"
    prefill_tokens: int
    decode_reqs: int
    kv_tokens_read: int
    reqs: int
    seconds: float


@dataclass(frozen=True)
class FitQuality:
    n_train: int
    n_test: int
    r2: float  # on the held-out passes
    median_rel_error: float  # median |predicted - measured| / measured, held-out passes
    median_rel_error_prefill: float | None
    median_rel_error_decode: float | None


def design_matrix(samples: Sequence[PassSample]) -> np.ndarray:
    return np.array([[1.0, s.prefill_tokens, s.decode_reqs, s.kv_tokens_read] for s in samples], dtype=np.float64)


def fit_nonnegative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (a cost model's terms are costs). With four columns
    the exact solution is the best of the unconstrained fits over column subsets whose coefficients
    all come out >= 0 (the optimum is the unconstrained optimum on its own support)."""
    if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
        raise ValueError("need a non-empty design matrix and one time per row")
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    xs = x / scale  # columns of similar size: the features span 1 to ~1e4
    best: np.ndarray | None = None
    best_res = float("inf")
    cols = range(x.shape[1])
    for k in range(1, x.shape[1] + 1):
        for subset in itertools.combinations(cols, k):
            idx = list(subset)
            coef, *_ = np.linalg.lstsq(xs[:, idx], y, rcond=None)
            if (coef < 0).any():
                continue
            full = np.zeros(x.shape[1])
            full[idx] = coef
            res = float(np.sum((xs @ full - y) ** 2))
            if res < best_res - 1e-18:
                best, best_res = full, res
    if best is None:  # only if y is all <= 0: the zero model
        best = np.zeros(x.shape[1])
    out: np.ndarray = best / scale
    return out


def evaluate(coef: np.ndarray, samples: Sequence[PassSample]) -> tuple[float, float, dict[str, float | None]]:
    """(R^2, median relative error, per-mode median relative error) of `coef` on `samples`."""
    x = design_matrix(samples)
    y = np.array([s.seconds for s in samples])
    pred = x @ coef
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - pred) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    rel = np.abs(pred - y) / np.maximum(y, 1e-12)
    modes = np.array([s.mode for s in samples])
    per: dict[str, float | None] = {
        m: float(np.median(rel[modes == m])) if (modes == m).any() else None for m in ("prefill", "decode")
    }
    return r2, float(np.median(rel)), per


def split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < test_fraction < 1:
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * test_fraction))
    if n - n_test < len(FEATURES):
        raise ValueError(f"{n} timed passes are too few to fit {len(FEATURES)} coefficients and hold some out")
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def fit_profile(samples: Sequence[PassSample], name: str, describe: str, test_fraction: float = 0.3,
                seed: int = 0) -> tuple[CostModel, FitQuality]:
    """Held-out quality from a fit on the rest; the profile from a fit on every pass."""
    train, test = split(len(samples), test_fraction, seed)
    tr = [samples[i] for i in train]
    te = [samples[i] for i in test]
    coef_tr = fit_nonnegative(design_matrix(tr), np.array([s.seconds for s in tr]))
    r2, mre, per = evaluate(coef_tr, te)
    quality = FitQuality(len(tr), len(te), r2, mre, per["prefill"], per["decode"])
    coef = fit_nonnegative(design_matrix(samples), np.array([s.seconds for s in samples]))
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    source = (
        f"Measured by `radixfair bench calibrate` on {when}: non-negative least-squares fit of "
        f"t = a + b*prefill_tokens + c*decode_reqs + e*kv_tokens_read to {len(samples)} timed "
        f"ModelRunner.run passes ({sum(s.mode == 'prefill' for s in samples)} prefill, "
        f"{sum(s.mode == 'decode' for s in samples)} decode) of {describe}. Workload: single prompts of "
        f"16-512 tokens, prompts sharing a cached 256-token prefix, groups of 1-16 requests at 32 and 256 "
        f"prompt tokens decoding together. Held-out check (fit on a random {1 - test_fraction:.0%}, tested on "
        f"the other {len(te)} passes): R^2 {r2:.3f}, median relative error {mre:.1%}"
        f"{_mode_errors(per)}. Coefficients refitted on all passes. Valid for this machine, model and dtype only."
    )
    model = CostModel(name=name, a=float(coef[0]), b_prefill_token=float(coef[1]), c_decode_req=float(coef[2]),
                      e_kv_token=float(coef[3]), source=source)
    return model, quality


def _mode_errors(per: dict[str, float | None]) -> str:
    parts = [f"{m} {v:.1%}" for m, v in per.items() if v is not None]
    return f" ({', '.join(parts)})" if parts else ""


# ---- measuring the engine ----------------------------------------------------------------------


def instrument(engine: Any) -> list[PassSample]:
    """Time every `engine.runner.run` from now on; returns the list the samples are appended to."""
    import torch

    samples: list[PassSample] = []
    runner = engine.runner
    original = runner.run
    cuda = engine.device.type == "cuda"

    def timed(batch: Any) -> Any:
        if cuda:
            torch.cuda.synchronize(engine.device)
        t = time.perf_counter()
        out = original(batch)
        if cuda:
            torch.cuda.synchronize(engine.device)
        dt = time.perf_counter() - t
        p, d, kv = batch_features(batch)
        samples.append(PassSample("prefill" if d == 0 else "decode", p, d, kv, len(batch.reqs), dt))
        return out

    runner.run = timed  # the engine's loop looks the method up on every pass
    return samples


def synthetic_workload(engine: Any, repeats: int = 1, seed: int = 0) -> None:
    """Drive the engine through prefill and decode passes of varied shapes (see the module doc)."""
    vocab = int(engine.model_config.vocab_size)
    lo = min(100, vocab // 4)
    rng = np.random.default_rng(seed)

    def ids(n: int) -> list[int]:
        return rng.integers(lo, vocab, n).tolist()

    def run(prompts: list[list[int]], new: int) -> None:
        engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": new, "ignore_eos": True,
                                                            "temperature": 0.0})

    for _ in range(repeats):
        for n in (16, 48, 96, 160, 256, 384, 512):  # prefill only
            run([ids(n)], 1)
        shared = ids(256)
        for n in (16, 64, 128, 256):  # a cached prefix: kv read exceeds the tokens computed
            run([shared + ids(n)], 1)
        for b in (1, 4, 8, 16):
            for n in (32, 256):
                run([ids(n) for _ in range(b)], 12)


def calibrate_engine(engine: Any, repeats: int = 1, seed: int = 0, warmup: bool = True) -> list[PassSample]:
    samples = instrument(engine)
    if warmup:  # first passes pay one-off allocation and dispatch costs
        engine.generate(input_ids=[[7] * 24, [8] * 40], sampling_params={"max_new_tokens": 4, "ignore_eos": True})
        samples.clear()
    synthetic_workload(engine, repeats, seed)
    return list(samples)


def describe_engine(engine: Any) -> str:
    dev = engine.device
    where = (f"CUDA {_cuda_name(dev)}" if dev.type == "cuda"
             else f"CPU ({_torch_threads()} torch threads, {os.cpu_count()} cores)")
    dtype = str(engine.dtype).removeprefix("torch.")
    return f"{Path(str(engine.model_path)).name}, {dtype}, on {where}"


def _cuda_name(dev: Any) -> str:
    import torch

    return str(torch.cuda.get_device_name(dev))


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def profile_name(engine: Any) -> str:
    stem = Path(str(engine.model_path)).name.lower().removesuffix(".gguf").replace("_", "-").replace(".", "-")
    return f"{engine.device.type}-{stem}-calibrated"


# ---- sim vs real -------------------------------------------------------------------------------


def sim_vs_real(engine: Any, cost_model: CostModel, trace: Sequence[Any]) -> dict[str, float]:
    """Replay `trace` (TraceRecords, arrivals in seconds) on the real engine in wall time and in the
    simulator with `cost_model` and the engine's own scheduler settings; relative errors of the
    simulator's throughput (prompt + output tokens / makespan) and mean end-to-end latency. The
    engine's radix cache is flushed first (after a warm-up pass), so both start cold."""
    from radixfair.sim.simulator import SimConfig, Simulator

    vocab = int(engine.model_config.vocab_size)
    # warm the executor, then start from an empty radix cache as the simulated worker does
    engine.generate(input_ids=[[7] * 24, [8] * 40], sampling_params={"max_new_tokens": 4, "ignore_eos": True})
    engine.flush_cache()
    finish: list[float] = [0.0] * len(trace)
    start = time.perf_counter() + 0.05
    errors: list[BaseException] = []

    def one(i: int) -> None:
        rec = trace[i]
        try:
            time.sleep(max(0.0, start + rec.time - time.perf_counter()))
            engine.generate(input_ids=rec.input_ids(vocab), client_id=rec.client,
                            sampling_params={"max_new_tokens": rec.output_len, "ignore_eos": True})
            finish[i] = time.perf_counter() - start
        except BaseException as e:  # re-raised below, in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(trace))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    tokens = sum(r.prompt_len + r.output_len for r in trace)
    real_span = max(finish)
    real_lat = float(np.mean([f - r.time for f, r in zip(finish, trace, strict=True)]))

    sched = engine.scheduler.config
    cfg = SimConfig(policy=engine.args.schedule_policy, max_total_tokens=sched.max_total_tokens,
                    max_running_requests=sched.max_running_requests, max_prefill_tokens=sched.max_prefill_tokens,
                    chunked_prefill_size=sched.chunked_prefill_size, max_context_len=sched.max_context_len,
                    disable_radix_cache=sched.disable_radix_cache, vocab_size=vocab)
    res = Simulator(trace, cost_model, cfg).run()
    sim_span = res.makespan
    sim_lat = float(np.mean([r.finish - r.arrival for r in res.records if r.finish is not None]))
    real_tp, sim_tp = tokens / real_span, tokens / sim_span
    return {"real_throughput": real_tp, "sim_throughput": sim_tp, "throughput_rel_error": (sim_tp - real_tp) / real_tp,
            "real_mean_latency": real_lat, "sim_mean_latency": sim_lat,
            "latency_rel_error": (sim_lat - real_lat) / real_lat}


# ---- command line ------------------------------------------------------------------------------


def main(ns: argparse.Namespace) -> int:
    import json

    from radixfair.engine.engine import Engine

    if ns.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {ns.repeats}")
    t0 = time.perf_counter()
    with Engine(model=ns.model, device=ns.device, dtype=ns.dtype, max_total_tokens=16384,
                max_running_requests=32, num_threads=ns.num_threads, schedule_policy="fcfs",
                random_seed=ns.seed) as engine:
        samples = calibrate_engine(engine, repeats=ns.repeats, seed=ns.seed)
        model, q = fit_profile(samples, profile_name(engine), describe_engine(engine), ns.test_fraction, ns.seed)
        check = sim_vs_real(engine, model, sim_vs_real_trace(ns.sim_vs_real, ns.seed)) if ns.sim_vs_real else None
    wall = time.perf_counter() - t0
    print_table(["term", "value"],
                [["a (s per pass)", f"{model.a:.4g}"], ["b (s per prefill token)", f"{model.b_prefill_token:.4g}"],
                 ["c (s per decode request)", f"{model.c_decode_req:.4g}"],
                 ["e (s per KV token read)", f"{model.e_kv_token:.4g}"],
                 ["passes (train / held out)", f"{q.n_train} / {q.n_test}"], ["held-out R^2", f"{q.r2:.3f}"],
                 ["held-out median rel. error", f"{q.median_rel_error:.1%}"],
                 ["  prefill / decode", f"{_pct(q.median_rel_error_prefill)} / {_pct(q.median_rel_error_decode)}"]],
                title=f"bench calibrate: {model.name}, {wall:.1f} s wall")
    with open(ns.out, "w") as f:
        json.dump(model.to_dict(), f, indent=2)
        f.write("\n")
    print(f"wrote {ns.out} (use it with `radixfair bench sim --profile {ns.out}`)")
    if check is not None:
        print_table(["sim vs real", "value"], [[k, f"{v:.4g}"] for k, v in check.items()],
                    title=f"{ns.sim_vs_real} requests replayed on this engine and in the simulator")
    write_json(ns.json, {"profile": model.to_dict(), "fit": asdict(q), "sim_vs_real": check,
                         "samples": [asdict(s) for s in samples]})
    return 0


def sim_vs_real_trace(n: int, seed: int) -> list[Any]:
    """A small long-document-QA burst: two clients, each with one 512-token document and short
    questions, arriving 5 ms apart, so the makespan is the engine's work, not the arrival span."""
    from radixfair.sim.trace import TraceRecord

    del seed  # segment tokens are a pure function of their names
    return [TraceRecord(time=0.005 * i, client=f"c{i % 2}", output_len=16 + 8 * (i % 3),
                        segments=((f"doc/{i % 2}", 512), (f"q/{i}", 24)), rid=f"r{i}") for i in range(n)]


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1%}"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="fit a simulator cost profile to this machine's forward passes")
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="calibrated-profile.json", help="profile JSON to write (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the fit quality and every timed pass")
    p.add_argument("--repeats", type=int, default=1, help="run the synthetic workload this many times")
    p.add_argument("--test-fraction", type=float, default=0.3, help="passes held out of the quality check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sim-vs-real", type=int, default=0, metavar="N",
                   help="after fitting, replay N requests on this engine and in the simulator with the fitted "
                        "profile and report the relative errors of throughput and mean latency")
    p.set_defaults(func=main)
