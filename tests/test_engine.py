"""End-to-end Engine tests on tiny random models: batching, caching, chunking, retraction, streaming,
stop conditions, logprobs, input validation, GGUF vs safetensors, concurrency; one real-model test.

Every blocking call goes through `bounded()`, so a hung engine fails the test instead of the run.
"""

from __future__ import annotations

import itertools
import queue
import random
import string
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import requires_real_model
from fixtures.helpers import bounded as _bounded
from fixtures.tiny_models import load_hf

from radixfair.engine.engine import Engine
from radixfair.io_struct import EngineOutput, EngineRequest, RequestResult
from radixfair.sampling_params import SamplingParams
from radixfair.sched.batch import BatchMode, ScheduledBatch

TIMEOUT = 60.0
# Small enough that the shared engine evicts and hands freed slots out again during the module (the eos
# search alone runs 128 requests of 50 tokens), so slot reuse is exercised by every later test.
POOL = 4096
EOS = 2  # <|im_end|> in the tiny byte-level tokenizer

_rng = random.Random(1234)
SHORT = [[_rng.randrange(3, 300) for _ in range(n)] for n in (3, 17, 33, 60, 9)]
SHORT_NEW = [8, 12, 20, 16, 10]
LONG = [[_rng.randrange(3, 300) for _ in range(n)] for n in (101, 150, 120)]
LONG_NEW = [10, 14, 6]
PROMPTS = SHORT + LONG
MAX_NEW = SHORT_NEW + LONG_NEW


def bounded(fn: Callable[..., Any], *args: Any, timeout: float = TIMEOUT, **kwargs: Any) -> Any:
    return _bounded(fn, *args, timeout=timeout, **kwargs)


def greedy(n: int, **extra: Any) -> dict[str, Any]:
    return {"temperature": 0.0, "max_new_tokens": n, "ignore_eos": True, **extra}


def gen(engine: Engine, timeout: float = TIMEOUT, **kwargs: Any) -> Any:
    return bounded(engine.generate, timeout=timeout, **kwargs)


def run_batch(engine: Engine, prompts: list[list[int]], max_new: list[int], **extra: Any) -> list[list[int]]:
    outs = gen(engine, input_ids=prompts, sampling_params=[greedy(n, **extra) for n in max_new])
    assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
    assert [len(o["output_ids"]) for o in outs] == max_new
    return [o["output_ids"] for o in outs]


def assert_idle_pool(engine: Engine) -> tuple[int, int, int]:
    bounded(engine.wait_idle, 20.0)
    free, evictable, protected = engine.check_invariant()
    assert free + evictable + protected == engine.max_total_tokens
    assert protected == 0
    if engine.args.disable_radix_cache:
        assert (free, evictable) == (engine.max_total_tokens, 0)
    assert engine.invariant_violations == 0
    stats = engine.get_stats()
    assert stats.running == 0 and stats.waiting == 0
    return free, evictable, protected


def make_engine(path: Path | str, **kwargs: Any) -> Engine:
    kwargs.setdefault("max_total_tokens", POOL)
    kwargs.setdefault("dtype", "float32")
    return Engine(str(path), **kwargs)


class BatchRecorder:
    """Wraps the runner to record what each forward pass computed (called on the scheduler thread)."""

    def __init__(self, engine: Engine) -> None:
        self.batches: list[tuple[BatchMode, list[int]]] = []
        inner = engine.runner.run

        def run(batch: ScheduledBatch) -> Any:
            self.batches.append((batch.mode, batch.extend_lens.tolist()))
            return inner(batch)

        engine.runner.run = run  # type: ignore[method-assign]


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> Iterator[Engine]:
    eng = make_engine(tiny_llama)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference(engine: Engine) -> list[list[int]]:
    """Greedy outputs of every prompt generated alone, on an empty cache."""
    out = []
    for p, n in zip(PROMPTS, MAX_NEW, strict=True):
        bounded(engine.wait_idle, 20.0)
        engine.flush_cache()
        out.append(run_batch(engine, [p], [n])[0])
    return out


@pytest.fixture(scope="module")
def hf_model(tiny_llama: Path) -> Any:
    return load_hf(tiny_llama)


def hf_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


# ---- batching, caching, chunking -------------------------------------------------------------------


