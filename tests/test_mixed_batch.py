"""Mixed batches (--enable-mixed-chunk): a prefill chunk and decode rows in one forward pass compute
what the two passes compute apart, and the engine's outputs do not change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from test_engine import assert_idle_pool, make_engine
from test_model import SeqState, decode_batch, make_runner, prefill_batch, run_logits

from radixfair.sched.batch import BatchMode, ScheduledBatch
from radixfair.sim.cost_model import BatchFeatures, batch_features

TOL = 1e-4


def test_mixed_pass_computes_what_the_prefill_and_decode_passes_compute(tiny_llama: Path) -> None:
    rng = np.random.default_rng(3)
    ids = [rng.integers(3, 200, n).tolist() for n in (9, 14, 40)]
    logits: list[torch.Tensor] = []
    for mixed in (False, True):
        runner = make_runner(tiny_llama)
        a, b, c = SeqState(ids[0], 0, 0), SeqState(ids[1], 1, 1), SeqState(ids[2], 2, 200)
        run_logits(runner, prefill_batch([(a, 0, 8), (b, 0, 13)]))  # a and b are decoding
        chunk = prefill_batch([(c, 0, 24)])  # c's first chunk ...
        step = decode_batch([(a, 8), (b, 13)])  # ... while a and b each feed one token
        if mixed:
            logits.append(run_logits(runner, ScheduledBatch.mixed(chunk, step)))
        else:
            logits.append(torch.cat((run_logits(runner, chunk), run_logits(runner, step))))
    assert logits[0].shape == logits[1].shape == (24 + 2, logits[0].shape[1])
    torch.testing.assert_close(logits[1], logits[0], atol=TOL, rtol=TOL)


def test_mixed_batch_splits_back_into_its_parts_and_costs_both() -> None:
    from radixfair.sampling_params import SamplingParams
    from radixfair.sched.request import Req

    def batch(mode: BatchMode, n: int, ext: int) -> ScheduledBatch:
        reqs = [Req(origin_input_ids=[5] * 20, sampling_params=SamplingParams()) for _ in range(n)]
        t = n * ext
        return ScheduledBatch(mode=mode, reqs=reqs, input_ids=np.full(t, 5), positions=np.arange(t) % ext + 3,
                              out_slots=np.arange(t) + 100 * ext, rows=np.arange(n), prefix_lens=np.full(n, 3),
                              extend_lens=np.full(n, ext), sample=[True] * n, row_slots=[np.arange(3 + ext)] * n,
                              logprob_positions=[None] * n)

    prefill, decode = batch(BatchMode.PREFILL, 2, 6), batch(BatchMode.DECODE, 3, 1)
    mixed = ScheduledBatch.mixed(prefill, decode)
    assert mixed.mode is BatchMode.MIXED and mixed.prefill_count == 2 and mixed.num_tokens == 15
    p, d = mixed.split_mixed()
    assert p.input_ids.tolist() == prefill.input_ids.tolist() and d.out_slots.tolist() == decode.out_slots.tolist()
    assert (p.prefill_count, d.prefill_count) == (2, 0)
    both = batch_features(mixed)
    assert both == BatchFeatures(*(x + y for x, y in zip(batch_features(prefill), batch_features(decode),
                                                         strict=True)))
    assert both.prefill_tokens == 12 and both.decode_reqs == 3


def test_engine_outputs_are_the_same_with_mixed_chunks(tiny_llama: Path) -> None:
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 200, n).tolist() for n in (12, 20, 150, 7, 90)]
    params = [{"max_new_tokens": m, "temperature": 0.0, "ignore_eos": True} for m in (30, 25, 5, 12, 8)]
    outs = []
    for mixed in (False, True):
        engine = make_engine(tiny_llama, chunked_prefill_size=32, enable_mixed_chunk=mixed)
        modes: list[BatchMode] = []
        engine.pass_observers.append(lambda b, _s, seen=modes: seen.append(b.mode))
        try:
            # in the second call the long prompts are prefilled in chunks while the short ones decode
            first = engine.generate(input_ids=prompts[:2], sampling_params=params[:2], stream=False)
            rest = engine.generate(input_ids=prompts, sampling_params=params)
            outs.append([o["output_ids"] for o in [*first, *rest]])
            assert_idle_pool(engine)
        finally:
            engine.shutdown()
        assert (BatchMode.MIXED in modes) == mixed
    assert outs[0] == outs[1]
