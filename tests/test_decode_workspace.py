"""The decode workspace (--decode-workspace-tokens): decode attention on contiguous per-request K/V
computes what the paged gather computes, across joins, finishes, growth, retraction, chunked and
mixed prefill, cascade prefixes and radix-cache reuse."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_engine import assert_idle_pool, gen, greedy, make_engine
from test_model import DEVICE, SeqState, decode_batch, prefill_batch

from radixfair.engine.decode_attention import native_decode_attention
from radixfair.engine.engine import Engine
from radixfair.engine.loaders import inspect_model, load_state_dict
from radixfair.engine.model_runner import ModelRunner, RunnerConfig
from radixfair.sampling_params import SamplingParams
from radixfair.sched.batch import ScheduledBatch
from radixfair.sched.request import Req

TOL = 1e-5


def runner(path: Path, workspace_tokens: int, pool: int = 8192) -> ModelRunner:
    files = inspect_model(str(path))
    return ModelRunner(files.config, load_state_dict(files, torch.float32),
                       RunnerConfig(pool, 16, 2048, decode_workspace_tokens=workspace_tokens), torch.float32, DEVICE)


def step(r: ModelRunner, batch: ScheduledBatch) -> tuple[torch.Tensor, bool]:
    """Logits of one pass run as `ModelRunner.run` runs it, and whether it read the workspace."""
    fb = r._prepare(batch)
    logits = r.model(fb, r.kv)
    if fb.workspace is not None:
        assert r.workspace is not None
        r.workspace.commit()
    return logits, fb.workspace is not None


def with_reqs(batch: ScheduledBatch, reqs: dict[int, Req]) -> ScheduledBatch:
    """The batch's requests as the same objects from step to step (one per table row), as the scheduler's."""
    batch.reqs = [reqs.setdefault(int(row), Req(origin_input_ids=[1], sampling_params=SamplingParams()))
                  for row in batch.rows]
    return batch


@pytest.mark.parametrize(("attention", "sorting"), [
    ("tensor_ops", "default"), ("tensor_ops", "always"),
    pytest.param("native", "default", marks=pytest.mark.skipif(native_decode_attention() is None,
                                                              reason="no AVX512 CPU or no C compiler here")),
])
def test_workspace_logits_equal_the_gather_across_joins_finishes_and_growth(
        tiny_llama: Path, attention: str, sorting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`attention`: the workspace read by tensor ops (rows sorted into length groups) or by the C
    kernel (`radixfair.engine.decode_attention`, which also writes the new K/V)."""
    from radixfair.engine import decode_workspace

    if sorting == "always":  # rows re-sorted at every join or finish, several length groups every step
        monkeypatch.setattr(decode_workspace, "SORT_HORIZON", 10_000)
        monkeypatch.setattr(decode_workspace, "GROUP_OVERHEAD", 0)
    seen_groups: list[int] = []
    prepare = decode_workspace.DecodeWorkspace.prepare

    def spy(self: Any, *args: Any) -> Any:
        got = prepare(self, *args)
        if got is not None:
            seen_groups.append(len(got.groups))
        return got

    monkeypatch.setattr(decode_workspace.DecodeWorkspace, "prepare", spy)
    rng = np.random.default_rng(11)
    seqs = [rng.integers(3, 300, n).tolist() for n in (60, 300, 80, 330, 90)]
    gather, ws = runner(tiny_llama, 0), runner(tiny_llama, 1 << 16)
    assert gather.workspace is None and ws.workspace is not None
    assert ws.workspace.native == (native_decode_attention() is not None)
    ws.workspace.native = attention == "native"
    states = {name: [SeqState(s, i, 1000 * i) for i, s in enumerate(seqs)] for name in ("g", "w")}
    reqs: dict[str, dict[int, Req]] = {"g": {}, "w": {}}
    pos = {0: 10, 1: 240, 2: 30}  # decoding requests: table row -> next position
    for name, r in (("g", gather), ("w", ws)):
        st = states[name]
        step(r, with_reqs(prefill_batch([(st[i], 0, p) for i, p in pos.items()]), reqs[name]))
    used = []
    for t in range(24):
        if t == 5:  # a request joins: prefilled, then decodes from the next step
            for name, r in (("g", gather), ("w", ws)):
                step(r, with_reqs(prefill_batch([(states[name][3], 0, 280)]), reqs[name]))
            pos[3] = 280
        if t == 12:  # one finishes and leaves the decode set
            del pos[0]
        if t == 16:  # its row goes to a new request (a new object: the workspace must not trust the row)
            for name, r in (("g", gather), ("w", ws)):
                reqs[name].pop(0)
                st = SeqState(seqs[4], 0, 6000)
                states[name][0] = st
                step(r, with_reqs(prefill_batch([(st, 0, 50)]), reqs[name]))
            pos[0] = 50
        out = {}
        for name, r in (("g", gather), ("w", ws)):
            st = states[name]
            out[name], w = step(r, with_reqs(decode_batch([(st[i], p) for i, p in pos.items()]), reqs[name]))
            used.append(w)
        torch.testing.assert_close(out["w"], out["g"], atol=TOL, rtol=0)
        pos = {i: p + 1 for i, p in pos.items()}
    assert used[1::2] == [True] * 24 and not any(used[0::2])
    assert ws.workspace is not None and ws.workspace.capacity == 512  # grew past 256 as contexts did
    # rows that kept decoding were appended, not refilled: their filled length is their context
    assert ws.workspace._by_row[1].filled == pos[1]
    if attention == "native":  # rows stay where they joined: the kernel reads each to its own length
        assert seen_groups == [0] * 24
    if sorting == "always":
        assert max(seen_groups) > 1
        slots = {row: e.slot for row, e in ws.workspace._by_row.items()}
        assert sorted(slots.values()) == list(range(len(pos)))  # compact, longest first
        assert [row for row, _ in sorted(slots.items(), key=lambda kv: kv[1])] == sorted(pos, key=lambda r: -pos[r])