def test_batch_with_mixed_lengths_equals_each_alone(engine: Engine, reference: list[list[int]]) -> None:
    bounded(engine.wait_idle, 20.0)
    engine.flush_cache()
    assert run_batch(engine, PROMPTS, MAX_NEW) == reference
    # again, now every prompt is cached (all but the last token, which must be computed for logits)
    outs = gen(engine, input_ids=PROMPTS, sampling_params=[greedy(n) for n in MAX_NEW])
    assert [o["output_ids"] for o in outs] == reference
    assert [o["meta_info"]["cached_tokens"] for o in outs] == [len(p) - 1 for p in PROMPTS]
    assert_idle_pool(engine)


def test_batch_with_duplicates_and_shared_prefixes(engine: Engine, reference: list[list[int]]) -> None:
    bounded(engine.wait_idle, 20.0)
    engine.flush_cache()
    # the same long prompt three times plus extensions of it: in-batch prefix sharing
    base, n = LONG[1], LONG_NEW[1]
    prompts = [base, base, [*base, 7, 8], base[:-5], base]
    outs = run_batch(engine, prompts, [n] * len(prompts))
    assert outs[0] == outs[1] == outs[4] == reference[len(SHORT) + 1]
    assert outs[2] == run_batch(engine, [prompts[2]], [n])[0]
    assert outs[3] == run_batch(engine, [prompts[3]], [n])[0]
    assert_idle_pool(engine)


def test_greedy_matches_transformers(hf_model: Any, reference: list[list[int]]) -> None:
    for prompt, out in list(zip(PROMPTS, reference, strict=True))[::3]:
        ids = list(prompt)
        for step, token in enumerate(out):
            lp = hf_logprobs(hf_model, ids)[-1]
            top2 = lp.topk(2)
            best = int(top2.indices[0])
            if token != best:  # tolerate only a genuine near-tie
                margin = float(top2.values[0] - lp[token])
                assert margin < 1e-3, f"step {step}: engine chose {token}, transformers {best}"
                break
            ids.append(token)


