"""The `OpenAI` backend against radixfair's own `/v1` on the tiny model, API speculative execution,
tracing, and `run_batch`'s prefix hoisting (counted at the server: every request is recorded)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fixtures.lang_programs import FEW_SHOT, programs
from fixtures.live_server import LiveServer
from fixtures.tiny_models import make_tiny_model

import radixfair as sgl
from radixfair.engine.engine import Engine
from radixfair.lang import Backend, BackendError, ChoicesDecision, ChoicesSamplingMethod
from radixfair.lang.backend.base import Continuation
from radixfair.lang.chat_template import ChatTemplate, get_chat_template
from radixfair.lang.config import global_config
from radixfair.lang.interpreter import StreamExecutor
from radixfair.lang.ir import GenParams
from radixfair.server import create_app

P = programs(sgl)


class Recorder:
    """An ASGI wrapper that keeps every request's path and JSON body."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[tuple[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def recv() -> Any:
            msg = await receive()
            if msg["type"] == "http.request":
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body"):
                    raw = b"".join(chunks)
                    self.requests.append((scope["path"], json.loads(raw) if raw else None))
            return msg

        await self.app(scope, recv, send)

    def bodies(self, path: str) -> list[Any]:
        return [b for p, b in self.requests if p == path]


@pytest.fixture(scope="module")
def ascii_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random model, its output weights zeroed for every token that is not printable ASCII
    text: greedy decoding then writes whole characters, so that the text a server returns is
    exactly the tokens it generated (a raw byte would come back as U+FFFD and change the next
    prompt), and a speculation knows where each token ends."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    path = make_tiny_model(tmp_path_factory.mktemp("ascii_llama"), "llama")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    weights = load_file(str(path / "model.safetensors"))
    head = weights["lm_head.weight"]
    for i in range(head.shape[0]):
        text = tok.decode([i])
        if not text or not all(32 <= ord(c) < 127 for c in text):
            head[i] = 0.0
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def engine(ascii_llama: Path) -> Iterator[Engine]:
    with Engine(str(ascii_llama), dtype="float32", max_total_tokens=8192) as e:
        yield e


@pytest.fixture(scope="module")
def recorder(engine: Engine) -> Recorder:
    return Recorder(create_app(engine))


@pytest.fixture(scope="module")
def server(recorder: Recorder) -> Iterator[LiveServer]:
    srv = LiveServer(recorder)
    yield srv
    srv.stop()


@pytest.fixture
def completion(server: LiveServer, engine: Engine) -> Iterator[sgl.OpenAI]:
    b = sgl.OpenAI(None, base_url=server.url + "/v1", is_chat_model=False)
    yield b
    b.shutdown()
    engine.wait_idle(20)
    assert engine.check_invariant()[2] == 0  # nothing left protected: no KV slot leaked


@pytest.fixture
def chat(server: LiveServer) -> Iterator[sgl.OpenAI]:
    b = sgl.OpenAI(None, base_url=server.url + "/v1", is_chat_model=True)
    yield b
    b.shutdown()


