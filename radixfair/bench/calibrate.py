"""`radixfair bench calibrate`: fit the simulator's cost model to this project's own executor.

Every engine iteration (schedule, forward pass, outputs: what the simulator charges one batch for)
is timed while a synthetic workload goes through a real `Engine`: single prompts of several lengths,
prompts over a cached prefix, several questions over one cached document in one prefill, and groups
of 1-16 requests at several context lengths that then decode together. Each iteration gives its
`BatchFeatures` and seconds, and a non-negative least-squares fit of the cost model's six terms
becomes a profile JSON. A random 30% of the passes is held out of a first fit to say how well it
predicts unseen passes (R^2, median relative error); the written coefficients are refitted on all.

`--sim-vs-real N` replays a small trace on the real engine and in the simulator with the fitted
model and compares throughput and mean latency. Half of the calibration workload runs before the
replay and half after it, so a shared machine's slow drift in speed reaches the fit and the replay
alike.
"""

from __future__ import annotations

import argparse
import itertools
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from radixfair.bench.report import print_table, write_json
from radixfair.config_flags import add_flags, flag_values
from radixfair.engine_args import EngineArgs
from radixfair.sim.cost_model import COEFFICIENTS, BatchFeatures, CostModel, batch_features

ENGINE_FLAGS = ("model", "dtype", "device", "num_threads", "quantization", "enable_mixed_chunk",
                "disable_activation_quant")
MODES = ("prefill", "decode", "mixed")

FEATURES = ("const", *BatchFeatures._fields)
WORKLOAD = ("single prompts of 16-512 tokens; prompts of 16-256 tokens over a cached 512-token prefix; 1-8 "
            "questions over one cached document in one prefill; groups of 1-16 requests at 32-1024 prompt "
            "tokens decoding together; 8 short requests with a 3000-token prompt chunked beside their decoding "
            "(mixed passes with --enable-mixed-chunk)")


@dataclass(frozen=True)
class PassSample:
    mode: str  # "prefill" | "decode" | "mixed"
    features: BatchFeatures
    seconds: float


@dataclass(frozen=True)
class FitQuality:
    n_train: int
    n_test: int
    r2: float  # on the held-out passes
    median_rel_error: float  # median |predicted - measured| / measured, held-out passes
    median_rel_error_prefill: float | None
    median_rel_error_decode: float | None
    median_rel_error_mixed: float | None = None


def design_matrix(samples: Sequence[PassSample]) -> np.ndarray:
    return np.array([s.features.vector() for s in samples], dtype=np.float64).reshape(-1, len(COEFFICIENTS))