@pytest.mark.parametrize(
    "config",
    [
        {"disable_radix_cache": True},
        {"chunked_prefill_size": 16},
        {"chunked_prefill_size": 16, "disable_radix_cache": True},
        {"max_running_requests": 2},
        {"chunked_prefill_size": 0, "max_prefill_tokens": 64},
    ],
    ids=["no-radix", "chunk16", "chunk16-no-radix", "max-running-2", "prefill-budget-64"],
)
def test_engine_configurations_give_identical_outputs(
    tiny_llama: Path, reference: list[list[int]], config: dict[str, Any]
) -> None:
    eng = make_engine(tiny_llama, **config)
    try:
        rec = BatchRecorder(eng)
        assert run_batch(eng, PROMPTS, MAX_NEW) == reference
        # a second round: cache hits (or, without the cache, full recomputation) change nothing
        assert run_batch(eng, PROMPTS[::-1], MAX_NEW[::-1]) == reference[::-1]
        prefills = [ext for mode, ext in rec.batches if mode is BatchMode.PREFILL]
        if config.get("chunked_prefill_size") == 16:
            assert max(sum(ext) for ext in prefills) <= 16, "the chunk size bounds the whole prefill batch"
            assert len(prefills) >= sum(-(-len(p) // 16) for p in LONG)
        if config.get("max_running_requests") == 2:
            assert max(len(ext) for _, ext in rec.batches) <= 2
        stats = eng.get_stats()
        if config.get("disable_radix_cache"):
            assert stats.cached_tokens == 0
            assert stats.prefill_tokens == 2 * sum(len(p) for p in PROMPTS)
        else:
            assert stats.cached_tokens == sum(len(p) - 1 for p in PROMPTS)
        assert_idle_pool(eng)
    finally:
        eng.shutdown()


def test_kv_pool_returns_every_slot(engine: Engine, tiny_llama: Path) -> None:
    run_batch(engine, PROMPTS, MAX_NEW)
    _, evictable, _ = assert_idle_pool(engine)
    assert evictable > 0, "finished requests stay in the radix cache"
    engine.flush_cache()
    assert engine.check_invariant() == (POOL, 0, 0)

    eng = make_engine(tiny_llama, max_total_tokens=1000, disable_radix_cache=True)
    try:
        run_batch(eng, PROMPTS, MAX_NEW)
        assert assert_idle_pool(eng) == (1000, 0, 0)
    finally:
        eng.shutdown()


@pytest.mark.parametrize("disable", [False, True], ids=["radix", "no-radix"])
def test_retraction_under_a_tiny_pool(tiny_llama: Path, engine: Engine, disable: bool) -> None:
    rng = random.Random(99)
    prompts = [[rng.randrange(3, 300) for _ in range(40)] for _ in range(8)]
    want = run_batch(engine, prompts, [40] * 8)
    small = make_engine(tiny_llama, max_total_tokens=200, disable_radix_cache=disable)
    try:
        got = run_batch(small, prompts, [40] * 8)
        assert got == want
        assert small.get_stats().retractions > 0
        assert small.get_stats().decode_tokens == 8 * 40
        assert_idle_pool(small)
        # and it keeps serving
        assert run_batch(small, prompts[:2], [40, 40]) == want[:2]
        assert_idle_pool(small)
    finally:
        small.shutdown()


def test_repeated_prompt_under_memory_pressure_gives_the_same_output(tiny_llama: Path) -> None:
    rng = random.Random(5)
    prompt = [rng.randrange(3, 300) for _ in range(20)]
    eng = make_engine(tiny_llama, max_total_tokens=100)
    try:
        runs = [run_batch(eng, [prompt], [60])[0] for _ in range(3)]
        assert_idle_pool(eng)
        # in-batch duplicates too: each copy computes the prompt, all but one are deduplicated
        assert run_batch(eng, [prompt[:10]] * 3, [25] * 3) == [run_batch(eng, [prompt[:10]], [25])[0]] * 3
        assert_idle_pool(eng)
    finally:
        eng.shutdown()
    assert runs[1] == runs[0]
    assert runs[2] == runs[0]


# ---- streaming and abort -----------------------------------------------------------------------------


def collect(it: Iterator[dict[str, Any]], timeout: float = TIMEOUT) -> list[dict[str, Any]]:
    return bounded(list, it, timeout=timeout)  # type: ignore[no-any-return]


def finished(out: dict[str, Any]) -> bool:
    return out["meta_info"]["finish_reason"] is not None


def test_streaming_yields_growing_prefixes(engine: Engine, reference: list[list[int]]) -> None:
    prompt, n = SHORT[2], SHORT_NEW[2]
    full = gen(engine, input_ids=prompt, sampling_params=greedy(n))
    chunks = collect(engine.generate(input_ids=prompt, sampling_params=greedy(n), stream=True))
    assert len(chunks) >= 2
    texts = [c["text"] for c in chunks]
    for a, b in itertools.pairwise(texts):
        assert b.startswith(a)
    assert [finished(c) for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1]["text"] == full["text"]
    assert chunks[-1]["output_ids"] == full["output_ids"] == reference[2]
    ids = [c["output_ids"] for c in chunks]
    for a, b in itertools.pairwise(ids):
        assert b[: len(a)] == a


def test_a_non_streaming_request_gets_only_its_final_output(engine: Engine) -> None:
    """Per-step result dicts are built only for streaming callers; a blocking or non-streaming async
    request hears once, when it finishes, with the same result as a stream's last chunk."""
    import asyncio

    params = greedy(12)
    chunks = collect(engine.generate(input_ids=SHORT[0], sampling_params=params, stream=True))
    assert len(chunks) >= 2
    def request(stream: bool) -> EngineRequest:
        return EngineRequest(input_ids=SHORT[0], sampling_params=SamplingParams(**params), stream=stream)

    q: queue.Queue[EngineOutput] = queue.Queue()
    engine.submit(engine.tokenize(request(False)), q.put)
    outs = [bounded(q.get, timeout=TIMEOUT)]
    assert outs[0].finished and q.empty()

    async def drain(stream: bool) -> list[EngineOutput]:
        return [o async for o in engine.generate_async(request(stream))]

    finals = bounded(asyncio.run, drain(False), timeout=TIMEOUT)
    steps = bounded(asyncio.run, drain(True), timeout=TIMEOUT)
    assert len(finals) == 1 and len(steps) == len(chunks)
    for seq in (outs, finals, steps):
        res = RequestResult(seq[0].rid)
        for out in seq:
            res.add(out)
        assert res.finished and res.output_ids == chunks[-1]["output_ids"] and res.text == chunks[-1]["text"]


def test_abort_by_closing_the_stream_frees_the_slots(engine: Engine) -> None:
    it = engine.generate(input_ids=SHORT[1], sampling_params=greedy(1500), stream=True)
    for _ in range(3):
        assert not finished(bounded(next, it))
    it.close()
    assert_idle_pool(engine)


def test_abort_by_rid_ends_the_stream(engine: Engine) -> None:
    it = engine.generate(input_ids=SHORT[0], sampling_params=greedy(1500), stream=True, rid="abort-me")
    first = bounded(next, it)
    assert first["meta_info"]["id"] == "abort-me"
    engine.abort("abort-me")
    rest = collect(it)
    last = rest[-1]
    assert finished(last)
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(last["output_ids"]) < 1500
    engine.abort("abort-me")  # already gone: a no-op
    engine.abort("no-such-request")
    assert_idle_pool(engine)


def test_abort_a_blocking_generate_from_another_thread(engine: Engine) -> None:
    box: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: box.update(out=engine.generate(input_ids=SHORT[3], sampling_params=greedy(1500),
                                                        rid="blocking")),
        daemon=True,
    )
    t.start()
    while "out" not in box and engine.get_stats().running == 0:
        t.join(0.01)
    engine.abort("blocking")
    t.join(TIMEOUT)
    assert not t.is_alive()
    assert box["out"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert_idle_pool(engine)


def test_shutdown_fails_requests_in_flight(tiny_llama: Path) -> None:
    eng = make_engine(tiny_llama, max_total_tokens=1024)
    it = eng.generate(input_ids=SHORT[1], sampling_params=greedy(900), stream=True)
    bounded(next, it)
    eng.shutdown()
    last = collect(it)[-1]
    assert finished(last) and last["meta_info"]["finish_reason"]["type"] == "abort"
    with pytest.raises(RuntimeError, match="shut down"):
        eng.generate(input_ids=[5, 6], sampling_params=greedy(1))
    eng.shutdown()  # twice is fine


# ---- stop conditions ----------------------------------------------------------------------------------

PRINTABLE = set(string.ascii_letters + string.digits + string.punctuation)


def printable_stop_candidates(engine: Engine) -> Iterator[tuple[list[int], list[int], str, int]]:
    """(prompt, greedy output, full text, j) where output token j >= 2 is one printable ASCII char that
    does not occur in the text decoded before it."""
    rng = random.Random(7)
    prompts = [*PROMPTS, *([rng.randrange(3, 300) for _ in range(12)] for _ in range(20))]
    outs = gen(engine, input_ids=prompts, sampling_params=greedy(30))
    for p, o in zip(prompts, outs, strict=True):
        ids = o["output_ids"]
        for j in range(2, len(ids)):
            piece = engine.tokenizer.decode([ids[j]])
            if len(piece) == 1 and piece in PRINTABLE and piece not in engine.tokenizer.decode(ids[:j]):
                yield p, ids, o["text"], j


def test_stop_string_cuts_the_text_before_it(engine: Engine) -> None:
    prompt, ids, text, j = next(printable_stop_candidates(engine))
    stop = engine.tokenizer.decode([ids[j]])
    out = gen(engine, input_ids=prompt, sampling_params=greedy(30, stop=stop))
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == text[: text.index(stop)]
    assert stop not in out["text"]
    assert out["output_ids"] == ids[: j + 1]
    # several stop strings: the first to appear wins, wherever it is in the list
    later = "\x00never"
    out2 = gen(engine, input_ids=prompt, sampling_params=greedy(30, stop=[later, stop]))
    assert out2["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out2["text"] == out["text"]


def test_stop_string_spanning_tokens(engine: Engine) -> None:
    def two_printable(c: tuple[list[int], list[int], str, int]) -> bool:
        prev = engine.tokenizer.decode([c[1][c[3] - 1]])
        return len(prev) == 1 and prev in PRINTABLE

    found = next(filter(two_printable, printable_stop_candidates(engine)), None)
    assert found is not None, "no output with two printable tokens in a row; change the prompts"
    prompt, ids, text, j = found
    stop = engine.tokenizer.decode(ids[j - 1 : j + 1])
    if text.index(stop) < len(engine.tokenizer.decode(ids[: j - 1])):
        pytest.fail("the two-character stop string occurs earlier; change the search")
    out = gen(engine, input_ids=prompt, sampling_params=greedy(30, stop=stop))
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == text[: text.index(stop)]
    assert out["output_ids"] == ids[: j + 1]
    # streamed, no chunk ever shows text that the stop string later removes
    chunks = collect(engine.generate(input_ids=prompt, sampling_params=greedy(30, stop=stop), stream=True))
    assert chunks[-1]["text"] == out["text"]
    for c in chunks:
        assert out["text"].startswith(c["text"])


def test_stop_token_ids(engine: Engine) -> None:
    prompt, n = SHORT[3], 20
    ids = gen(engine, input_ids=prompt, sampling_params=greedy(n))["output_ids"]
    j = next(k for k in range(1, n) if ids[k] not in ids[:k])
    stop_id = ids[j]
    out = gen(engine, input_ids=prompt, sampling_params=greedy(n, stop_token_ids=[stop_id]))
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    assert out["output_ids"] == ids[: j + 1]
    # min_new_tokens: the stop token is banned until then
    late = gen(engine, input_ids=prompt, sampling_params=greedy(n, stop_token_ids=[stop_id], min_new_tokens=j + 2))
    assert len(late["output_ids"]) >= j + 2
    assert late["output_ids"][:j] == ids[:j]
    assert late["output_ids"][j] != stop_id


def test_eos_stops_unless_ignored_and_min_new_tokens_delays_it(engine: Engine) -> None:
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 300) for _ in range(10)] for _ in range(128)]
    outs = gen(engine, input_ids=prompts, sampling_params=greedy(40))
    hits = [(p, o["output_ids"]) for p, o in zip(prompts, outs, strict=True) if EOS in o["output_ids"][1:36]]
    assert hits, "no greedy output of the tiny model contains eos; change the prompts"
    prompt, ids = hits[0]
    k = ids.index(EOS)
    assert k >= 1
    out = gen(engine, input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 40})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    assert out["output_ids"] == ids[: k + 1]
    assert out["text"] == engine.tokenizer.decode(ids[:k]), "the special eos token is not shown"
    assert len(gen(engine, input_ids=prompt, sampling_params=greedy(40))["output_ids"]) == 40
    late = gen(engine, input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 40,
                                                          "min_new_tokens": k + 2})
    assert late["output_ids"][:k] == ids[:k]
    assert late["output_ids"][k] != EOS
    assert len(late["output_ids"]) >= k + 2