# ---- the backend --------------------------------------------------------------------------------
def test_completion_model_runs_the_language_programs(completion: sgl.OpenAI, server: LiveServer,
                                                     recorder: Recorder) -> None:
    assert completion.model_name == completion._http.json("GET", "/models")["data"][0]["id"]
    native = sgl.RuntimeEndpoint(server.url)
    # the same text greedily: the same answer as the native backend, stop strings included
    question = "What is two plus two?"
    ref = P.few_shot_qa.run(question=question, backend=native, temperature=0, ignore_eos=True)
    state = P.few_shot_qa.run(question=question, backend=completion, temperature=0, ignore_eos=True)
    assert state["answer"] == ref["answer"] and state.text() == ref.text()
    assert state.get_meta_info("answer")["completion_tokens"] == 16
    recorder.requests.clear()
    stop = next(c for c in ref["answer"][1:] if c.isascii() and c.isprintable() and not c.isspace())
    cut = P.few_shot_qa.run(question=question, stop=stop, backend=completion, temperature=0, ignore_eos=True)
    assert cut["answer"] == ref["answer"][:ref["answer"].index(stop)]
    body = recorder.bodies("/v1/completions")[-1]
    assert body["prompt"] == FEW_SHOT + f"Q: {question}\nA:" and body["stop"] == [stop] and body["ignore_eos"]
    assert "top_k" not in body and "regex" not in body  # extensions only when a program sets them
    usage = state.api_usage()
    assert usage.calls == 1 and usage.input_tokens > len(FEW_SHOT) // 8 and usage.output_tokens == 16

    for s in P.regex_number.run_batch([{}] * 3, backend=completion, temperature=1.0):
        assert re.fullmatch(r"[0-9]{1,4}", s["number"]) and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", s["date"])
    assert re.fullmatch(r"[-+]?[0-9]+", P.count.run(backend=completion, temperature=1.0)["n"])
    person = json.loads(P.person.run(backend=completion, temperature=0)["json"])
    assert set(person) == {"name", "adult"} and person["name"] in ("Ann", "Bob")
    # select without prompt logprobs (radixfair's /v1 has no echo): the model generates one choice
    tool = P.tool_use.run(question="What is 2+2?", backend=completion, temperature=0)
    assert tool.error() is None and tool["tool"] in ("search", "calculator")
    assert tool["plan"] == f"Tool: {tool['tool']}\n" and tool.get_meta_info("tool")["select_mode"] == "constrained"
    forked = P.fork_join.run(prefix="Ideas:", branches=3, mode="gather_variable", backend=completion, temperature=0)
    assert forked.error() is None and len(forked["idea"]) == 3
    # roles become text in the completion model's template (SGLang's default)
    turns = P.multi_turn.run(questions=["Hi", "Why?"], backend=completion, temperature=0)
    assert turns.text().startswith("SYSTEM:You are a terse assistant.\nUSER:Hi\nASSISTANT:")
    native.shutdown()


def test_chat_model_sends_messages(chat: sgl.OpenAI, recorder: Recorder) -> None:
    recorder.requests.clear()
    state = P.multi_turn.run(questions=["Hi", "Why?", "Ok"], backend=chat, temperature=0)
    msgs = state.messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"] + ["user", "assistant"] * 2
    assert [m["content"] for m in msgs[2::2]] == [state[f"answer_{i}"] for i in range(3)]
    assert state.text() == "".join(m["content"] for m in msgs)  # roles add nothing to a chat model's text
    bodies = recorder.bodies("/v1/chat/completions")
    assert len(bodies) == 3 and bodies[2]["messages"] == msgs[:6]
    forms = P.role_forms.run(backend=chat, temperature=0)
    assert forms.error() is None and forms.messages()[-1] == {"role": "assistant", "content": forms["reply"]}
    # a chat model answers whole messages: a gen in the middle of text is a clear error
    bad = P.few_shot_qa.run(question="x", backend=chat)
    assert isinstance(bad.error(), ValueError) and "assistant" in str(bad.error())


def test_streaming_and_errors(completion: sgl.OpenAI, chat: sgl.OpenAI) -> None:
    state = P.few_shot_qa.run(question="Stream?", backend=completion, stream=True, temperature=0, ignore_eos=True)
    chunks = list(state.text_iter("answer"))
    assert len(chunks) > 1 and "".join(chunks) == state["answer"]
    assert state.get_meta_info("answer")["completion_tokens"] == 16 and state.api_usage().calls == 1
    plain = P.few_shot_qa.run(question="Stream?", backend=completion, temperature=0, ignore_eos=True)
    assert plain["answer"] == state["answer"]
    turns = P.multi_turn.run(questions=["Hi"], backend=chat, stream=True, temperature=0)
    assert "".join(turns.text_iter("answer_0")) == turns["answer_0"]
    bad = P.bad_temperature.run(backend=completion)
    err = bad.error()
    assert isinstance(err, BackendError) and err.status == 400 and "temperature" in str(err)
    with pytest.raises(BackendError, match="temperature"):
        bad["x"]
    with pytest.raises(BackendError, match=r"404|model"):
        P.count.run(backend=sgl.OpenAI("no-such-model", base_url=completion.base_url, is_chat_model=False))["n"]