def test_length_groups_are_contiguous_and_pay_for_their_overhead() -> None:
    from radixfair.engine.decode_workspace import GROUP_OVERHEAD, length_groups

    assert length_groups(np.array([500, 499, 498, 497])) == ((0, 4, 500),)  # equal lengths: one group
    lens = np.array([2000, 1900, 1800, 1700, 40, 30, 20, 10])
    groups = length_groups(lens)
    assert groups[0][0] == 0 and groups[-1][1] == len(lens)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(groups))
    assert all(c == lens[a] for a, _, c in groups)  # each group reads up to its longest row
    read = sum((b - a) * c for a, b, c in groups) + (len(groups) - 1) * GROUP_OVERHEAD
    assert groups == ((0, 4, 2000), (4, 8, 40)) and read < 0.6 * len(lens) * 2000


def test_workspace_with_a_cascade_prefix_and_past_its_bound(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from radixfair.engine import model_runner

    monkeypatch.setattr(model_runner, "CASCADE_MIN_SAVED_TOKENS", 0)  # the gather side forms a cascade group
    rng = np.random.default_rng(4)
    doc = rng.integers(3, 300, 300).tolist()
    tails = [rng.integers(3, 300, n).tolist() for n in (5, 20, 7, 41)]
    outs: dict[int, list[torch.Tensor]] = {}
    for tokens in (0, 1 << 16, 1000):  # gather; workspace; a bound the batch does not fit in (gather again)
        r = runner(tiny_llama, tokens, pool=4096)
        doc_state = SeqState(doc, 0, 0)
        step(r, prefill_batch([(doc_state, 0, len(doc))]))
        states = []
        for i, t in enumerate(tails):
            st = SeqState(doc + t, i + 1, 1000 + 200 * i)
            st.slots = doc_state.slots.copy()
            states.append(st)
        own = [len(t) - 3 for t in tails]  # three decode steps each
        step(r, prefill_batch([(st, len(doc), n) for st, n in zip(states, own, strict=True)]))
        reqs: dict[int, Req] = {}
        got = []
        for k in range(3):
            batch = with_reqs(decode_batch([(st, len(doc) + n + k) for st, n in zip(states, own, strict=True)]), reqs)
            batch.row_slots = [st.slots.copy() for st in states]
            fb = r._prepare(batch)
            if tokens == 0:
                assert fb.decode_groups is not None and any(g.shared_index is not None for g in fb.decode_groups)
            logits, used = step(r, batch)
            assert used == (tokens == 1 << 16)
            got.append(logits)
        outs[tokens] = got
    for tokens in (1 << 16, 1000):
        for a, b in zip(outs[tokens], outs[0], strict=True):
            torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def generate_both(path: Path, calls: list[dict[str, Any]], **engine_kwargs: Any) -> list[list[Any]]:
    """Each call's outputs (ids and output logprobs) from an engine with the workspace, then one without."""
    results = []
    for tokens in (1 << 16, 0):
        engine: Engine = make_engine(path, decode_workspace_tokens=tokens, **engine_kwargs)
        used: list[bool] = []
        prepare = engine.runner._prepare

        def spy(batch: ScheduledBatch, prepare: Any = prepare, used: list[bool] = used) -> Any:
            fb = prepare(batch)
            used.append(fb.workspace is not None)
            return fb

        engine.runner._prepare = spy  # type: ignore[method-assign]
        try:
            outs = [gen(engine, return_logprob=True, **c) for c in calls]
            assert_idle_pool(engine)
            results.append([[(o["output_ids"], [lp[0] for lp in o["meta_info"]["output_token_logprobs"]])
                             for o in out] for out in outs])
            assert any(used) == (tokens > 0)
            if tokens:
                assert engine.runner.workspace is not None and engine.runner.workspace.allocated_bytes() == 0, \
                    "the workspace is given back once nothing decodes"
        finally:
            engine.shutdown()
    return results


def assert_same(results: list[list[Any]]) -> None:
    ws, plain = results
    for out_w, out_g in zip(ws, plain, strict=True):
        for (ids_w, lps_w), (ids_g, lps_g) in zip(out_w, out_g, strict=True):
            assert ids_w == ids_g
            np.testing.assert_allclose(lps_w, lps_g, atol=TOL, rtol=0)


def test_engine_outputs_equal_with_chunked_and_mixed_prefill_and_cache_reuse(tiny_llama: Path) -> None:
    rng = random.Random(5)
    doc = [rng.randrange(3, 300) for _ in range(150)]
    prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in (12, 20, 150, 7, 90)]
    shared = [doc + [rng.randrange(3, 300) for _ in range(n)] for n in (4, 9, 15)]
    calls = [
        {"input_ids": prompts[:2], "sampling_params": [greedy(30), greedy(25)]},
        # long prompts prefilled in chunks (mixed with the decoding short ones) while others join and finish
        {"input_ids": prompts, "sampling_params": [greedy(n) for n in (30, 25, 5, 12, 8)]},
        # one document, several questions: radix-cache reuse of the prefix
        {"input_ids": shared, "sampling_params": [greedy(20)] * 3},
        {"input_ids": shared[::-1], "sampling_params": [greedy(12)] * 3},
    ]
    for mixed in (False, True):
        assert_same(generate_both(tiny_llama, calls, chunked_prefill_size=32, enable_mixed_chunk=mixed))


def test_engine_outputs_equal_under_retraction(tiny_llama: Path) -> None:
    rng = random.Random(99)
    prompts = [[rng.randrange(3, 300) for _ in range(40)] for _ in range(8)]
    calls = [{"input_ids": prompts, "sampling_params": [greedy(40)] * 8}]
    assert_same(generate_both(tiny_llama, calls, max_total_tokens=200))