def test_max_new_tokens_zero_is_prefill_only(engine: Engine) -> None:
    rng = random.Random(12)
    prompt = [rng.randrange(3, 300) for _ in range(30)]
    out = gen(engine, input_ids=prompt, sampling_params={"max_new_tokens": 0})
    assert out["output_ids"] == [] and out["text"] == ""
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert out["meta_info"]["completion_tokens"] == 0 and out["meta_info"]["prompt_tokens"] == 30
    follow = gen(engine, input_ids=[*prompt, 5], sampling_params=greedy(1))
    assert follow["meta_info"]["cached_tokens"] == 30, "the prompt's KV was cached"
    # mixed into a batch with normal requests
    outs = gen(engine, input_ids=[SHORT[1], prompt], sampling_params=[greedy(4), greedy(0)])
    assert len(outs[0]["output_ids"]) == 4 and outs[1]["output_ids"] == []
    assert_idle_pool(engine)


# ---- logprobs ---------------------------------------------------------------------------------------------


def check_logprobs(meta: dict[str, Any], prompt: list[int], output: list[int], ref: torch.Tensor, start: int) -> None:
    n = len(prompt)
    inp = meta["input_token_logprobs"]
    assert len(inp) == n - start
    assert [x[1] for x in inp] == prompt[start:]
    for i, (lp, tok, text) in enumerate(inp):
        t = start + i
        assert text is None
        if t == 0:
            assert lp is None
        else:
            assert lp == pytest.approx(ref[t - 1, tok].item(), abs=1e-4), f"prompt position {t}"
    outp = meta["output_token_logprobs"]
    assert [list(x)[1:] for x in outp] == [[t, None] for t in output]
    for j, (lp, tok, _) in enumerate(outp):
        assert lp == pytest.approx(ref[n - 1 + j, tok].item(), abs=1e-4), f"output position {j}"


