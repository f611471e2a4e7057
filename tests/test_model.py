"""Our executor's logits against transformers' on tiny random models (the correctness reference)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.tiny_models import KQuantModel, load_hf

from radixfair.engine.loaders import inspect_model, load_state_dict
from radixfair.engine.model_runner import ModelRunner, RunnerConfig
from radixfair.sampling_params import SamplingParams
from radixfair.sched.batch import BatchMode, ScheduledBatch
from radixfair.sched.request import Req

TOL = 1e-4
# RADIXFAIR_TEST_DEVICE=cuda runs the executor checks on a GPU (transformers stays on the CPU)
DEVICE = torch.device(os.environ.get("RADIXFAIR_TEST_DEVICE", "cpu"))


def make_runner(path: Path, pool: int = 512, rows: int = 16) -> ModelRunner:
    files = inspect_model(str(path))
    sd = load_state_dict(files, torch.float32)
    return ModelRunner(files.config, sd, RunnerConfig(pool, rows, 1024), torch.float32, DEVICE)


def hf_logits(model: object, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()  # type: ignore[operator]


class SeqState:
    """Hand-made KV bookkeeping for one sequence: row and slots, as the scheduler would keep them."""

    def __init__(self, ids: list[int], row: int, first_slot: int) -> None:
        self.ids = ids
        self.row = row
        self.slots = np.zeros(0, dtype=np.int64)
        self.next_slot = first_slot

    def take(self, n: int) -> np.ndarray:
        # non-contiguous slots on purpose: the gather must not rely on adjacency
        new = np.arange(self.next_slot, self.next_slot + 2 * n, 2, dtype=np.int64)
        self.next_slot += 2 * n
        self.slots = np.concatenate([self.slots, new])
        return new


def prefill_batch(seqs: list[tuple[SeqState, int, int]]) -> ScheduledBatch:
    """seqs: (state, start, n): compute tokens [start, start+n) of each; logits at every position."""
    ids, pos, out, rows, pre, ext, row_slots, lps = [], [], [], [], [], [], [], []
    for st, start, n in seqs:
        new = st.take(n)
        ids += st.ids[start : start + n]
        pos.append(np.arange(start, start + n))
        out.append(new)
        rows.append(st.row)
        pre.append(start)
        ext.append(n)
        row_slots.append(st.slots.copy())
        lps.append((np.arange(n - 1, dtype=np.int64), np.asarray(st.ids[start + 1 : start + n], dtype=np.int64)))
    reqs = [Req(origin_input_ids=s.ids, sampling_params=SamplingParams(temperature=0)) for s, _, _ in seqs]
    return ScheduledBatch(
        mode=BatchMode.PREFILL,
        reqs=reqs,
        input_ids=np.asarray(ids, dtype=np.int64),
        positions=np.concatenate(pos).astype(np.int64),
        out_slots=np.concatenate(out),
        rows=np.asarray(rows, dtype=np.int64),
        prefix_lens=np.asarray(pre, dtype=np.int64),
        extend_lens=np.asarray(ext, dtype=np.int64),
        sample=[True] * len(seqs),
        row_slots=row_slots,
        logprob_positions=lps,
    )


def decode_batch(seqs: list[tuple[SeqState, int]]) -> ScheduledBatch:
    """seqs: (state, position): feed token ids[position] of each."""
    out = np.concatenate([st.take(1) for st, _ in seqs])
    positions = np.asarray([p for _, p in seqs], dtype=np.int64)
    reqs = [Req(origin_input_ids=s.ids, sampling_params=SamplingParams(temperature=0)) for s, _ in seqs]
    return ScheduledBatch(
        mode=BatchMode.DECODE,
        reqs=reqs,
        input_ids=np.asarray([st.ids[p] for st, p in seqs], dtype=np.int64),
        positions=positions,
        out_slots=out,
        rows=np.asarray([st.row for st, _ in seqs], dtype=np.int64),
        prefix_lens=positions.copy(),
        extend_lens=np.ones(len(seqs), dtype=np.int64),
        sample=[True] * len(seqs),
    )


def run_logits(runner: ModelRunner, batch: ScheduledBatch) -> torch.Tensor:
    fb = runner._prepare(batch)
    return runner.model(fb, runner.kv).cpu()


@pytest.fixture(params=["tiny_llama", "tiny_llama_tied", "tiny_qwen2", "tiny_qwen3", "tiny_llama32"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def test_prefill_logits_match_transformers(model_dir: Path) -> None:
    runner, hf = make_runner(model_dir), load_hf(model_dir)
    rng = np.random.default_rng(0)
    a = rng.integers(3, 300, 37).tolist()
    b = rng.integers(3, 300, 11).tolist()
    sa, sb = SeqState(a, 0, 0), SeqState(b, 1, 1)
    got = run_logits(runner, prefill_batch([(sa, 0, len(a)), (sb, 0, len(b))]))
    # rows: a's positions 0..35, a's last, b's 0..9, b's last
    want_a, want_b = hf_logits(hf, a), hf_logits(hf, b)
    torch.testing.assert_close(got[: len(a)], want_a, atol=TOL, rtol=0)
    torch.testing.assert_close(got[len(a) :], want_b, atol=TOL, rtol=0)


def test_chunked_prefill_and_decode_match_transformers(model_dir: Path) -> None:
    runner, hf = make_runner(model_dir), load_hf(model_dir)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 300, 40).tolist()
    want = hf_logits(hf, ids)
    st = SeqState(ids, 2, 5)
    # chunks of 9, 13, 10 then 8 decode steps
    start = 0
    for n in (9, 13, 10):
        got = run_logits(runner, prefill_batch([(st, start, n)]))
        torch.testing.assert_close(got, want[start : start + n], atol=TOL, rtol=0)
        start += n
    for p in range(start, len(ids)):
        got = run_logits(runner, decode_batch([(st, p)]))
        torch.testing.assert_close(got[0], want[p], atol=TOL, rtol=0)


def test_batched_decode_with_mixed_lengths_matches_transformers(model_dir: Path) -> None:
    runner, hf = make_runner(model_dir), load_hf(model_dir)
    rng = np.random.default_rng(2)
    seqs = [rng.integers(3, 300, n).tolist() for n in (5, 23, 14)]
    wants = [hf_logits(hf, s) for s in seqs]
    states = [SeqState(s, i, 100 * i + 1) for i, s in enumerate(seqs)]
    prompt_lens = [3, 17, 9]
    run_logits(runner, prefill_batch([(st, 0, n) for st, n in zip(states, prompt_lens, strict=True)]))
    for step in range(5):
        batch = [(st, n + step) for st, n in zip(states, prompt_lens, strict=True) if n + step < len(st.ids)]
        got = run_logits(runner, decode_batch(batch))
        for row, (st, p) in enumerate(batch):
            torch.testing.assert_close(got[row], wants[states.index(st)][p], atol=TOL, rtol=0)


def test_bfloat16_close_to_float32(tiny_llama: Path) -> None:
    files = inspect_model(str(tiny_llama))
    r32 = make_runner(tiny_llama)
    r16 = ModelRunner(files.config, load_state_dict(files, torch.bfloat16), RunnerConfig(512, 8, 1024),
                      torch.bfloat16, DEVICE)
    ids = list(range(3, 30))
    a = run_logits(r32, prefill_batch([(SeqState(ids, 0, 0), 0, len(ids))]))
    b = run_logits(r16, prefill_batch([(SeqState(ids, 0, 0), 0, len(ids))]))
    assert b.dtype == torch.float32
    assert (a - b).abs().max().item() < 0.1 * a.abs().max().item()


def test_length_grouped_decode_matches_transformers(tiny_llama: Path) -> None:
    """A decode batch wide and uneven enough to be split into length groups (see _decode_groups)."""
    lens = [10, 900, 20, 800, 50, 700, 15, 600, 400, 30, 100, 950]
    starts = np.cumsum([0] + [2 * (n + 2) for n in lens]).tolist()
    runner, hf = make_runner(tiny_llama, pool=starts[-1]), load_hf(tiny_llama)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(3, 300, n + 2).tolist() for n in lens]
    states = [SeqState(s, i, starts[i]) for i, s in enumerate(seqs)]
    run_logits(runner, prefill_batch([(st, 0, n) for st, n in zip(states, lens, strict=True)]))
    batch = decode_batch([(st, n) for st, n in zip(states, lens, strict=True)])
    groups = runner._prepare(batch).decode_groups
    assert groups is not None and len(groups) > 1, "the batch should be split into length groups"
    got = run_logits(runner, batch)
    for row, (s, n) in enumerate(zip(seqs, lens, strict=True)):
        torch.testing.assert_close(got[row], hf_logits(hf, s)[n], atol=TOL, rtol=0)


def test_cascade_decode_over_a_shared_prefix_matches_transformers(tiny_llama: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Sequences that share their first slots (one document, several questions) attend to the
    shared part as one operand; logits must not change."""
    from radixfair.engine import model_runner

    runner, hf = make_runner(tiny_llama, pool=4096), load_hf(tiny_llama)
    rng = np.random.default_rng(4)
    doc = rng.integers(3, 300, 300).tolist()
    tails = [rng.integers(3, 300, n).tolist() for n in (3, 20, 7, 41)]
    seqs = [doc + t for t in tails]
    # the document's KV once (as the radix tree would hold it), then each question after it
    doc_state = SeqState(doc, 0, 0)
    run_logits(runner, prefill_batch([(doc_state, 0, len(doc))]))
    states = []
    for i, s in enumerate(seqs):
        st = SeqState(s, i + 1, 1000 + 200 * i)
        st.slots = doc_state.slots.copy()
        states.append(st)
    own = [len(t) - 1 for t in tails]  # prefill all but the last token of each tail
    run_logits(runner, prefill_batch([(st, len(doc), n) for st, n in zip(states, own, strict=True)]))
    batch = decode_batch([(st, len(doc) + n) for st, n in zip(states, own, strict=True)])
    batch.row_slots = [st.slots.copy() for st in states]
    # 3 x 300 spared tokens are far below what a cascade's extra ops cost: plain groups
    assert (len(states) - 1) * len(doc) < model_runner.CASCADE_MIN_SAVED_TOKENS
    assert all(g.shared_index is None for g in runner._prepare(batch).decode_groups or [])
    monkeypatch.setattr(model_runner, "CASCADE_MIN_SAVED_TOKENS", 0)  # force it, to check the math
    groups = runner._prepare(batch).decode_groups
    assert groups is not None and any(g.shared_index is not None for g in groups)
    assert len(doc) >= model_runner.MIN_SHARED_PREFIX
    got = run_logits(runner, batch)
    for row, (s, n) in enumerate(zip(seqs, own, strict=True)):
        torch.testing.assert_close(got[row], hf_logits(hf, s)[len(doc) + n], atol=TOL, rtol=0)