def test_model_kind_follows_the_name() -> None:
    from radixfair.lang.backend.openai import is_chat_model_name

    assert is_chat_model_name("gpt-4o") and not is_chat_model_name("gpt-3.5-turbo-instruct")
    with pytest.raises(ValueError, match="select_mode"):
        sgl.OpenAI("m", base_url="http://127.0.0.1:1/v1", select_mode="best")  # type: ignore[arg-type]


# ---- API speculative execution on the live server ------------------------------------------------
def _greedy_tokens(completion: sgl.OpenAI, prompt: str, n: int) -> list[str] | None:
    body = {"model": completion.model_name, "prompt": prompt, "max_tokens": n, "temperature": 0, "logprobs": 0,
            "ignore_eos": True}
    out = completion._http.json("POST", "/completions", body)
    choice = out["choices"][0]
    tokens: list[str] = choice["logprobs"]["tokens"]
    return tokens if "".join(tokens) == choice["text"] and all(tokens) else None


def _spelled_prompt(completion: sgl.OpenAI, n: int) -> tuple[str, list[str]]:
    """A prompt and its greedy continuation's tokens, which spell the continuation's text."""
    prompt = "Prompt: "
    tokens = _greedy_tokens(completion, prompt, n)
    assert tokens is not None, "the ASCII model wrote a token that is not whole characters"
    return prompt, tokens


def test_speculation_answers_later_gens_without_calls(completion: sgl.OpenAI, recorder: Recorder) -> None:
    prompt, tokens = _spelled_prompt(completion, 9)

    def three(s: Any, p: str) -> None:
        s += p + sgl.gen("a", max_tokens=3) + sgl.gen("b", max_tokens=3) + sgl.gen("c", max_tokens=3)

    recorder.requests.clear()
    spec = sgl.function(three, num_api_spec_tokens=16).run(p=prompt, backend=completion, temperature=0,
                                                           ignore_eos=True)
    spec.sync()
    first = recorder.bodies("/v1/completions")
    plain = sgl.function(three).run(p=prompt, backend=completion, temperature=0, ignore_eos=True)
    # the greedy continuation, cut where three normal calls of 3 tokens each would cut it
    assert [spec[k] for k in "abc"] == ["".join(tokens[i:i + 3]) for i in (0, 3, 6)]
    assert spec["a"] == plain["a"]
    su, pu = spec.api_usage(), plain.api_usage()
    assert (su.calls, su.spec_calls, su.spec_hits, su.spec_misses) == (1, 1, 2, 0)
    assert pu.calls == 3 and pu.input_tokens > su.input_tokens and su.input_tokens_saved > 0
    assert len(first) == 1 and first[0]["max_tokens"] == 16 and "stop" not in first[0]  # past the gen's own limit and stops
    assert spec.get_meta_info("b")["speculative"] and spec.get_meta_info("b")["completion_tokens"] == 3


def test_speculation_stops_where_a_call_would_and_follows_constant_text(completion: sgl.OpenAI) -> None:
    prompt, tokens = _spelled_prompt(completion, 12)
    k = next(i for i in range(2, 8) if tokens[i] not in "".join(tokens[:i]) and tokens[i].strip())
    stop = tokens[k]

    @sgl.function(num_api_spec_tokens=12)
    def fields(s: Any) -> None:
        s += prompt + sgl.gen("a", stop=stop, max_tokens=10) + stop + sgl.gen("b", max_tokens=2)

    state = fields.run(backend=completion, temperature=0, ignore_eos=True)
    assert state["a"] == "".join(tokens[:k]) and state["b"] == "".join(tokens[k + 1:k + 3])
    assert state.get_meta_info("a")["finish_reason"] == {"type": "stop", "matched": stop}
    usage = state.api_usage()
    assert (usage.calls, usage.spec_hits) == (1, 1)