def test_logprobs_match_transformers(engine: Engine, hf_model: Any) -> None:
    prompt = SHORT[3]
    kw = dict(input_ids=prompt, sampling_params=greedy(6), return_logprob=True, logprob_start_len=0,
              top_logprobs_num=3)
    out = gen(engine, **kw)
    ref = hf_logprobs(hf_model, prompt + out["output_ids"])
    meta = out["meta_info"]
    check_logprobs(meta, prompt, out["output_ids"], ref, 0)
    assert list(meta["input_token_logprobs"][0]) == [None, prompt[0], None]
    # top logprobs: sorted, 3 of them, equal to transformers' top 3; the greedy token first
    assert meta["input_top_logprobs"][0] is None
    for t, top in enumerate(meta["input_top_logprobs"][1:], start=1):
        want = ref[t - 1].topk(3)
        assert [x[1] for x in top] == want.indices.tolist()
        assert [x[0] for x in top] == pytest.approx(want.values.tolist(), abs=1e-4)
    for j, top in enumerate(meta["output_top_logprobs"]):
        vals = [x[0] for x in top]
        assert len(top) == 3 and vals == sorted(vals, reverse=True)
        assert top[0][1] == out["output_ids"][j]
        assert top[0][0] == pytest.approx(meta["output_token_logprobs"][j][0], abs=1e-6)
    # the same prompt again, asking from position 5: the cached prefix is reused up to there
    again = gen(engine, **{**kw, "logprob_start_len": 5, "top_logprobs_num": 0})
    assert again["output_ids"] == out["output_ids"]
    assert again["meta_info"]["cached_tokens"] == 4
    check_logprobs(again["meta_info"], prompt, out["output_ids"], ref, 5)
    assert "input_top_logprobs" not in again["meta_info"]
    # without a start, SGLang's answer: one entry for the last prompt position, with no value
    plain = gen(engine, input_ids=prompt, sampling_params=greedy(6), return_logprob=True)
    assert [list(x) for x in plain["meta_info"]["input_token_logprobs"]] == [[None, prompt[-1], None]]
    assert len(plain["meta_info"]["output_token_logprobs"]) == 6
    assert "output_token_logprobs" not in gen(engine, input_ids=prompt, sampling_params=greedy(2))["meta_info"]


