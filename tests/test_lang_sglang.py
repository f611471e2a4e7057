"""SGLang's own frontend (the `sglang` package, 0.5.2) driving a radixfair server over the tiny model:
the programs of test_lang.py with `import sglang as sgl`."""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.lang_programs import FEW_SHOT, programs
from fixtures.live_server import LiveServer

from radixfair.engine.engine import Engine
from radixfair.sampling_params import SamplingParams
from radixfair.server import create_app

sgl = pytest.importorskip(
    "sglang", reason="SGLang's frontend is not installed: bash scripts/install.sh --dev installs sglang==0.5.2 "
                     "(--no-deps) and the few packages its frontend imports")

P = programs(sgl)
HAS_CONSTRAINTS = "regex" in {f.name for f in dataclasses.fields(SamplingParams)}
needs_constraints = pytest.mark.skipif(
    not HAS_CONSTRAINTS, reason="SamplingParams has no `regex` field yet: regex/json_schema generation "
                                "needs structured outputs (issue 12) in the engine")


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> Iterator[Engine]:
    with Engine(str(tiny_llama), dtype="float32", max_total_tokens=8192) as e:
        yield e


@pytest.fixture(scope="module")
def backend(engine: Engine) -> Iterator[Any]:
    srv = LiveServer(create_app(engine))
    yield sgl.RuntimeEndpoint(srv.url)
    srv.stop()


@pytest.fixture(autouse=True)
def no_leak(engine: Engine) -> Iterator[None]:
    yield
    # SGLang's frontend may still send a request from its own threads after a test body returns
    # (e.g. a program that failed): wait until the engine stays idle, then nothing may hold KV
    deadline = time.monotonic() + 20
    while True:
        engine.wait_idle(20)
        protected = engine.check_invariant()[2]
        if protected == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert protected == 0


def test_model_info_names_the_model(backend: Any, tiny_llama: Path) -> None:
    assert backend.get_model_name() == tiny_llama.name  # a name SGLang can match, never a path
    assert backend.get_chat_template().name == "default"  # the tiny model's name matches none of SGLang's


def test_gen_with_stop_strings(backend: Any) -> None:
    free = P.few_shot_qa.run(question="What is two plus two?", backend=backend, temperature=0, ignore_eos=True)
    answer = free["answer"]
    assert free.get_meta_info("answer")["completion_tokens"] == 16
    stop = next(c for c in answer[1:] + "Q" if c.isascii() and c.isprintable() and not c.isspace())
    cut = P.few_shot_qa.run(question="What is two plus two?", stop=stop, backend=backend, temperature=0,
                            ignore_eos=True)
    assert cut["answer"] == answer.split(stop)[0]
    assert cut.text() == FEW_SHOT + "Q: What is two plus two?\nA:" + cut["answer"]


def test_multi_turn_roles(backend: Any) -> None:
    state = P.multi_turn.run(questions=["Hi", "Why?"], backend=backend, temperature=0)
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant", "user", "assistant"]
    assert state.text().startswith("SYSTEM:You are a terse assistant.\nUSER:Hi\nASSISTANT:")
    assert state.get_meta_info("answer_1")["cached_tokens"] >= state.get_meta_info("answer_0")["prompt_tokens"]


@pytest.mark.parametrize("method", ["token_length_normalized", "greedy_token_selection",
                                    "unconditional_likelihood_normalized"])
def test_select_all_three_methods(backend: Any, method: str) -> None:
    state = P.pick.run(question="Is water wet?", method=getattr(sgl, method), backend=backend)
    assert state.error() is None
    assert state["answer"] in (" yes", " no", " maybe so")
    meta = state.get_meta_info("answer")
    assert len(meta["normalized_prompt_logprobs"]) == 3
    if method == "unconditional_likelihood_normalized":
        # SGLang's server answers an input_ids batch without logprob_start_len with one entry per prompt
        assert [len(u) for u in meta["unconditional_token_logprobs"]] == [1, 1, 1]
        assert all(u[0][0] is None for u in meta["unconditional_token_logprobs"])


@pytest.mark.parametrize("mode", ["gather_variable", "concate_and_append"])
def test_fork_join(backend: Any, engine: Engine, mode: str) -> None:
    prefix = f"Context {uuid.uuid4().hex}: " + " ".join(f"fact {i}." for i in range(40))
    n_prefix = len(engine.tokenizer.encode(prefix))
    before = engine.get_stats()
    state = P.fork_join.run(prefix=prefix, branches=4, mode=mode, backend=backend, temperature=0, ignore_eos=True)
    assert state.error() is None
    forks = state.ret_value
    ideas = [f["idea"] for f in forks]
    # SGLang's fork looks at the text before waiting for it, so a prefix still queued is not committed
    # first; the branches then arrive together and the scheduler computes the prefix for one of them
    # while the others wait one batch and reuse it: the prefix is computed once either way
    cached = sorted(f.get_meta_info("idea")["cached_tokens"] for f in forks)
    assert all(c >= n_prefix - 1 for c in cached[1:])
    assert n_prefix <= engine.get_stats().prefill_tokens - before.prefill_tokens < n_prefix + 4 * 16
    if mode == "gather_variable":
        assert state["idea"] == ideas
    else:
        assert state.text() == prefix + "".join(f"\nBranch {i}:{idea}" for i, idea in enumerate(ideas))


def test_streaming_and_run_batch(backend: Any, capfd: pytest.CaptureFixture[str]) -> None:
    state = P.few_shot_qa.run(question="Stream?", backend=backend, stream=True, temperature=0, ignore_eos=True)
    chunks = list(state.text_iter())
    assert len(chunks) > 2 and "".join(chunks) == state.text()
    questions = [f"Question {i}?" for i in range(20)]
    states = P.few_shot_qa.run_batch([{"question": q} for q in questions], backend=backend, temperature=0,
                                     progress_bar=True)
    assert "20/20" in capfd.readouterr().err
    assert [s.text().split("Q: ")[-1].split("\n")[0] for s in states] == questions


@pytest.mark.filterwarnings("ignore:Error in stream_executor")  # SGLang warns as well as recording it
def test_tool_use_and_errors(backend: Any) -> None:
    state = P.tool_use.run(question="What is 2+2?", backend=backend, temperature=0)
    assert state["plan"] == f"Tool: {state['tool']}\n"
    bad = P.bad_temperature.run(backend=backend)
    assert "temperature" in str(bad.error())


@needs_constraints
def test_regex_gen_int_and_json_schema(backend: Any) -> None:
    for state in P.regex_number.run_batch([{}] * 4, backend=backend, temperature=1.0):
        assert re.fullmatch(r"[0-9]{1,4}", state["number"]) and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
                                                                            state["date"])
    for state in P.count.run_batch([{}] * 8, backend=backend, temperature=1.0):
        assert re.fullmatch(r"[-+]?[0-9]+", state["n"]), state["n"]
    obj = json.loads(P.person.run(backend=backend, temperature=0)["json"])
    assert set(obj) == {"name", "adult"} and obj["name"] in ("Ann", "Bob") and isinstance(obj["adult"], bool)