def test_mismatch_falls_back_to_a_call(completion: sgl.OpenAI) -> None:
    prompt, _ = _spelled_prompt(completion, 6)

    def diverging(s: Any, p: str) -> None:
        s += p + sgl.gen("a", max_tokens=3) + "\u2603 snowman" + sgl.gen("b", max_tokens=3)
        s += sgl.gen("c", max_tokens=2, top_k=1)  # other settings: no answer from the speculation

    spec = sgl.function(diverging, num_api_spec_tokens=8).run(p=prompt, backend=completion, temperature=0,
                                                               ignore_eos=True)
    plain = sgl.function(diverging).run(p=prompt, backend=completion, temperature=0, ignore_eos=True)
    assert spec.error() is None and [spec["a"], spec["b"]] == [plain["a"], plain["b"]]
    usage = spec.api_usage()
    assert usage.calls == 3 and usage.spec_hits == 0 and usage.spec_misses == 2
    assert completion.api_usage.snapshot().spec_misses >= 2  # the backend's totals include the state's


def test_chat_model_speculates_a_whole_message(chat: sgl.OpenAI, recorder: Recorder) -> None:
    body = {"model": chat.model_name, "messages": [{"role": "user", "content": "Card?"}], "max_tokens": 12,
            "temperature": 0, "ignore_eos": True}
    whole = chat._http.json("POST", "/chat/completions", body)["choices"][0]["message"]["content"]
    j = next(i for i in range(3, 10) if whole[i] not in whole[2:i])

    def card_message(s: Any, head: str, sep: str) -> None:
        s += sgl.user("Card?")
        s += sgl.assistant(head + sgl.gen("x", stop=whole[j], max_tokens=12) + sep + sgl.gen("y", max_tokens=12))

    recorder.requests.clear()
    state = sgl.function(card_message, num_api_spec_tokens=12).run(
        head=whole[:2], sep=whole[j:j + 2], backend=chat, temperature=0, ignore_eos=True)
    # the model's one message, cut between the program's constant texts
    assert state.error() is None and (state["x"], state["y"]) == (whole[2:j], whole[j + 2:])
    assert state.messages()[-1] == {"role": "assistant", "content": whole}
    usage = state.api_usage()
    assert (usage.calls, usage.spec_calls, usage.spec_hits) == (1, 1, 1)
    sent = recorder.bodies("/v1/chat/completions")
    assert len(sent) == 1 and sent[0]["messages"] == body["messages"] and "stop" not in sent[0]
    # a message that does not follow the program's text fails the state, naming why
    bad = sgl.function(card_message, num_api_spec_tokens=12).run(
        head="\u2603", sep="!", backend=chat, temperature=0, ignore_eos=True)
    assert isinstance(bad.error(), ValueError) and "does not follow" in str(bad.error())
    assert bad.api_usage().spec_misses == 1

    @sgl.function(num_api_spec_tokens=12)
    def early_read(s: Any) -> None:
        s += sgl.user("Card?")
        s += sgl.assistant_begin() + "Name:" + sgl.gen("name", stop="\n")
        s["name"]  # the message is one call at its end: this cannot wait for it

    with pytest.raises(RuntimeError, match="inside the assistant message"):
        early_read.run(backend=chat, temperature=0)


