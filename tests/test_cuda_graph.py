"""CUDA graphs for decode: the graph-safe addressing (padded static inputs, the scratch KV slot) is
checked eagerly on any device; capture and replay run where CUDA is present and skip elsewhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_engine import assert_idle_pool, make_engine
from test_model import SeqState, decode_batch, make_runner, prefill_batch, run_logits

from radixfair.engine.cuda_graph import CudaGraphRunner, StaticDecodeInputs, batch_buckets, kv_bucket

TOL = 1e-4
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_buckets_cover_every_batch_size_and_width() -> None:
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(1) == [1]
    assert [kv_bucket(n) for n in (1, 256, 257, 1000, 4096)] == [256, 256, 512, 1024, 4096]


def test_padded_static_batch_computes_the_same_logits(tiny_llama: Path) -> None:
    """A decode step of 3 requests run through bucket (4, 256) of the static buffers, eagerly: the real
    rows' logits are those of the plain step, and the padding wrote nothing but the scratch slot."""
    rng = np.random.default_rng(1)
    ids = [rng.integers(3, 200, n).tolist() for n in (9, 30, 17)]
    results = []
    for padded in (False, True):
        runner = make_runner(tiny_llama)
        seqs = [SeqState(x, i, 1 + 100 * i) for i, x in enumerate(ids)]
        run_logits(runner, prefill_batch([(s, 0, len(s.ids) - 1) for s in seqs]))
        step = decode_batch([(s, len(s.ids) - 1) for s in seqs])
        fb = runner._prepare(step)
        kv_before = [k.clone() for k in runner.kv.k]
        if padded:
            static = StaticDecodeInputs(8, runner.kv.scratch_slot, torch.device("cpu"))
            static.fill(fb, 4, 256)
            logits = runner.model(static.forward_batch(4, 256), runner.kv)[:3]
        else:
            logits = runner.model(fb, runner.kv)
        changed = {int(c) for k0, k1 in zip(kv_before, runner.kv.k, strict=True)
                   for c in (k0 != k1).any(-1).any(0).nonzero().view(-1)}
        results.append((logits, changed))
    torch.testing.assert_close(results[1][0], results[0][0], atol=TOL, rtol=TOL)
    assert results[1][1] - results[0][1] <= {make_runner(tiny_llama).kv.scratch_slot}


def test_steps_a_graph_cannot_express_run_eagerly(tiny_llama: Path) -> None:
    runner = make_runner(tiny_llama, rows=8)
    graphs = CudaGraphRunner(runner.model, runner.kv, max_bs=2, max_context_len=1024)
    seqs = [SeqState([5, 6, 7, 8], i, 1 + 50 * i) for i in range(3)]
    run_logits(runner, prefill_batch([(s, 0, 3) for s in seqs]))
    three = runner._prepare(decode_batch([(s, 3) for s in seqs]))
    assert not graphs.can_run(three)  # past the largest bucket
    assert graphs.run(three) is None and graphs.replays == 0
    prefill = runner._prepare(prefill_batch([(SeqState([5, 6], 5, 400), 0, 2)]))
    assert not graphs.can_run(prefill)


@requires_cuda
def test_cuda_graph_decode_matches_eager(tiny_llama: Path) -> None:
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 200, n).tolist() for n in (12, 40, 7, 90, 33)]
    params = {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}
    outs = []
    for disable in (True, False):
        engine = make_engine(tiny_llama, device="cuda", disable_cuda_graph=disable, cuda_graph_max_bs=4)
        try:
            outs.append([o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)])
            graphs = engine.runner.graphs
            assert (graphs is None) == disable
            if graphs is not None:
                assert graphs.replays > 0 and graphs.graphs
            assert_idle_pool(engine)
        finally:
            engine.shutdown()
    assert outs[0] == outs[1]