def test_logprobs_across_prefill_chunks_match_transformers(tiny_llama: Path, hf_model: Any) -> None:
    prompt = LONG[0]
    eng = make_engine(tiny_llama, chunked_prefill_size=16)
    try:
        out = gen(eng, input_ids=prompt, sampling_params=greedy(5), return_logprob=True, logprob_start_len=0)
        ref = hf_logprobs(hf_model, prompt + out["output_ids"])
        check_logprobs(out["meta_info"], prompt, out["output_ids"], ref, 0)
        assert_idle_pool(eng)
    finally:
        eng.shutdown()


# ---- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_ids": [5, 6], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"input_ids": [5, 6], "sampling_params": {"top_p": 0}}, "top_p"),
        ({"input_ids": [5, 6], "sampling_params": {"top_p": 1.5}}, "top_p"),
        ({"input_ids": [5, 6], "sampling_params": {"temprature": 0.5}}, "temprature"),
        ({"prompt": ""}, "empty"),
        ({"prompt": ["fine", ""]}, "empty"),
        ({"input_ids": [5] * 2048}, "context"),
        ({"input_ids": [5, 320]}, "input_ids"),
        ({"input_ids": [-1, 5]}, "input_ids"),
        ({"input_ids": [5, 6.0]}, "input_ids"),
        ({"input_ids": [[5, 6], [7, 999]]}, "input_ids"),
        ({"prompt": "a", "input_ids": [5]}, "exactly one"),
        ({}, "exactly one"),
        ({"prompt": ["a", "b"], "sampling_params": [{}]}, "sampling_params"),
        ({"prompt": "a", "top_logprobs_num": 21}, "top_logprobs_num"),
        ({"prompt": ["a", "b"], "stream": True}, "stream"),
    ],
)
def test_bad_input_raises_value_error(engine: Engine, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        engine.generate(**kwargs)


def test_engine_keeps_serving_after_bad_input(engine: Engine, reference: list[list[int]]) -> None:
    for bad in ({"max_new_tokens": -1}, {"top_p": 0}, {"nope": 1}):
        with pytest.raises(ValueError):
            engine.generate(input_ids=[PROMPTS[0], PROMPTS[1]], sampling_params=[greedy(2), bad])
    assert_idle_pool(engine)
    assert run_batch(engine, PROMPTS[:2], MAX_NEW[:2]) == reference[:2]


def test_prompt_plus_max_new_tokens_larger_than_the_pool(tiny_llama: Path, reference: list[list[int]]) -> None:
    eng = make_engine(tiny_llama, max_total_tokens=256)
    try:
        with pytest.raises(ValueError, match="max-total-tokens"):
            eng.generate(input_ids=[5] * 100, sampling_params=greedy(200))
        with pytest.raises(ValueError, match="max-total-tokens"):
            eng.generate(input_ids=[5] * 300, sampling_params=greedy(0))
        assert run_batch(eng, PROMPTS[:3], MAX_NEW[:3]) == reference[:3]
        assert_idle_pool(eng)
    finally:
        eng.shutdown()


def test_unknown_engine_argument(tiny_llama: Path) -> None:
    with pytest.raises(TypeError, match="max_total_token"):
        Engine(str(tiny_llama), max_total_token=100)


def test_empty_input_ids_is_rejected(engine: Engine) -> None:
    with pytest.raises(ValueError, match="empty"):
        engine.generate(input_ids=[], sampling_params=greedy(3))


def test_duplicate_rid_does_not_orphan_the_running_request(engine: Engine) -> None:
    it = engine.generate(input_ids=SHORT[1], sampling_params=greedy(300), stream=True, rid="twice")
    try:
        bounded(next, it)
        dup = gen(engine, input_ids=SHORT[2], sampling_params=greedy(3), rid="twice")
        assert dup["meta_info"]["finish_reason"]["type"] == "abort"
        assert "duplicate" in dup["meta_info"]["finish_reason"]["message"]
        rest = collect(it, timeout=5)
        assert finished(rest[-1]) and len(rest[-1]["output_ids"]) == 300
    finally:
        engine.abort("twice")
        bounded(engine.wait_idle, 20.0)


def test_top_k_above_the_vocabulary_does_not_break_the_batch(engine: Engine, reference: list[list[int]]) -> None:
    outs = gen(engine, input_ids=[PROMPTS[0], PROMPTS[1]],
               sampling_params=[greedy(MAX_NEW[0]), {"top_k": 1000, "max_new_tokens": 4}])
    assert outs[0]["output_ids"] == reference[0]
    assert len(outs[1]["output_ids"]) == 4


# ---- maintenance, concurrency ------------------------------------------------------------------------------


def test_flush_cache_only_when_idle(engine: Engine) -> None:
    it = engine.generate(input_ids=SHORT[4], sampling_params=greedy(1500), stream=True)
    try:
        bounded(next, it)
        with pytest.raises(RuntimeError, match="in flight"):
            engine.flush_cache()
    finally:
        it.close()
    assert_idle_pool(engine)
    engine.flush_cache()
    assert engine.check_invariant() == (POOL, 0, 0)
    assert engine.get_stats().tree_tokens == 0


def test_concurrent_callers(engine: Engine, reference: list[list[int]]) -> None:
    results: dict[int, list[list[int]]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            mine = [(k, PROMPTS[k], MAX_NEW[k]) for k in range(i, len(PROMPTS), 4)]
            got = []
            for _, p, n in mine * 2:
                got.append(engine.generate(input_ids=p, sampling_params=greedy(n))["output_ids"])
            results[i] = got
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert not errors, errors
    for i in range(4):
        ks = list(range(i, len(PROMPTS), 4))
        assert results[i] == [reference[k] for k in ks] * 2
    assert_idle_pool(engine)


# ---- GGUF vs safetensors ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fixtures.gguf_writer import write_gguf
    from safetensors.torch import load_file

    from radixfair.engine.loaders import inspect_model

    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    config = inspect_model(str(tiny_llama)).config
    write_gguf(path, config, load_file(str(tiny_llama / "model.safetensors")),
               tokenizer_json_path=str(tiny_llama / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def gguf_engine(tiny_gguf: Path) -> Iterator[Engine]:
    eng = make_engine(tiny_gguf)
    yield eng
    eng.shutdown()


def test_gguf_and_safetensors_load_the_same_weights(tiny_llama: Path, tiny_gguf: Path) -> None:
    from radixfair.engine.loaders import inspect_model, load_state_dict

    hf_files, gg_files = inspect_model(str(tiny_llama)), inspect_model(str(tiny_gguf))
    assert gg_files.format == "gguf" and hf_files.format == "hf"
    a, b = hf_files.config, gg_files.config
    assert a.rms_norm_eps == pytest.approx(b.rms_norm_eps, rel=1e-6)  # GGUF stores it as float32
    assert {**a.__dict__, "rms_norm_eps": 0} == {**b.__dict__, "rms_norm_eps": 0}
    sa, sb = load_state_dict(hf_files, torch.float32), load_state_dict(gg_files, torch.float32)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def runner_logits(path: Path, ids: list[int]) -> torch.Tensor:
    from radixfair.engine.loaders import inspect_model, load_state_dict
    from radixfair.engine.model_runner import ModelRunner, RunnerConfig
    from radixfair.sampling_params import SamplingParams
    from radixfair.sched.request import Req

    files = inspect_model(str(path))
    runner = ModelRunner(files.config, load_state_dict(files, torch.float32), RunnerConfig(256, 4, 512),
                         torch.float32, torch.device("cpu"))
    n = len(ids)
    slots = np.arange(3, 3 + n, dtype=np.int64)
    batch = ScheduledBatch(
        mode=BatchMode.PREFILL,
        reqs=[Req(origin_input_ids=ids, sampling_params=SamplingParams(temperature=0))],
        input_ids=np.asarray(ids, dtype=np.int64),
        positions=np.arange(n, dtype=np.int64),
        out_slots=slots,
        rows=np.asarray([1], dtype=np.int64),
        prefix_lens=np.asarray([0], dtype=np.int64),
        extend_lens=np.asarray([n], dtype=np.int64),
        sample=[True],
        row_slots=[slots],
        logprob_positions=[(np.arange(n - 1, dtype=np.int64), np.asarray(ids[1:], dtype=np.int64))],
    )
    with torch.no_grad():
        return runner.model(runner._prepare(batch), runner.kv).float()


def test_gguf_and_safetensors_logits_agree(tiny_llama: Path, tiny_gguf: Path, hf_model: Any) -> None:
    ids = LONG[0][:64]
    a, b = runner_logits(tiny_llama, ids), runner_logits(tiny_gguf, ids)
    assert a.shape == (len(ids), 320)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with torch.no_grad():
        want = hf_model(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(b, want, atol=1e-4, rtol=0)


def test_gguf_and_safetensors_engines_generate_the_same(
    engine: Engine, gguf_engine: Engine, reference: list[list[int]]
) -> None:
    assert run_batch(gguf_engine, PROMPTS, MAX_NEW) == reference
    text = "Hello there, in the theatre: the end."
    assert gguf_engine.tokenizer.encode(text) == engine.tokenizer.encode(text)
    sp = greedy(12)
    a, b = gen(engine, prompt=text, sampling_params=sp), gen(gguf_engine, prompt=text, sampling_params=sp)
    assert a["output_ids"] == b["output_ids"]
    assert EOS in gguf_engine.eos_token_ids
    assert_idle_pool(gguf_engine)


def test_gguf_padding_tokens_decode_like_the_hf_tokenizer(engine: Engine, gguf_engine: Engine) -> None:
    ids = [40, 284, 41, 300]  # 284 and 300 are embedding rows past the tokenizer's 264 tokens
    assert gguf_engine.tokenizer.decode(ids) == engine.tokenizer.decode(ids)


# ---- the real model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_engine() -> Iterator[Engine]:
    eng = Engine(max_total_tokens=4096)
    yield eng
    eng.shutdown()


@requires_real_model
def test_real_model_knows_the_capital_of_france(real_engine: Engine) -> None:
    prompt = real_engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    out = gen(real_engine, timeout=120, prompt=prompt, sampling_params={"temperature": 0, "max_new_tokens": 24})
    assert "Paris" in out["text"], out["text"]
    assert out["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    assert_idle_pool(real_engine)


def test_n_samples_per_prompt(engine: Engine) -> None:
    outs = engine.generate(
        input_ids=SHORT[1], sampling_params={"max_new_tokens": 6, "temperature": 1.0, "n": 3, "seed": 7,
                                             "ignore_eos": True}
    )
    assert isinstance(outs, list) and len(outs) == 3
    assert all(o["meta_info"]["completion_tokens"] == 6 for o in outs)
    assert len({tuple(o["output_ids"]) for o in outs}) > 1, "seeded copies must not all be equal"
    again = engine.generate(
        input_ids=SHORT[1], sampling_params={"max_new_tokens": 6, "temperature": 1.0, "n": 3, "seed": 7,
                                             "ignore_eos": True}
    )
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in again]


def test_stop_token_text_is_not_in_the_output(engine: Engine) -> None:
    free = engine.generate(input_ids=SHORT[3], sampling_params=greedy(12))
    ids = free["output_ids"]
    stop = ids[4]
    j = ids.index(stop)
    out = engine.generate(input_ids=SHORT[3], sampling_params={**greedy(12), "stop_token_ids": [stop]})
    assert out["output_ids"] == ids[: j + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == engine.tokenizer.decode(ids[:j])