def test_fill_message_cuts_values_between_constant_texts() -> None:
    from radixfair.lang.speculative import DeferredGen, MessageMismatch, fill_message

    nl, free = GenParams(stop=("\n",)), GenParams()
    gens = [DeferredGen(5, "name", nl), DeferredGen(10, "job", free), DeferredGen(16, "town", free)]
    content = "Name:\nJob:\nTown:"
    assert fill_message("Name: Ann\nJob: baker\nTown: Rome and more", content, gens) == [
        " Ann", " baker", " Rome and more"]
    with pytest.raises(MessageMismatch, match="Job"):
        fill_message("Name: Ann\nWork: baker\nTown: Rome", content, gens)
    with pytest.raises(MessageMismatch, match="no text or stop"):
        fill_message("ab", "", [DeferredGen(0, "a", free), DeferredGen(0, "b", free)])


# ---- speculation's cutting rules, without a server -------------------------------------------------
class ScriptedBackend(Backend):
    """Continues any text with `script` (its tokens given or not); counts calls."""

    def __init__(self, script: list[str], spell: bool = True, finished: bool = False) -> None:
        self.script, self.spell, self.finished = script, spell, finished
        self.calls: list[tuple[str, GenParams]] = []

    def get_model_name(self) -> str:
        return "scripted"

    def get_chat_template(self) -> ChatTemplate:
        return get_chat_template("default")

    def _cut(self, params: GenParams) -> tuple[list[str], dict[str, Any]]:
        text, out = "", []
        for tok in self.script[:params.max_new_tokens]:
            out.append(tok)
            text += tok
            for stop in params.stop:
                if stop in text:
                    return out, {"stop": text[:text.index(stop)]}
        return out, {}

    def generate(self, s: StreamExecutor, params: GenParams) -> tuple[str, dict[str, Any]]:
        self.calls.append((s.text_, params))
        toks, cut = self._cut(params)
        return cut.get("stop", "".join(toks)), {"prompt_tokens": len(s.text_)}

    def generate_stream(self, s: StreamExecutor, params: GenParams) -> Iterator[tuple[str, dict[str, Any]]]:
        yield self.generate(s, params)

    def speculate(self, s: StreamExecutor, params: GenParams) -> Continuation:
        self.calls.append((s.text_, params))
        toks = self.script[:params.max_new_tokens]
        ends, pos = [], 0
        for t in toks:
            pos += len(t)
            ends.append(pos)
        return Continuation("".join(toks), tuple(ends) if self.spell else None,
                            self.finished and len(toks) == len(self.script), {"prompt_tokens": len(s.text_)})

    def select(self, s: StreamExecutor, choices: Sequence[str], temperature: float,
               choices_method: ChoicesSamplingMethod) -> ChoicesDecision:
        return ChoicesDecision(choices[0])


CARD = [" Ann", "\n", "Job", ":", " baker", " of", " bread", "\n", "Town", ":", " Rome", "\n"]


@sgl.function(num_api_spec_tokens=12)
def card(s: Any, job_tokens: int = 8) -> None:
    s += "Name:" + sgl.gen("name", stop="\n") + "\nJob:" + sgl.gen("job", stop="\n", max_tokens=job_tokens)
    s += "\nTown:" + sgl.gen("town", stop="\n")


def test_speculation_cuts_at_stops_and_token_limits() -> None:
    backend = ScriptedBackend(CARD)
    state = card.run(backend=backend)
    assert [state["name"], state["job"], state["town"]] == [" Ann", " baker of bread", " Rome"]
    assert len(backend.calls) == 1 and backend.calls[0][1].stop == () and backend.calls[0][1].max_new_tokens == 128
    # a gen whose limit comes before its stop ends at the limit, as a call would; the rest no longer
    # matches the program's text, so the last field is a call again
    backend = ScriptedBackend(CARD)
    state = card.run(backend=backend, job_tokens=2)
    assert state["job"] == " baker of" and len(backend.calls) == 2
    assert state.api_usage().spec_misses == 1 and state.api_usage().spec_hits == 1
    # without token ends, a stop within the limit still answers (a token is at least a character)
    backend = ScriptedBackend(CARD, spell=False)
    state = card.run(backend=backend, job_tokens=20)
    assert [state["name"], state["job"], state["town"]] == [" Ann", " baker of bread", " Rome"]
    assert len(backend.calls) == 1
    # ... but an answer longer in characters than its token limit cannot be placed: the gen drops the
    # speculation, speculates again (no better), and makes a normal call (the script answers " Ann")
    backend = ScriptedBackend(CARD, spell=False)
    state = card.run(backend=backend, job_tokens=3)
    assert state["job"] == " Ann" and len(backend.calls) == 4 and state.api_usage().spec_hits == 0
    # the model stopped (EOS): what it wrote is the whole answer
    backend = ScriptedBackend([" Ann", "\n", "Job", ":", " none"], finished=True)
    state = card.run(backend=backend)
    assert state["job"] == " none" and len(backend.calls) == 2  # the town field follows no speculation
    with pytest.raises(ValueError, match="num_api_spec_tokens"):
        sgl.function(lambda s: None, num_api_spec_tokens=0)