def test_llama32_and_qwen3_logits_depend_on_their_own_steps(tiny_llama32: Path, tiny_qwen3: Path) -> None:
    """The logits tests above pass on these two models only because the llama3 rope scaling and the
    q/k norms are applied: without either, the same weights give other logits."""
    from dataclasses import replace

    from radixfair.engine.model_config import RopeScaling

    ids = np.random.default_rng(5).integers(3, 300, 40).tolist()

    def logits(runner: ModelRunner) -> torch.Tensor:
        return run_logits(runner, prefill_batch([(SeqState(ids, 0, 0), 0, len(ids))]))

    files = inspect_model(str(tiny_llama32))
    rs = files.config.rope_scaling
    assert files.config.tie_word_embeddings and files.config.rope_theta == 500000.0
    assert (rs.rope_type, rs.factor, rs.original_max_position_embeddings) == ("llama3", 32.0, 16)
    want = hf_logits(load_hf(tiny_llama32), ids)
    torch.testing.assert_close(logits(make_runner(tiny_llama32)), want, atol=TOL, rtol=0)
    plain = ModelRunner(replace(files.config, rope_scaling=RopeScaling()), load_state_dict(files, torch.float32),
                        RunnerConfig(512, 16, 1024), torch.float32, DEVICE)
    assert (logits(plain) - want).abs().max().item() > 100 * TOL

    runner = make_runner(tiny_qwen3)
    want = hf_logits(load_hf(tiny_qwen3), ids)
    torch.testing.assert_close(logits(runner), want, atol=TOL, rtol=0)
    for layer in runner.model.layers:
        layer.self_attn.q_norm = layer.self_attn.k_norm = None
    assert (logits(runner) - want).abs().max().item() > 100 * TOL


def test_k_quant_gguf_computes_what_transformers_does_with_its_weights(tiny_kquant_gguf: KQuantModel) -> None:
    """A Q4_K/Q5_K/Q6_K GGUF runs as transformers runs the same model with the dequantized weights."""
    m = tiny_kquant_gguf
    files = inspect_model(str(m.gguf))
    state = load_state_dict(files, torch.float32)
    hf = load_hf(m.hf_dir)
    hf.load_state_dict(state)
    runner = make_runner(m.gguf)
    ids = np.random.default_rng(6).integers(3, 300, 30).tolist()
    got = run_logits(runner, prefill_batch([(SeqState(ids, 0, 0), 0, len(ids))]))
    torch.testing.assert_close(got, hf_logits(hf, ids), atol=TOL, rtol=0)
