"""The frontend language on the tiny model: the same programs over a live server (`RuntimeEndpoint`)
and in-process (`InProcessBackend`, the engine contract without HTTP)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fixtures.lang_programs import FEW_SHOT, programs
from fixtures.live_server import LiveServer, free_port

import radixfair as sgl
from radixfair.engine.engine import Engine
from radixfair.lang import BackendError
from radixfair.lang.backend.base import Backend
from radixfair.sampling_params import SamplingParams
from radixfair.server import create_app

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
def server(engine: Engine) -> Iterator[LiveServer]:
    srv = LiveServer(create_app(engine))
    yield srv
    srv.stop()


@pytest.fixture(params=["http", "inprocess"])
def backend(request: pytest.FixtureRequest, engine: Engine, server: LiveServer) -> Iterator[Backend]:
    b: Backend = sgl.RuntimeEndpoint(server.url) if request.param == "http" else sgl.InProcessBackend(engine)
    yield b
    b.shutdown()
    engine.wait_idle(20)
    assert engine.check_invariant()[2] == 0  # nothing left protected: no KV slot leaked


def prompt_logprobs(engine: Engine, ids: list[int]) -> list[float | None]:
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                          logprob_start_len=0)
    return [e[0] for e in out["meta_info"]["input_token_logprobs"]]


def test_few_shot_qa_with_stop_strings(backend: Backend) -> None:
    for question in ("What is two plus two?", "Name a fruit.", "Where is Rome?"):
        free = P.few_shot_qa.run(question=question, backend=backend, temperature=0, ignore_eos=True)
        answer = free["answer"]
        assert free.get_meta_info("answer")["completion_tokens"] == 16
        stops = [c for c in answer[1:] if c.isascii() and c.isprintable() and not c.isspace()]
        if stops:
            break
    assert stops, "no printable character to stop on in three greedy answers"
    stop = stops[0]
    cut = P.few_shot_qa.run(question=question, stop=stop, backend=backend, temperature=0, ignore_eos=True)
    assert cut["answer"] == answer[:answer.index(stop)]
    assert cut.get_meta_info("answer")["finish_reason"] == {"type": "stop", "matched": stop}
    assert cut.text() == FEW_SHOT + f"Q: {question}\nA:" + cut["answer"]


def test_multi_turn_roles_render_with_the_model_template(backend: Backend, engine: Engine) -> None:
    state = P.multi_turn.run(questions=["Hi", "Why?", "Ok"], backend=backend, temperature=0)
    msgs = state.messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2
    assert [m["content"] for m in msgs[1::2]] == ["Hi", "Why?", "Ok"]
    assert [m["content"] for m in msgs[2::2]] == [state[f"answer_{i}"] for i in range(3)]
    assert state.text() == engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=False)
    # each turn extends the conversation, so it finds the previous turns in the radix cache
    first, third = state.get_meta_info("answer_0"), state.get_meta_info("answer_2")
    assert third["cached_tokens"] >= first["prompt_tokens"]
    forms = P.role_forms.run(backend=backend, temperature=0)
    assert forms.messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": forms["reply"]}]


@pytest.mark.parametrize("method", ["token_length_normalized", "greedy_token_selection",
                                    "unconditional_likelihood_normalized"])
def test_select_scores_choices_from_prompt_logprobs(backend: Backend, engine: Engine, method: str) -> None:
    choices = [" yes", " no", " maybe so"]
    question = "Is water wet?"
    state = P.pick.run(question=question, method=getattr(sgl, method), backend=backend)
    decision, meta = state["answer"], state.get_meta_info("answer")
    assert decision in choices and state.text() == f"Q: {question}\nA:{decision}"
    # the same scores from the engine directly: each choice's tokens after the prompt's
    prefix = f"Q: {question}\nA:"
    prefix_ids = engine.tokenizer.encode(prefix)
    cond, uncond = [], []
    for c in choices:
        ids = engine.tokenizer.encode(prefix + c)
        k = next(i for i in range(len(ids)) if i >= len(prefix_ids) or ids[i] != prefix_ids[i])
        lps = prompt_logprobs(engine, ids)[k:]
        cond.append(lps)
        assert [e[1] for e in meta["input_token_logprobs"][choices.index(c)]] == ids[k:]
        uncond.append(prompt_logprobs(engine, ids[k:]))
    means = [sum(x for x in lps if x is not None) / len(lps) for lps in cond]
    assert meta["normalized_prompt_logprobs"] == pytest.approx(means, abs=1e-4)
    if method == "token_length_normalized":
        assert decision == choices[max(range(3), key=lambda i: means[i])]
    elif method == "unconditional_likelihood_normalized":
        scores = [sum(a - (b or 0.0) for a, b in zip(c, u, strict=True)) / len(c)
                  for c, u in zip(cond, uncond, strict=True)]
        assert meta["normalized_unconditional_prompt_logprobs"] == pytest.approx(scores, abs=1e-4)
        assert decision == choices[max(range(3), key=lambda i: scores[i])]
    else:
        assert "greedy_logprob_matrix" in meta
        assert decision == sgl.greedy_token_selection(
            choices=choices, normalized_prompt_logprobs=means, output_token_logprobs=[[]] * 3,
            input_token_logprobs=[[[x, 0, None] for x in lps] for lps in cond]).decision


@needs_constraints
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex_integers_and_dates(backend: Backend, temperature: float) -> None:
    states = P.regex_number.run_batch([{}] * 4, backend=backend, temperature=temperature)
    for state in states:
        assert state.error() is None
        assert re.fullmatch(r"[0-9]{1,4}", state["number"]), state["number"]
        assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", state["date"]), state["date"]


@needs_constraints
def test_gen_int_matches_at_temperature_one(backend: Backend) -> None:
    for state in P.count.run_batch([{}] * 8, backend=backend, temperature=1.0):
        assert re.fullmatch(r"[-+]?[0-9]+", state["n"]), state["n"]


@needs_constraints
def test_json_schema_output_parses_and_validates(backend: Backend) -> None:
    for temperature in (0.0, 1.0):
        state = P.person.run(backend=backend, temperature=temperature)
        obj = json.loads(state["json"])
        assert set(obj) == {"name", "adult"} and obj["name"] in ("Ann", "Bob") and isinstance(obj["adult"], bool)


@pytest.mark.parametrize("mode", ["gather_variable", "concate_and_append"])
def test_fork_prefills_the_shared_prefix_once(backend: Backend, engine: Engine, mode: str) -> None:
    prefix = f"Context {uuid.uuid4().hex}: " + " ".join(f"fact {i}." for i in range(40))
    n_prefix = len(engine.tokenizer.encode(prefix))
    n = 4
    before = engine.get_stats()
    state = P.fork_join.run(prefix=prefix, branches=n, mode=mode, backend=backend, temperature=0, ignore_eos=True)
    state.sync()
    assert state.error() is None
    forks = state.ret_value
    ideas = [f["idea"] for f in forks]
    for f in forks:
        meta = f.get_meta_info("idea")
        assert meta["completion_tokens"] == 4 and meta["cached_tokens"] >= n_prefix - 1
    computed = engine.get_stats().prefill_tokens - before.prefill_tokens
    assert n_prefix <= computed < n_prefix + n * 16  # the prefix once, then only each branch's own tokens
    if mode == "gather_variable":
        assert state["idea"] == ideas and state.text() == prefix
    else:
        assert state.text() == prefix + "".join(f"\nBranch {i}:{idea}" for i, idea in enumerate(ideas))


def test_run_batch_of_20_with_progress_bar(backend: Backend, engine: Engine,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    questions = [f"Question number {i} {uuid.uuid4().hex[:6]}?" for i in range(20)]
    states = P.few_shot_qa.run_batch([{"question": q} for q in questions], backend=backend, temperature=0,
                                     progress_bar=True)
    assert "20/20" in capfd.readouterr().err
    assert [s.text().split("Q: ")[-1].split("\n")[0] for s in states] == questions
    # run_batch prefilled the program's constant prefix first: every program found it cached
    n_few_shot = len(engine.tokenizer.encode(FEW_SHOT))
    assert all(s.get_meta_info("answer")["cached_tokens"] >= n_few_shot - 1 for s in states)


def test_streaming_chunks_concatenate_to_the_final_text(backend: Backend) -> None:
    state = P.few_shot_qa.run(question="Stream?", backend=backend, stream=True, temperature=0, ignore_eos=True)
    chunks = list(state.text_iter())
    assert len(chunks) > 2 and "".join(chunks) == state.text()
    state = P.few_shot_qa.run(question="Stream?", backend=backend, stream=True, temperature=0, ignore_eos=True)
    var_chunks = list(state.text_iter("answer"))
    assert len(var_chunks) > 1 and "".join(var_chunks) == state["answer"] == state.text()[-len(state["answer"]):]
    assert state.get_meta_info("answer")["completion_tokens"] == 16

    async def read() -> list[str]:
        s = P.few_shot_qa.run(question="Async?", backend=backend, stream=True, temperature=0)
        return [piece async for piece in s.text_async_iter("answer")]

    assert "".join(asyncio.run(read())) != ""


def test_tool_use_with_var_scope(backend: Backend) -> None:
    state = P.tool_use.run(question="What is 2+2?", backend=backend, temperature=0)
    assert state["tool"] in ("search", "calculator")
    assert state["plan"] == f"Tool: {state['tool']}\n"
    assert state.text() == f"Question: What is 2+2?\n{state['plan']}Result: {state['result']}"


def test_server_errors_surface_in_error_and_on_access(backend: Backend) -> None:
    state = P.bad_temperature.run(backend=backend)
    err = state.error()
    assert isinstance(err, BackendError) and err.status == 400 and "temperature" in str(err)
    with pytest.raises(BackendError, match="temperature"):
        state["x"]
    ok = P.few_shot_qa.run(question="still serving?", backend=backend)
    assert ok.error() is None and ok.get_meta_info("answer")["completion_tokens"] >= 1


def test_cache_bind_copy_and_server_calls(backend: Backend, engine: Engine) -> None:
    @sgl.function
    def with_context(s: Any, context: str, question: str) -> None:
        s += "Context: " + context + "\n"
        s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=3)
        with s.copy() as c:
            c += " (draft)" + sgl.gen("draft", max_tokens=2)

    bound = with_context.bind(context=f"{uuid.uuid4().hex} " + "lorem ipsum " * 20)
    prefix = bound.cache(backend=backend)
    assert prefix.startswith("Context: ") and prefix.endswith("\n") and "Q: " not in prefix
    state = bound.run(question="ok?", backend=backend, temperature=0)
    assert state.get_meta_info("answer")["cached_tokens"] >= len(engine.tokenizer.encode(prefix)) - 1
    assert state.error() is None and "draft" not in state.text()
    assert sgl.get_server_info(backend)["max_total_tokens"] == 8192
    engine.wait_idle(20)
    assert sgl.flush_cache(backend) is True and engine.get_stats().tree_tokens == 0


def test_dead_url_is_a_clear_error() -> None:
    with pytest.raises(BackendError, match="cannot reach"):
        sgl.RuntimeEndpoint(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ValueError, match="base_url"):
        sgl.RuntimeEndpoint("localhost:30000")


def test_runtime_owns_an_in_process_engine(tiny_llama: Path) -> None:
    runtime = sgl.Runtime(model_path=str(tiny_llama), dtype="float32", max_total_tokens=1024)
    try:
        state = P.few_shot_qa.run(question="Hi?", backend=runtime, temperature=0, ignore_eos=True)
        assert state.get_meta_info("answer")["completion_tokens"] == 16
        out = json.loads(runtime.generate("Hello", {"max_new_tokens": 2, "temperature": 0}))
        assert out["meta_info"]["completion_tokens"] == 2

        params = {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}

        async def stream() -> list[str]:
            return [t async for t in runtime.async_generate("Hello", params)]

        assert "".join(asyncio.run(stream())) == json.loads(runtime.generate("Hello", params))["text"]
    finally:
        runtime.shutdown()
    with pytest.raises(TypeError, match="unknown engine argument"):
        sgl.Runtime(model_path=str(tiny_llama), no_such_argument=2)
    with pytest.raises(ValueError, match="tensor parallelism"):
        sgl.Runtime(model_path=str(tiny_llama), tp_size=2)


def test_import_radixfair_stays_light() -> None:
    code = ("import sys, radixfair as sgl\n"
            "names = [sgl.function, sgl.gen, sgl.select, sgl.user, sgl.RuntimeEndpoint, sgl.Runtime, "
            "sgl.set_default_backend, sgl.unconditional_likelihood_normalized]\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'radixfair.engine', "
            "'radixfair.sched'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "[]"


def test_constraints_are_sent_as_sampling_params(backend: Backend) -> None:
    state = P.regex_number.run(backend=backend, temperature=0)
    if HAS_CONSTRAINTS:
        assert state.error() is None
    else:  # the engine refuses what it cannot enforce, naming the field
        err = state.error()
        assert isinstance(err, BackendError) and err.status == 400 and "regex" in str(err)


def test_server_pieces_sglangs_frontend_needs(server: LiveServer, engine: Engine) -> None:
    import httpx

    from radixfair.engine.loaders.hub import clean_model_name as model_name_of

    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.post("/concate_and_append_request", json={"src_rids": ["a"], "dst_rid": "b"}).status_code == 200
        # an input_ids batch with return_logprob and no logprob_start_len: one entry per prompt, the
        # last prompt token without a value (SGLang's default start is the last position)
        r = http.post("/generate", json={"input_ids": [[5, 6, 7], [8, 9]], "return_logprob": True,
                                         "sampling_params": {"max_new_tokens": 0}})
        assert [x["meta_info"]["input_token_logprobs"] for x in r.json()] == [[[None, 7, None]], [[None, 9, None]]]
        with http.stream("POST", "/generate", json={"input_ids": [5, 6, 7], "return_logprob": True, "stream": True,
                                                    "sampling_params": {"max_new_tokens": 2}}) as s:
            first = json.loads(next(line for line in s.iter_lines() if line.startswith("data:"))[5:])
        assert first["meta_info"]["input_token_logprobs"] == [[None, 7, None]]
        r = http.post("/generate", json={"input_ids": [5, 6, 7], "return_logprob": True, "logprob_start_len": 1,
                                         "sampling_params": {"max_new_tokens": 0}})
        assert [e[1] for e in r.json()["meta_info"]["input_token_logprobs"]] == [6, 7]  # asked: unchanged
    assert model_name_of("/m/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct"
    assert model_name_of("/m/Llama-3.2-1B-Instruct-Q8_0.gguf") == "Llama-3.2-1B-Instruct"
    assert model_name_of("/models/Qwen2.5-0.5B-Instruct/") == "Qwen2.5-0.5B-Instruct"


def test_endpoint_reuses_connections_and_retries_one_the_server_closed() -> None:
    app = FastAPI()
    peers: set[Any] = set()

    @app.get("/get_model_info")
    async def info(request: Request) -> dict[str, Any]:
        peers.add(request.client)
        return {"model_path": "m"}

    @app.post("/generate")
    async def generate(request: Request) -> dict[str, Any]:
        peers.add(request.client)
        body = await request.json()
        return {"text": "!" * body["sampling_params"]["max_new_tokens"], "meta_info": {"prompt_tokens": 1}}

    port = free_port()
    # the server drops a connection idle for 0.3 s, as uvicorn does after its keep-alive timeout
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_keep_alive=0.3))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        backend = sgl.RuntimeEndpoint(f"http://127.0.0.1:{port}")

        @sgl.function
        def two(s: Any) -> None:
            s += "a" + sgl.gen("x", max_tokens=2) + sgl.gen("y", max_tokens=3)

        assert two.run(backend=backend).text() == "a!!!!!"
        assert len(peers) == 1  # one connection carried all three requests
        time.sleep(0.8)  # the server has closed it by now
        assert two.run(backend=backend).text() == "a!!!!!"
        assert len(peers) == 2
        backend.shutdown()
    finally:
        server.should_exit = True
        thread.join(10)