# ---- tracing --------------------------------------------------------------------------------------
def test_trace_finds_the_constant_prefix(server: LiveServer) -> None:
    trace = P.few_shot_qa.trace()
    assert trace.prefix == FEW_SHOT and trace.stopped_at == "argument 'question'"
    assert P.few_shot_qa.trace(question="Why?").stopped_at == "argument 'stop'"  # gen(stop=stop) uses it
    assert P.few_shot_qa.trace(question="Why?", stop=None).stopped_at == "gen 'answer'"

    @sgl.function
    def assistant_turn(s: Any, question: str, level: int) -> None:
        s += sgl.system("You are terse.")
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer"))

    native = sgl.RuntimeEndpoint(server.url)
    template = native.get_chat_template()
    trace = assistant_turn.trace(backend=native)
    system_prefix, system_suffix = template.get_prefix_and_suffix("system", [])
    user_prefix, _ = template.get_prefix_and_suffix("user", [{"role": "system", "content": "You are terse."}])
    # the system message, then the user role's opening: the argument is its content
    assert trace.prefix == system_prefix + "You are terse." + system_suffix + user_prefix
    assert trace.stopped_at == "argument 'question'" and trace.messages == [
        {"role": "system", "content": "You are terse."}]
    multi = P.multi_turn.trace(backend=native)
    assert multi.prefix == system_prefix + "You are a terse assistant." + system_suffix
    assert multi.stopped_at == "argument 'questions'"  # iterating over it ends the prefix
    assert P.multi_turn.trace(backend=native, questions=["Hi"]).stopped_at == "gen 'answer_0'"
    assert P.fork_join.trace(prefix="Context. ").stopped_at == "s.fork" and P.role_forms.trace().stopped_at == \
        "gen 'reply'"
    assert sgl.function(lambda s, x: s.__iadd__(f"<{x}>")).trace().prefix == ""
    with pytest.raises(TypeError, match="no argument"):
        P.few_shot_qa.trace(nobody=1)
    native.shutdown()


@pytest.mark.parametrize("hoist", [True, False])
def test_run_batch_sends_the_hoisted_prefix_once(server: LiveServer, recorder: Recorder, engine: Engine,
                                                 hoist: bool) -> None:
    native = sgl.RuntimeEndpoint(server.url)
    prefix = f"Context {uuid.uuid4().hex}: " + " ".join(f"fact {i}." for i in range(30)) + "\n"
    def few_shot_program(s: Any, question: str) -> None:
        s += prefix
        s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=2)

    few_shot = sgl.function(few_shot_program)
    recorder.requests.clear()
    saved = global_config.enable_precache_with_tracing
    global_config.enable_precache_with_tracing = hoist
    try:
        states = few_shot.run_batch([{"question": f"q{i}?"} for i in range(6)], backend=native, temperature=0)
    finally:
        global_config.enable_precache_with_tracing = saved
    assert all(s.error() is None for s in states)
    bodies = recorder.bodies("/generate")
    prefills = [b for b in bodies if b["text"] == prefix and b["sampling_params"] == {"max_new_tokens": 0}]
    assert len(prefills) == (1 if hoist else 0) and len(bodies) == 6 + len(prefills)
    if hoist:
        assert bodies[0] in prefills  # before the batch: every program starts on a warm cache
        n_prefix = len(engine.tokenizer.encode(prefix))
        assert all(s.get_meta_info("answer")["cached_tokens"] >= n_prefix - 1 for s in states)
    native.shutdown()


