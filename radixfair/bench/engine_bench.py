"""`radixfair bench engine`: radixfair's continuous batching against transformers' `generate()`.

Both run the same weights in this process: radixfair in its `--quantization` mode (auto by
default), transformers in the engine's dtype on the dequantized weights. transformers gets what a
user without a serving engine does: static batches of `--max-batch` requests, left-padded, each batch
running until its longest request is done. Throughput counts the tokens each request asked for.
Prefill is measured apart (the same prompts, one token each; transformers: one forward per static
batch), and batch-1 decode in every weight format, with the weight bytes each actually reads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radixfair.bench.report import print_table, write_json
from radixfair.config_flags import add_flags, flag_values
from radixfair.engine_args import EngineArgs

# engine settings this benchmark lets the user set; `--max-batch` is its running-request limit
ENGINE_FLAGS = ("model", "dtype", "quantization", "max_total_tokens", "max_prefill_tokens", "chunked_prefill_size",
                "num_threads", "enable_mixed_chunk", "enable_torch_compile", "decode_workspace_tokens",
                "disable_activation_quant")
QUANT_MODES = ("none", "int8", "int4")


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]


def make_workload(num_requests: int, vocab_lo: int, vocab_hi: int, seed: int,
                  prompt_range: tuple[int, int] = (64, 512), output_range: tuple[int, int] = (16, 128)) -> Workload:
    rng = np.random.default_rng(seed)
    prompts = [
        rng.integers(vocab_lo, vocab_hi, int(rng.integers(prompt_range[0], prompt_range[1] + 1))).tolist()
        for _ in range(num_requests)
    ]
    outs = [int(rng.integers(output_range[0], output_range[1] + 1)) for _ in range(num_requests)]
    return Workload(prompts, outs)


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s moved (read + write) by a large tensor copy: the machine's practical memory bandwidth."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_model_from_engine(engine: Any) -> Any:
    """A transformers model holding exactly the weights radixfair loaded."""
    import transformers

    from radixfair.engine.loaders import load_state_dict

    cfg = engine.model_config
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, pad_token_id=0, eos_token_id=None, bos_token_id=None,
    )
    if cfg.rope_scaling.rope_type != "default":
        rs = cfg.rope_scaling
        common["rope_scaling"] = {
            "rope_type": rs.rope_type, "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
    model: Any
    if cfg.architecture == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    from radixfair.engine.loaders import inspect_model

    sd = load_state_dict(inspect_model(engine.model_path), engine.dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"HF model load mismatch: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.to(engine.device, engine.dtype).eval()


def run_radixfair(engine: Any, wl: Workload) -> float:
    params = [{"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True} for n in wl.output_lens]
    t = time.perf_counter()
    outs = engine.generate(input_ids=wl.prompts, sampling_params=params)
    dt = time.perf_counter() - t
    got = sum(o["meta_info"]["completion_tokens"] for o in outs)
    assert got == sum(wl.output_lens), f"radixfair produced {got} tokens, expected {sum(wl.output_lens)}"
    return dt


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of a static batch, padded on the left as transformers expects."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for j, p in enumerate(prompts):
        ids[j, longest - len(p) :] = torch.tensor(p)
        mask[j, longest - len(p) :] = 1
    return ids, mask


def run_hf(model: Any, wl: Workload, max_batch: int, device: torch.device, progress: Any = None) -> float:
    t = time.perf_counter()
    for i in range(0, len(wl.prompts), max_batch):
        prompts = wl.prompts[i : i + max_batch]
        outs = wl.output_lens[i : i + max_batch]
        ids, mask = left_padded(prompts)
        n = max(outs)
        with torch.inference_mode():
            model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=0, eos_token_id=None,
            )
        if progress is not None:
            progress(len(prompts))
    _sync(device)
    return time.perf_counter() - t


def run_radixfair_prefill(engine: Any, wl: Workload) -> float:
    """Seconds to prefill every prompt of `wl` (no cached prefix) and sample one token each."""
    engine.flush_cache()
    params = [{"max_new_tokens": 1, "temperature": 0.0, "ignore_eos": True} for _ in wl.prompts]
    t = time.perf_counter()
    engine.generate(input_ids=wl.prompts, sampling_params=params)
    return time.perf_counter() - t


def run_hf_prefill(model: Any, wl: Workload, max_batch: int, device: torch.device) -> float:
    """Seconds for one left-padded forward over each static batch of `max_batch` prompts."""
    t = time.perf_counter()
    for i in range(0, len(wl.prompts), max_batch):
        prompts = wl.prompts[i : i + max_batch]
        ids, mask = left_padded(prompts)
        with torch.inference_mode():
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                  logits_to_keep=1)
    _sync(device)
    return time.perf_counter() - t


def b1_decode_by_quant(ns: argparse.Namespace, main_engine: Any, prompt: list[int]) -> dict[str, float]:
    """Batch-1 seconds per decode step in each weight format (an engine per format; the benchmark's own
    engine measures its mode)."""
    from radixfair.engine.engine import Engine

    out: dict[str, float] = {}
    for mode in QUANT_MODES:
        if mode == main_engine.quantization.mode:
            out[mode] = radixfair_b1_decode(main_engine, prompt, ns.b1_tokens)
            continue
        flags = flag_values(EngineArgs, ns, only=ENGINE_FLAGS)
        flags.update(quantization=mode, max_total_tokens=4096)
        engine = Engine(max_running_requests=4, **flags)
        try:
            radixfair_b1_decode(engine, prompt[:16], 4)  # warm-up
            out[mode] = radixfair_b1_decode(engine, prompt, ns.b1_tokens)
            out[mode + "_bytes"] = engine.runner.model.weight_bytes_per_decode_step(1)
        finally:
            engine.shutdown()
    return out


def radixfair_b1_decode(engine: Any, prompt: list[int], n: int) -> float:
    """Seconds per decode step for one request alone (time after the first token / steps)."""
    times: list[float] = []
    for _ in engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": n, "temperature": 0.0,
                                                                 "ignore_eos": True}, stream=True):
        times.append(time.perf_counter())
    # the stream emits once per token; the first arrives after prefill
    return (times[-1] - times[0]) / max(len(times) - 1, 1)


def hf_b1_decode(model: Any, prompt: list[int], n: int, device: torch.device) -> float:
    ids = torch.tensor([prompt], device=device)

    def gen(k: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                           min_new_tokens=k, do_sample=False, pad_token_id=0, eos_token_id=None)
        _sync(device)
        return time.perf_counter() - t

    gen(2)  # warm-up
    return (gen(n) - gen(1)) / (n - 1)


def llama_cpp_b1(python: str, gguf: str, prompt_len: int, steps: int) -> dict[str, float]:
    """llama.cpp's batch-1 decode ms/token and prefill tok/s on `gguf`, run by `python` (an interpreter
    with llama-cpp-python: a scratch venv, never this project's) with as many threads as torch uses."""
    probe = Path(__file__).with_name("llama_cpp_probe.py")
    args = [python, str(probe), gguf, str(prompt_len), str(steps), str(torch.get_num_threads())]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp probe failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main(ns: argparse.Namespace) -> int:
    from tqdm import tqdm

    from radixfair.engine.engine import Engine

    torch.manual_seed(0)
    engine = Engine(max_running_requests=ns.max_batch, **flag_values(EngineArgs, ns, only=ENGINE_FLAGS))
    try:
        vocab = engine.model_config.vocab_size
        lo = min(100, vocab // 4)  # skip the special tokens at the start of typical vocabularies
        wl = make_workload(ns.num_requests, lo, vocab, ns.seed)
        total_out = sum(wl.output_lens)
        device = engine.device
        print(f"model {engine.model_path} dtype {engine.dtype} device {device}; {ns.num_requests} requests, "
              f"{sum(map(len, wl.prompts))} prompt tokens, {total_out} output tokens, max batch {ns.max_batch}")
        # warm-up both paths on a few requests so one-time costs are not measured
        run_radixfair(engine, make_workload(2, lo, vocab, ns.seed + 1, (16, 32), (4, 8)))
        engine.flush_cache()
        t_rf = run_radixfair(engine, wl)
        print(f"radixfair: {t_rf:.1f} s")
        t_rf_prefill = run_radixfair_prefill(engine, wl)
        print(f"radixfair prefill: {t_rf_prefill:.1f} s")
        b1_prompt = wl.prompts[0][:128]
        rf_b1 = radixfair_b1_decode(engine, b1_prompt, ns.b1_tokens)
        weight_bytes = engine.runner.model.weight_bytes_per_decode_step()
        mode = engine.quantization.mode

        hf = hf_model_from_engine(engine)
        hf_b1 = hf_b1_decode(hf, b1_prompt, ns.b1_tokens, device)
        t_hf_prefill = run_hf_prefill(hf, wl, ns.max_batch, device)
        print(f"transformers prefill: {t_hf_prefill:.1f} s")
        with tqdm(total=ns.num_requests, desc="transformers generate", unit="req") as bar:
            t_hf = run_hf(hf, wl, ns.max_batch, device, bar.update)
        print(f"transformers: {t_hf:.1f} s")
        del hf

        llama_cpp: dict[str, float] = {}
        if ns.llama_cpp_python:
            if not str(engine.model_path).endswith(".gguf"):
                raise SystemExit("--llama-cpp-python needs a GGUF model")
            llama_cpp = llama_cpp_b1(ns.llama_cpp_python, str(engine.model_path), len(b1_prompt), ns.b1_tokens)
            print(f"llama.cpp: batch-1 decode {llama_cpp['decode_ms_per_token_b1']:.1f} ms/token")
        copy_bw = copy_bandwidth(device)
        decode_bw = weight_bytes / rf_b1
        by_quant = {mode: rf_b1, f"{mode}_bytes": weight_bytes}
        if not ns.skip_quant_sweep:
            swept = b1_decode_by_quant(ns, engine, b1_prompt)
            by_quant.update({k: v for k, v in swept.items() if k != mode})
        prompt_tokens = sum(map(len, wl.prompts))
        row = {
            "radixfair_tok_s": total_out / t_rf,
            "hf_tok_s": total_out / t_hf,
            "ratio": t_hf / t_rf,
            "decode_ms_per_token_b1": rf_b1 * 1000,
            "hf_decode_ms_per_token_b1": hf_b1 * 1000,
            "decode_bandwidth_gb_s": decode_bw / 1e9,
            "copy_bandwidth_gb_s": copy_bw / 1e9,
            "bandwidth_fraction": decode_bw / copy_bw,
            "radixfair_s": t_rf,
            "hf_s": t_hf,
            "num_requests": ns.num_requests,
            "max_batch": ns.max_batch,
            "output_tokens": total_out,
            "dtype": str(engine.dtype).replace("torch.", ""),
            "device": str(device),
            "weight_bytes": weight_bytes,
            "quantization": mode,
            "prefill_tok_s": prompt_tokens / t_rf_prefill,
            "hf_prefill_tok_s": prompt_tokens / t_hf_prefill,
            "decode_ms_per_token_b1_by_quant": {m: by_quant[m] * 1000 for m in QUANT_MODES if m in by_quant},
            # weight bytes each format's batch-1 step reads (codes and scales; dense where it uses dense)
            "bandwidth_fraction_by_quant": {m: by_quant[f"{m}_bytes"] / by_quant[m] / copy_bw
                                            for m in QUANT_MODES if m in by_quant},
            "weight_bytes_by_quant": {m: int(by_quant[f"{m}_bytes"]) for m in QUANT_MODES if m in by_quant},
        }
        if llama_cpp:
            row["llama_cpp_decode_ms_per_token_b1"] = llama_cpp["decode_ms_per_token_b1"]
            row["llama_cpp_prefill_tok_s"] = llama_cpp["prefill_tok_s"]
    finally:
        engine.shutdown()
    print_table(
        ["metric", "radixfair", "transformers", "ratio"],
        [
            ["output tok/s", f"{row['radixfair_tok_s']:.1f}", f"{row['hf_tok_s']:.1f}", f"{row['ratio']:.2f}x"],
            ["decode ms/token (batch 1)", f"{row['decode_ms_per_token_b1']:.1f}",
             f"{row['hf_decode_ms_per_token_b1']:.1f}",
             f"{row['hf_decode_ms_per_token_b1'] / row['decode_ms_per_token_b1']:.2f}x"],
            ["weight GB/s at batch 1 (vs copy)", f"{row['decode_bandwidth_gb_s']:.1f}",
             f"copy {row['copy_bandwidth_gb_s']:.1f}", f"{row['bandwidth_fraction']:.0%} of copy"],
            ["prefill tok/s", f"{row['prefill_tok_s']:.0f}", f"{row['hf_prefill_tok_s']:.0f}",
             f"{row['prefill_tok_s'] / row['hf_prefill_tok_s']:.2f}x"],
            *[[f"decode ms/token b1, {m}", f"{ms:.1f}", "",
               f"{row['bandwidth_fraction_by_quant'][m]:.0%} of copy"]
              for m, ms in row["decode_ms_per_token_b1_by_quant"].items()],
            *([["llama.cpp decode ms/token b1", "", f"{row['llama_cpp_decode_ms_per_token_b1']:.1f}",
                f"radixfair {row['decode_ms_per_token_b1'] / row['llama_cpp_decode_ms_per_token_b1']:.2f}x"]]
              if "llama_cpp_decode_ms_per_token_b1" in row else []),
        ],
    )
    write_json(ns.json, row)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("engine", help="continuous batching vs transformers generate()")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--b1-tokens", type=int, default=64, help="decode steps for the batch-1 latency figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--skip-quant-sweep", action="store_true",
                   help="measure batch-1 decode in the engine's own weight format only")
    p.add_argument("--llama-cpp-python", default=None, metavar="PYTHON",
                   help="also measure llama.cpp's batch-1 decode on the same GGUF, run by PYTHON (an interpreter "
                        "with llama-cpp-python installed, e.g. a scratch venv's)")
    add_flags(p.add_argument_group("engine"), EngineArgs, only=ENGINE_FLAGS, defaults={"max_total_tokens": 65536})
    p.set_defaults(func=main)