def fit_nonnegative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (a cost model's terms are costs). The optimum is the
    unconstrained optimum on its own support, so with six columns it is the best of the unconstrained
    fits over column subsets whose coefficients all come out >= 0."""
    if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
        raise ValueError("need a non-empty design matrix and one time per row")
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    xs = x / scale  # columns of similar size: the features span 1 to ~1e6
    best: np.ndarray | None = None
    best_res = float("inf")
    live = [j for j in range(x.shape[1]) if np.any(x[:, j])]  # a feature that never occurs stays 0
    for k in range(1, len(live) + 1):
        for subset in itertools.combinations(live, k):
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
        m: float(np.median(rel[modes == m])) if (modes == m).any() else None for m in MODES
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
    quality = FitQuality(len(tr), len(te), r2, mre, per["prefill"], per["decode"], per["mixed"])
    coef = fit_nonnegative(design_matrix(samples), np.array([s.seconds for s in samples]))
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    source = (
        f"Measured by `radixfair bench calibrate` on {when}: non-negative least-squares fit of "
        f"t = a + b*prefill_tokens + f*prefill_seqs + g*attn_pairs + c*decode_reqs + e*kv_tokens_read to "
        f"{len(samples)} timed engine iterations (schedule + forward pass + outputs; "
        f"{', '.join(f'{sum(s.mode == m for s in samples)} {m}' for m in MODES)}; a mixed pass is charged "
        f"its prefill and its decode terms, one `a`) of {describe}. Workload: {WORKLOAD}. Held-out check (fit on a random "
        f"{1 - test_fraction:.0%}, tested on the other {len(te)} passes): R^2 {r2:.3f}, median relative error "
        f"{mre:.1%}{_mode_errors(per)}. Coefficients refitted on all passes. Valid for this machine, model and "
        f"dtype only."
    )
    model = CostModel(name=name, source=source, **{f: float(c) for f, c in zip(COEFFICIENTS, coef, strict=True)})
    return model, quality


def _mode_errors(per: dict[str, float | None]) -> str:
    parts = [f"{m} {v:.1%}" for m, v in per.items() if v is not None]
    return f" ({', '.join(parts)})" if parts else ""


# ---- measuring the engine ----------------------------------------------------------------------


@contextmanager
def record_passes(engine: Any) -> Iterator[list[PassSample]]:
    """Every engine iteration while the block runs, as (features, wall seconds) samples."""
    samples: list[PassSample] = []

    def observe(batch: Any, seconds: float) -> None:
        samples.append(PassSample(batch.mode.value, batch_features(batch), seconds))

    engine.pass_observers.append(observe)
    try:
        yield samples
    finally:
        engine.pass_observers.remove(observe)


def synthetic_workload(engine: Any, seed: int = 0, part: int | None = None) -> None:
    """Drive the engine through prefill and decode passes of varied shapes (see the module doc).
    `part` 0 or 1 runs one half of it (each half covers every kind of pass); None runs both."""
    vocab = int(engine.model_config.vocab_size)
    lo = min(100, vocab // 4)
    rng = np.random.default_rng(seed)

    def ids(n: int) -> list[int]:
        return rng.integers(lo, vocab, n).tolist()

    def run(prompts: list[list[int]], new: int) -> None:
        engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": new, "ignore_eos": True,
                                                            "temperature": 0.0})

    # (prompt lengths of one generate call, cached prefix length, new tokens), split into two halves
    # that each hold every kind of pass
    halves: list[list[tuple[list[int], int, int]]] = [[], []]
    for j, n in enumerate((16, 48, 96, 160, 256, 384, 512)):  # prefill only
        halves[j % 2].append(([n], 0, 1))
    for j, n in enumerate((16, 64, 128, 256)):  # over a cached prefix: attention reads past the new tokens
        halves[j % 2].append(([n], 512, 1))
    for j, b in enumerate((2, 4, 6, 8)):  # several questions over one cached document, one prefill
        halves[j % 2].append(([24 + 8 * i for i in range(b)], 512, 1))
    for j, (b, n) in enumerate(itertools.product((1, 4, 8, 16), (32, 256))):
        halves[j % 2].append(([n] * b, 0, 12))
    halves[0].append(([1024] * 4, 0, 12))
    halves[1].append(([512] * 8, 0, 12))
    long = min(3000, int(engine.context_len) - 32)
    for h in (0, 1):  # a long prompt chunked while short ones decode: mixed passes when enabled
        halves[h].append(([32] * 8 + [long], 0, 24))
    for h in (0, 1) if part is None else (part,):
        for lens, prefix, new in halves[h]:
            shared = ids(prefix)
            if prefix:
                run([shared], 1)  # cache the document first
            run([shared + ids(n) for n in lens], new)


def describe_engine(engine: Any) -> str:
    dev = engine.device
    where = (f"CUDA {_cuda_name(dev)}" if dev.type == "cuda"
             else f"CPU ({_torch_threads()} torch threads, {os.cpu_count()} cores)")
    dtype = str(engine.dtype).removeprefix("torch.")
    mixed = ", mixed chunks" if engine.args.enable_mixed_chunk else ""
    return (f"{Path(str(engine.model_path)).name}, {dtype}, {engine.quantization.mode} weights{mixed}, "
            f"on {where}")


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


@dataclass(frozen=True)
class RealRun:
    finish: list[float]  # per trace record, seconds from the trace's start
    passes: list[PassSample]  # every engine iteration of the replay


def replay(engine: Any, trace: Sequence[Any]) -> RealRun:
    """Replay `trace` (TraceRecords, arrivals in seconds) on the real engine in wall time, from an
    empty radix cache (after a warm-up pass) as a simulated worker starts."""
    vocab = int(engine.model_config.vocab_size)
    engine.generate(input_ids=[[7] * 24, [8] * 40], sampling_params={"max_new_tokens": 4, "ignore_eos": True})
    engine.flush_cache()
    finish: list[float] = [0.0] * len(trace)
    errors: list[BaseException] = []
    prompts = [rec.input_ids(vocab) for rec in trace]

    def one(i: int, start: float) -> None:
        rec = trace[i]
        try:
            time.sleep(max(0.0, start + rec.time - time.perf_counter()))
            engine.generate(input_ids=prompts[i], client_id=rec.client,
                            sampling_params={"max_new_tokens": rec.output_len, "ignore_eos": True})
            finish[i] = time.perf_counter() - start
        except BaseException as e:  # re-raised below, in the caller's thread
            errors.append(e)

    with record_passes(engine) as passes:
        start = time.perf_counter() + 0.05
        threads = [threading.Thread(target=one, args=(i, start), daemon=True) for i in range(len(trace))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return RealRun(finish, list(passes))


def simulate(engine: Any, cost_model: CostModel, trace: Sequence[Any]) -> Any:
    """The trace in the simulator with `cost_model` and the engine's own scheduler settings."""
    from radixfair.sim.simulator import SimConfig, Simulator

    cfg = SimConfig(policy=engine.args.schedule_policy, scheduler=engine.scheduler_config,
                    policy_config=engine.args.policy_config(), vocab_size=int(engine.model_config.vocab_size))
    return Simulator(trace, cost_model, cfg).run()


def compare(trace: Sequence[Any], reals: Sequence[RealRun], sim: Any, cost_model: CostModel) -> dict[str, float]:
    """Relative errors of the simulator's throughput (prompt + output tokens / makespan) and mean
    end-to-end latency against the mean over the real replays (their spread shows the machine's own
    noise), and, to tell the sources of error apart, how far the cost model is off on the real runs'
    own passes (`cost_model_rel_error`) and how many passes each side ran."""
    if not reals:
        raise ValueError("no real replay to compare with")
    tokens = sum(r.prompt_len + r.output_len for r in trace)
    real_tps = np.array([tokens / max(real.finish) for real in reals])
    real_lats = np.array([np.mean([f - r.time for f, r in zip(real.finish, trace, strict=True)]) for real in reals])
    real_tp, real_lat = float(real_tps.mean()), float(real_lats.mean())
    sim_tp = tokens / sim.makespan
    sim_lat = float(np.mean([r.finish - r.arrival for r in sim.records if r.finish is not None]))
    passes = [p for real in reals for p in real.passes]
    measured = sum(p.seconds for p in passes)
    predicted = sum(cost_model.time(p.features) for p in passes)
    per_round = (sim_tp - real_tps) / real_tps
    return {"real_throughput": real_tp, "sim_throughput": sim_tp, "throughput_rel_error": (sim_tp - real_tp) / real_tp,
            "real_mean_latency": real_lat, "sim_mean_latency": sim_lat,
            "latency_rel_error": (sim_lat - real_lat) / real_lat,
            "rounds": float(len(reals)), "throughput_rel_error_min": float(per_round.min()),
            "throughput_rel_error_max": float(per_round.max()),
            "real_passes": float(np.mean([len(real.passes) for real in reals])),
            "sim_passes": float(sum(w["batches"] for w in sim.workers)),
            "cost_model_rel_error": (predicted - measured) / measured if measured > 0 else float("nan")}


# ---- command line ------------------------------------------------------------------------------


def main(ns: argparse.Namespace) -> int:
    import json

    from radixfair.engine.engine import Engine
    from radixfair.sim.trace import read_jsonl

    if ns.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {ns.repeats}")
    if ns.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {ns.rounds}")
    if ns.sim_vs_real < 0:
        raise ValueError(f"--sim-vs-real must be >= 0, got {ns.sim_vs_real}")
    trace = (read_jsonl(ns.trace) if ns.trace else sim_vs_real_trace(ns.sim_vs_real, ns.seed)) \
        if (ns.sim_vs_real or ns.trace) else None
    t0 = time.perf_counter()
    with Engine(max_total_tokens=16384, max_running_requests=32, schedule_policy="fcfs", random_seed=ns.seed,
                **flag_values(EngineArgs, ns, only=ENGINE_FLAGS)) as engine:
        engine.generate(input_ids=[[7] * 24, [8] * 40], sampling_params={"max_new_tokens": 4, "ignore_eos": True})
        samples: list[PassSample] = []
        reals: list[RealRun] = []
        # Without a replay: the workload `repeats` times. With one: calibration halves and replays
        # alternate (half, replay, half, replay, ..., half), so that the fit and the replays sample
        # the same stretch of a shared machine's drifting speed.
        steps = [(ns.seed + r, None) for r in range(ns.repeats)] if trace is None else \
            [(ns.seed + h // 2, h % 2) for h in range(max(ns.rounds + 1, 2 * ns.repeats))]
        for h, (seed, part) in enumerate(steps):
            with record_passes(engine) as got:
                synthetic_workload(engine, seed, part=part)
            samples += got
            if trace is not None and h < ns.rounds:
                reals.append(replay(engine, trace))
        model, q = fit_profile(samples, profile_name(engine), describe_engine(engine), ns.test_fraction, ns.seed)
        check = compare(trace, reals, simulate(engine, model, trace), model) if trace is not None else None
    wall = time.perf_counter() - t0
    rows = [[f, f"{getattr(model, f):.4g}"] for f in COEFFICIENTS]
    rows += [["passes (train / held out)", f"{q.n_train} / {q.n_test}"], ["held-out R^2", f"{q.r2:.3f}"],
             ["held-out median rel. error", f"{q.median_rel_error:.1%}"],
             ["  prefill / decode / mixed", f"{_pct(q.median_rel_error_prefill)} / "
              f"{_pct(q.median_rel_error_decode)} / {_pct(q.median_rel_error_mixed)}"]]
    print_table(["term", "value"], rows, title=f"bench calibrate: {model.name}, {wall:.1f} s wall")
    with open(ns.out, "w") as f:
        json.dump(model.to_dict(), f, indent=2)
        f.write("\n")
    print(f"wrote {ns.out} (use it with `radixfair bench sim --profile {ns.out}`)")
    if check is not None:
        assert trace is not None
        print_table(["sim vs real", "value"], [[k, f"{v:.4g}"] for k, v in check.items()],
                    title=f"{len(trace)} requests replayed on this engine and in the simulator")
    write_json(ns.json, {"profile": model.to_dict(), "fit": asdict(q), "sim_vs_real": check,
                         "samples": [_sample_json(s) for s in samples],
                         "replay_passes": [[_sample_json(s) for s in real.passes] for real in reals]})
    return 0


def sim_vs_real_trace(n: int, seed: int) -> list[Any]:
    """A small long-document-QA burst: two clients, each with one 512-token document and short
    questions, arriving 5 ms apart, so the makespan is the engine's work, not the arrival span."""
    from radixfair.sim.trace import TraceRecord

    del seed  # segment tokens are a pure function of their names
    return [TraceRecord(time=0.005 * i, client=f"c{i % 2}", output_len=16 + 8 * (i % 3),
                        segments=((f"doc/{i % 2}", 512), (f"q/{i}", 24)), rid=f"r{i}") for i in range(n)]


def _sample_json(s: PassSample) -> dict[str, Any]:
    return {"mode": s.mode, **s.features._asdict(), "seconds": s.seconds}


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1%}"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="fit a simulator cost profile to this machine's forward passes")
    p.add_argument("--out", default="calibrated-profile.json", help="profile JSON to write (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the fit quality and every timed pass")
    p.add_argument("--repeats", type=int, default=1, help="run the synthetic workload this many times")
    p.add_argument("--test-fraction", type=float, default=0.3, help="passes held out of the quality check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sim-vs-real", type=int, default=0, metavar="N",
                   help="also replay N requests (a shared-document burst) on this engine and in the simulator "
                        "with the fitted profile and report the relative errors of throughput and mean latency")
    p.add_argument("--rounds", type=int, default=3,
                   help="with --sim-vs-real: real replays, alternating with calibration halves (default: %(default)s)")
    p.add_argument("--trace", default=None, metavar="JSONL",
                   help="with --sim-vs-real: replay this JSONL trace (as `bench sim --trace-out` writes) instead of the built-in burst")
    add_flags(p.add_argument_group("engine"), EngineArgs, only=ENGINE_FLAGS)
    p.set_defaults(func=main)