# ---- select by prompt logprobs, on a server that has them ----------------------------------------
def _echo_server(echo: bool) -> tuple[LiveServer, list[dict[str, Any]]]:
    """A /v1 stand-in: every character is a token, whose logprob is -0.1 for vowels and -2 otherwise;
    `regex` answers the first alternative. With `echo=False` it refuses echo, as radixfair does."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    seen: list[dict[str, Any]] = []

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"data": [{"id": "fake"}]}

    @app.post("/v1/completions")
    async def completions(body: dict[str, Any]) -> Any:
        seen.append(body)
        if body.get("echo"):
            if not echo:
                return JSONResponse({"error": {"message": "echo is not supported"}}, status_code=400)
            prompts = body["prompt"]
            choices = [{"index": i, "text": p, "finish_reason": "length", "logprobs": {
                "tokens": list(p), "text_offset": list(range(len(p))),
                "token_logprobs": [None] + [-0.1 if c in "aeiou" else -2.0 for c in p[1:]]}}
                for i, p in enumerate(prompts)]
            return {"choices": choices, "usage": {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 0}}
        first = body["regex"][1:-1].split("|")[0].replace("\\", "")
        return {"choices": [{"index": 0, "text": first, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 1}}

    return LiveServer(app), seen


def test_select_scores_choices_by_prompt_logprobs_where_the_server_has_them() -> None:
    server, seen = _echo_server(echo=True)

    @sgl.function
    def pick(s: Any, method: ChoicesSamplingMethod) -> None:
        s += "Q: pick\nA:"
        s += sgl.select("x", choices=["xyz", "aei", "bob"], choices_method=method)

    try:
        backend = sgl.OpenAI(base_url=server.url + "/v1", is_chat_model=False)
        state = pick.run(method=sgl.token_length_normalized, backend=backend)
        meta = state.get_meta_info("x")
        # the choice whose own characters (tokens) have the highest mean logprob
        assert state["x"] == "aei" and meta["select_mode"] == "logprobs"
        assert meta["normalized_prompt_logprobs"] == pytest.approx([-2.0, -0.1, (-2 - 0.1 - 2) / 3])
        assert seen[-1]["prompt"] == ["Q: pick\nA:xyz", "Q: pick\nA:aei", "Q: pick\nA:bob"]
        assert seen[-1]["max_tokens"] == 0 and seen[-1]["echo"]
        assert pick.run(method=sgl.greedy_token_selection, backend=backend)["x"] == "aei"
        seen.clear()
        state = pick.run(method=sgl.unconditional_likelihood_normalized, backend=backend)
        assert state.error() is None and [b["prompt"] for b in seen][-1] == ["xyz", "aei", "bob"]
    finally:
        server.stop()
    server, seen = _echo_server(echo=False)
    try:
        backend = sgl.OpenAI(base_url=server.url + "/v1", is_chat_model=False)
        for _ in range(2):
            state = pick.run(method=sgl.token_length_normalized, backend=backend)
            assert state["x"] == "xyz" and state.get_meta_info("x")["select_mode"] == "constrained"
        assert [bool(b.get("echo")) for b in seen] == [True, False, False]  # asked once, then constrained
        assert seen[-1]["regex"] == "(xyz|aei|bob)"
        strict = sgl.OpenAI(base_url=server.url + "/v1", is_chat_model=False, select_mode="logprobs")
        err = pick.run(method=sgl.token_length_normalized, backend=strict).error()
        assert isinstance(err, BackendError) and err.status == 400 and "echo" in str(err)
    finally:
        server.stop()
