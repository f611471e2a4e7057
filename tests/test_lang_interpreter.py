"""The language's interpreter, tracer, chat templates and choice methods, without a model: a fake
backend records what the interpreter asks for and answers at once (or when a test lets it)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

import radixfair as sgl
from radixfair.lang import Backend, BackendError, ChoicesDecision, ChoicesSamplingMethod
from radixfair.lang.chat_template import (
    ChatTemplate,
    JinjaChatTemplate,
    get_chat_template,
    model_chat_template,
)
from radixfair.lang.choices import (
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from radixfair.lang.interpreter import StreamExecutor
from radixfair.lang.ir import REGEX_INT, GenParams
from radixfair.lang.tracer import extract_prefix
from radixfair.tokenizer.chat_template import render_chat_template

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n'}}{% endfor %}")
# SmolLM2's: a default system prompt when the conversation does not start with one
SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are SmolLM<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + "
        "'\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}")
# Llama-3-like: a BOS before the first message
BOS_FIRST = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
             "{{ m['content'] }}<|eot_id|>{% endfor %}")


class FakeBackend(Backend):
    """Answers `gen` with `<N>` (N counts calls), `select` with the first choice; records calls.
    With `gate`, a generation waits for the gate; with `barrier`, generations wait for each other."""

    def __init__(self, template: ChatTemplate | None = None, gate: threading.Event | None = None,
                 barrier: threading.Barrier | None = None, fail_on: str | None = None) -> None:
        self.template = template or get_chat_template("default")
        self.gate, self.barrier, self.fail_on = gate, barrier, fail_on
        self.calls: list[tuple[str, str, Any]] = []
        self.lock = threading.Lock()
        self.count = 0

    def get_model_name(self) -> str:
        return "fake"

    def get_chat_template(self) -> ChatTemplate:
        return self.template

    def _next(self, s: StreamExecutor, params: GenParams) -> str:
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.barrier is not None:
            self.barrier.wait(10)
        if self.fail_on is not None and s.text_.endswith(self.fail_on):
            raise BackendError("POST /generate: HTTP 400: temperature: must be a number >= 0", 400)
        with self.lock:
            self.count += 1
            self.calls.append(("gen", s.text_, params))
            return f"<{self.count}>"

    def generate(self, s: StreamExecutor, params: GenParams) -> tuple[str, dict[str, Any]]:
        return self._next(s, params), {"prompt_tokens": len(s.text_)}

    def generate_stream(self, s: StreamExecutor, params: GenParams) -> Iterator[tuple[str, dict[str, Any]]]:
        text = self._next(s, params) * 3
        for i in range(0, len(text), 3):
            if i:
                time.sleep(0.05)  # paced like a model, so a reader sees the chunks one by one
            yield text[i:i + 3], {"completion_tokens": i}

    def select(self, s: StreamExecutor, choices: Sequence[str], temperature: float,
               choices_method: ChoicesSamplingMethod) -> ChoicesDecision:
        self.calls.append(("select", s.text_, list(choices)))
        return ChoicesDecision(choices[0], {"method": type(choices_method).__name__})

    def commit_lazy_operations(self, s: StreamExecutor) -> None:
        self.calls.append(("commit", s.text_, None))

    def cache_prefix(self, prefix: str) -> None:
        self.calls.append(("cache", prefix, None))

    def kinds(self) -> list[str]:
        return [c[0] for c in self.calls]


# ---- programs -------------------------------------------------------------------------------------
@sgl.function
def qa(s: Any, question: str) -> None:
    s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=8, stop="\n")


def test_run_returns_at_once_and_a_read_waits_for_its_variable() -> None:
    gate = threading.Event()
    backend = FakeBackend(gate=gate)
    state = qa.run(question="why?", backend=backend)  # returns while the generation is held
    assert "answer" not in state
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(state["answer"]))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive() and not got  # the read waits...
    gate.set()
    reader.join(5)
    assert got == ["<1>"]  # ...until the expression that sets it has run
    assert state.text() == "Q: why?\nA:<1>"
    params = backend.calls[0][2]
    assert params.max_new_tokens == 8 and params.stop == ("\n",) and params.temperature == 1.0


def test_run_defaults_and_gen_overrides() -> None:
    @sgl.function
    def two(s: Any) -> None:
        s += sgl.gen("a") + sgl.gen("b", max_tokens=3, temperature=0.5, stop=["x", "y"], regex="[0-9]+")

    backend = FakeBackend()
    two.run(backend=backend, max_new_tokens=7, temperature=0, stop="z", top_k=5).sync()
    a, b = backend.calls[0][2], backend.calls[1][2]
    assert (a.max_new_tokens, a.temperature, a.stop, a.top_k, a.regex) == (7, 0, ("z",), 5, None)
    assert (b.max_new_tokens, b.temperature, b.stop, b.top_k, b.regex) == (3, 0.5, ("x", "y"), 5, "[0-9]+")
    assert b.sampling_params()["regex"] == "[0-9]+" and "regex" not in a.sampling_params()


def test_dtype_becomes_sglangs_regex_and_stops() -> None:
    p = GenParams(stop=("END",), dtype=int).with_dtype_constraint()
    assert p.regex == REGEX_INT and p.stop == ("END", " ", "\n") and p.dtype is None
    assert GenParams(dtype=bool, regex="x").with_dtype_constraint().regex == "(True|False)"
    with pytest.raises(ValueError, match="dtype"):
        GenParams(dtype=list).with_dtype_constraint()
    backend = FakeBackend()

    @sgl.function
    def ints(s: Any) -> None:
        s += sgl.gen_int("n") + sgl.gen_string("t") + sgl.gen("j", json_schema={"type": "object"})

    ints.run(backend=backend).sync()
    assert [c[2].dtype for c in backend.calls] == [int, str, None]
    assert backend.calls[2][2].json_schema == '{"type": "object"}'
    with pytest.raises(ValueError, match="regular expression"):
        sgl.gen("bad", regex="[0-9")


def test_fork_commits_the_prefix_once_and_runs_branches_in_parallel() -> None:
    n = 3
    backend = FakeBackend(barrier=threading.Barrier(n))  # each generation waits until all n are in flight

    @sgl.function
    def branches(s: Any) -> Any:
        s += "shared prefix. "
        forks = s.fork(n)
        forks += lambda i: f"[{i}]" + sgl.gen("x")
        forks.join()
        with s.copy() as c:  # a fork of one commits nothing
            c += "copy"
        return forks

    state = branches.run(backend=backend)
    state.sync()
    assert state.error() is None
    assert backend.kinds().count("commit") == 1 and backend.calls[0] == ("commit", "shared prefix. ", None)
    assert sorted(state["x"]) == ["<1>", "<2>", "<3>"]
    # gathered in branch order, whichever finished first
    assert [state.ret_value[i].text().split("[")[1][0] for i in range(n)] == ["0", "1", "2"]
    assert all(f.text() == f"shared prefix. [{i}]{state['x'][i]}" for i, f in enumerate(state.ret_value))
    assert state.text() == "shared prefix. "  # the branches' text stays in the branches


def test_join_concatenate_and_append_and_group_forms() -> None:
    backend = FakeBackend()

    @sgl.function
    def cat(s: Any) -> None:
        s += "P:"
        forks = s.fork(2)
        forks += ["a", "b"]
        forks += sgl.gen("g")
        forks.join(mode="concate_and_append")
        s += "|end"

    state = cat.run(backend=backend)
    text = state.text()
    assert text.startswith("P:a<") and text.endswith("|end") and "b<" in text
    assert text.index("a<") < text.index("b<")
    with pytest.raises(ValueError, match="mode"):
        sgl.function(lambda s: s.fork(2).join("zip")).run(backend=backend)
    with pytest.raises(ValueError, match="3 expressions for 2 branches"):
        sgl.function(lambda s: s.fork(2).__iadd__(["a", "b", "c"])).run(backend=backend)


def test_var_scope_roles_and_messages() -> None:
    backend = FakeBackend(template=JinjaChatTemplate(CHATML))

    @sgl.function
    def tool_use(s: Any, q: str) -> None:
        s += sgl.system("Use tools.")
        with s.user():
            s += q
        with s.assistant(), s.var_scope("call"):
            s += "search(" + sgl.gen("query") + ")"
        s += sgl.user_begin() + "ok" + sgl.user_end()
        s += sgl.assistant_begin()
        s += sgl.select("verdict", choices=["done", "again"])
        s += sgl.assistant_end()

    state = tool_use.run(q="weather?", backend=backend)
    assert state["call"] == "search(<1>)" and state["verdict"] == "done"
    msgs = state.messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == "search(<1>)"
    # the text is what the template renders for the messages: every role took its prefix and suffix
    assert state.text() == render_chat_template(CHATML, msgs, add_generation_prompt=False, tools=None, variables={})


def test_errors_surface_in_error_and_on_access() -> None:
    backend = FakeBackend(fail_on="BAD:")

    @sgl.function
    def failing(s: Any) -> None:
        s += "BAD:" + sgl.gen("x")
        s += sgl.gen("y")  # never runs: the program failed

    state = failing.run(backend=backend)
    err = state.error()
    assert isinstance(err, BackendError) and err.status == 400 and "temperature" in str(err)
    with pytest.raises(BackendError, match="temperature"):
        state["x"]
    with pytest.raises(BackendError):
        state["y"]  # does not wait forever for a variable nothing will set
    assert backend.kinds() == []
    with pytest.raises(KeyError, match="nope"):
        qa.run(question="q", backend=FakeBackend())["nope"]


def test_bad_programs_fail_clearly() -> None:
    backend = FakeBackend()
    with pytest.raises(TypeError, match="first argument must be named 's'"):
        sgl.function(lambda state: None)
    with pytest.raises(TypeError, match="cannot append a int"):
        sgl.function(lambda s: s.__iadd__(5)).run(backend=backend)
    with pytest.raises(ValueError, match="None"):
        sgl.function(lambda s: s.__iadd__(None)).run(backend=backend)
    nested = sgl.function(lambda s: s.__iadd__(sgl.user_begin() + sgl.assistant_begin())).run(backend=backend)
    assert "cannot nest" in str(nested.error())
    unclosed = sgl.function(lambda s: s.__iadd__(sgl.user_end())).run(backend=backend)
    assert "user_end() without user_begin()" in str(unclosed.error())
    image = sgl.function(lambda s: s.__iadd__("look: " + sgl.image("cat.png"))).run(backend=backend)
    assert "takes text only" in str(image.error())
    with pytest.raises(ValueError, match="not supported"):
        sgl.function(lambda s: s.__iadd__(sgl.gen("x", n=2))).run(backend=backend)["x"]


def test_no_backend_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sgl.global_config, "default_backend", None)
    with pytest.raises(RuntimeError, match="set_default_backend"):
        qa.run(question="q")
    assert sgl.flush_cache() is False and sgl.get_server_info() is None
    backend = FakeBackend()
    sgl.set_default_backend(backend)
    assert qa.run(question="q")["answer"] == "<1>"


def test_streaming_chunks_concatenate_to_the_final_text() -> None:
    state = qa.run(question="stream", stream=True, backend=FakeBackend())
    chunks = list(state.text_iter())
    assert len(chunks) > 1 and "".join(chunks) == state.text() == "Q: stream\nA:<1><1><1>"
    state = qa.run(question="stream", stream=True, backend=FakeBackend())
    var_chunks = list(state.text_iter("answer"))
    assert len(var_chunks) > 1 and "".join(var_chunks) == state["answer"] == "<1><1><1>"

    async def collect() -> list[Any]:
        s = qa.run(question="a", stream=True, backend=FakeBackend())
        return [x async for x in s.text_async_iter("answer", return_meta_data=True)]

    pieces = asyncio.run(collect())
    assert "".join(p for p, _ in pieces) == "<1><1><1>" and all("completion_tokens" in m for _, m in pieces)
    # without stream=True there is one chunk, the final value
    assert list(qa.run(question="q", backend=FakeBackend()).text_iter()) == ["Q: q\nA:<1>"]


def test_state_variables_bind_and_run_batch(capfd: pytest.CaptureFixture[str]) -> None:
    backend = FakeBackend()

    @sgl.function
    def greet(s: Any, name: str, greeting: str = "Hello") -> None:
        s += greeting + " " + name + sgl.gen("rest")

    hi = greet.bind(greeting="Hi")
    state = hi.run(name="Ann", backend=backend)
    assert state.text() == "Hi Ann<1>"
    state["extra"] = 5
    assert "extra" in state and state.get_var("extra") == 5 and state.get_meta_info("rest") == {"prompt_tokens": 6}
    with pytest.raises(TypeError, match="no argument"):
        greet.bind(nobody=1)
    states = greet.run_batch([{"name": f"n{i}"} for i in range(20)], backend=backend, progress_bar=True,
                             num_threads=4)
    assert [s.text().split("<")[0] for s in states] == [f"Hello n{i}" for i in range(20)]
    assert "20/20" in capfd.readouterr().err
    assert [s.text() for s in greet.run_batch([["x"], ["y", "Yo"]], backend=backend)][1].startswith("Yo y<")
    with pytest.raises(TypeError, match=r"takes 1\.\.2"):
        greet.run_batch([["a", "b", "c"]], backend=backend)
    gen_states = greet.run_batch([{"name": "g"}] * 3, backend=backend, generator_style=True)
    assert [s.text()[:7] for s in gen_states] == ["Hello g"] * 3


def test_cache_and_run_batch_prefill_the_constant_prefix() -> None:
    template = JinjaChatTemplate(CHATML)

    @sgl.function
    def long_prompt(s: Any, question: str, style: str) -> None:
        s += sgl.system("You answer questions.")
        with s.user():
            s += "Examples: 1+1=2.\n"
            s += "Question: " + question
        s += sgl.assistant(sgl.gen("answer"))

    expected = "<|im_start|>system\nYou answer questions.<|im_end|>\n<|im_start|>user\nExamples: 1+1=2.\n"
    assert extract_prefix(long_prompt, template) == expected
    bound = long_prompt.bind(question="why")  # a bound argument is a constant
    assert extract_prefix(bound, template) == expected + "Question: why<|im_end|>\n<|im_start|>assistant\n"
    assert extract_prefix(sgl.function(lambda s, x: s.__iadd__(f"{x}")), template) == ""
    backend = FakeBackend(template=template)
    assert long_prompt.cache(backend=backend) == expected and backend.calls == [("cache", expected, None)]
    backend.calls.clear()
    long_prompt.run_batch([{"question": "a", "style": ""}, {"question": "b", "style": ""}], backend=backend)
    assert backend.calls[0] == ("cache", expected, None) and backend.kinds().count("cache") == 1


# ---- chat templates ---------------------------------------------------------------------------------
@pytest.mark.parametrize("source", [CHATML, SMOL, BOS_FIRST])
def test_model_template_renders_messages_as_the_template_does(source: str) -> None:
    variables = {"bos_token": "<s>"}
    tpl = model_chat_template(source, variables)
    msgs: list[dict[str, Any]] = []
    text = ""
    for role, content in [("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "")]:
        prefix, suffix = tpl.get_prefix_and_suffix(role, msgs)
        text += prefix + content + suffix
        msgs.append({"role": role, "content": content})
    assert text == render_chat_template(source, msgs, add_generation_prompt=False, tools=None, variables=variables)
    if source == SMOL:
        assert text.startswith("<|im_start|>system\nYou are SmolLM<|im_end|>\n<|im_start|>user\nHi")
    if source == BOS_FIRST:
        assert text.count("<s>") == 1


def test_templates_fall_back_and_names_are_checked() -> None:
    rejects_system = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no') }}{% endif %}" \
                     "[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    tpl = model_chat_template(rejects_system)
    assert tpl.get_prefix_and_suffix("user", []) == ("[user]", "")
    assert tpl.get_prefix_and_suffix("system", []) == ("SYSTEM:", "\n")  # SGLang's default template
    assert model_chat_template(None).get_prefix_and_suffix("user", []) == ("USER:", "\n")
    assert get_chat_template("chatml").get_prefix_and_suffix("user", []) == ("<|im_start|>user\n", "<|im_end|>\n")
    with pytest.raises(ValueError, match="unknown chat template"):
        get_chat_template("nope")


# ---- choice methods ---------------------------------------------------------------------------------
def _entries(*lps: float) -> list[list[Any]]:
    return [[lp, 100 + i, None] for i, lp in enumerate(lps)]


def test_choice_methods() -> None:
    choices = ["a", "ab", "c"]
    inputs = [_entries(-1.0), _entries(-1.0, -0.2), _entries(-0.5, -3.0)]
    normalized = [-1.0, -0.6, -1.75]
    kw: dict[str, Any] = dict(choices=choices, normalized_prompt_logprobs=normalized, input_token_logprobs=inputs,
                              output_token_logprobs=[[], [], []])
    assert token_length_normalized(**kw).decision == "ab"
    # greedy: token 0 picks "c" (-0.5 beats -1.0)
    assert greedy_token_selection(**kw).decision == "c"
    # greedy with a tie at token 0: "a" continues with its mean (-1.0) and loses to "ab"'s -0.2
    tie = dict(kw, input_token_logprobs=[_entries(-1.0), _entries(-1.0, -0.2), _entries(-2.0, 0.0)])
    assert greedy_token_selection(**tie).decision == "ab"
    # unconditional: "c" gains most over its unconditional likelihood
    uncond = [[[None, 100, None]], [[None, 100, None], [-0.1, 101, None]], [[None, 100, None], [-5.0, 101, None]]]
    d = unconditional_likelihood_normalized(**kw, unconditional_token_logprobs=uncond)
    assert d.decision == "c" and d.meta_info is not None
    assert d.meta_info["normalized_unconditional_prompt_logprobs"] == pytest.approx([-1.0, -0.55, 0.75])
    with pytest.raises(ValueError, match="unconditional"):
        unconditional_likelihood_normalized(**kw)
