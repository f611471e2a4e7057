"""Structured outputs on the tiny random model: regexes, JSON schemas and EBNF grammars enforced token
by token (random weights fight the mask: that is the point), jump-forward, retraction, the sampling
options that must keep working under a constraint, bad input, and the other grammar backends.

Every blocking call goes through `bounded()`, so a hung engine fails the test instead of the run.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from fixtures.helpers import bounded

from radixfair.engine.constrained.base import GrammarError, GrammarSpec
from radixfair.engine.constrained.cache import GrammarCache
from radixfair.engine.constrained.min_length import json_min_bytes, regex_min_chars
from radixfair.engine.engine import Engine
from radixfair.sched.batch import BatchMode, ScheduledBatch

TIMEOUT = 120.0
POOL = 8192
EOS = 2  # <|im_end|> in the tiny byte-level tokenizer

REGEXES = {
    "integer": r"(0|-?[1-9][0-9]{0,5})",
    "date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "ipv4": r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
    "enum": r"(apple|banana|cherry|kiwi)",
}

# nested objects, arrays, enums, required fields; keys and enum values avoid the tiny tokenizer's
# merges ("in", "he", " t", " a"), so the forced text has one tokenization (see the jump-forward test)
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "tag": {"enum": ["red", "blue", "gold"]},
        "ok": {"type": "boolean"},
        "pos": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                           "y": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["x", "y"],
            "additionalProperties": False,
        },
        "list": {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 1, "maxItems": 3},
        "note": {"type": "string", "maxLength": 5},
    },
    "required": ["id", "tag", "ok", "pos", "list"],
    "additionalProperties": False,
}

# a context-free grammar (GBNF, as SGLang's `ebnf` takes it) and a regex that accepts the same language
EBNF = 'root ::= "(" inner " " inner ")"\ninner ::= word | "[" word "," word "]"\nword ::= [a-z] [a-z]? [a-z]?'
EBNF_REGEX = r"\((?:[a-z]{1,3}|\[[a-z]{1,3},[a-z]{1,3}\]) (?:[a-z]{1,3}|\[[a-z]{1,3},[a-z]{1,3}\])\)"

_rng = random.Random(12)
PROMPTS = [[_rng.randrange(3, 260) for _ in range(n)] for n in (5, 9, 14, 20, 7, 11)]


def gen(engine: Engine, timeout: float = TIMEOUT, **kwargs: Any) -> Any:
    return bounded(engine.generate, timeout=timeout, **kwargs)


def make_engine(path: Path, **kwargs: Any) -> Engine:
    # RADIXFAIR_TEST_DEVICE=cuda runs them on a GPU (masks unpacked on the device)
    kwargs.setdefault("device", os.environ.get("RADIXFAIR_TEST_DEVICE", "cpu"))
    kwargs.setdefault("max_total_tokens", POOL)
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("debug_invariants", True)
    return Engine(str(path), **kwargs)


def assert_idle(engine: Engine) -> None:
    bounded(engine.wait_idle, 30.0)
    free, evictable, protected = engine.check_invariant()
    assert free + evictable + protected == engine.max_total_tokens and protected == 0
    assert engine.invariant_violations == 0


class PassCounter:
    """Counts the forward passes of each mode (wraps the runner, on the scheduler thread)."""

    def __init__(self, engine: Engine) -> None:
        self.counts = {BatchMode.PREFILL: 0, BatchMode.DECODE: 0}
        inner = engine.runner.run

        def run(batch: ScheduledBatch) -> Any:
            self.counts[batch.mode] += 1
            return inner(batch)

        engine.runner.run = run  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> Iterator[Engine]:
    with make_engine(tiny_llama) as e:
        yield e


@pytest.fixture(scope="module")
def engine_no_jf(tiny_llama: Path) -> Iterator[Engine]:
    with make_engine(tiny_llama, disable_regex_jump_forward=True) as e:
        yield e


# ---- outputs match their constraint ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(REGEXES))
def test_100_samples_match_the_regex(engine: Engine, name: str) -> None:
    regex = REGEXES[name]
    outs = gen(engine, input_ids=[PROMPTS[i % len(PROMPTS)] for i in range(100)],
               sampling_params={"regex": regex, "temperature": 1.0, "max_new_tokens": 40})
    for o in outs:
        assert re.fullmatch(regex, o["text"]), o["text"]
        assert o["meta_info"]["finish_reason"]["type"] == "stop"
    # temperature 1 explores: many different outputs (every value of the enum)
    assert len({o["text"] for o in outs}) >= (4 if name == "enum" else 30)
    assert_idle(engine)


def test_100_samples_validate_against_a_nested_schema(engine: Engine) -> None:
    outs = gen(engine, input_ids=[PROMPTS[i % len(PROMPTS)] for i in range(100)],
               sampling_params={"json_schema": json.dumps(SCHEMA), "temperature": 1.0, "max_new_tokens": 200})
    for o in outs:
        assert o["meta_info"]["finish_reason"]["type"] == "stop", o
        jsonschema.validate(json.loads(o["text"]), SCHEMA)
        assert o["meta_info"]["jump_forward_tokens"] > 0
    assert len({o["text"] for o in outs}) > 50
    assert_idle(engine)


def test_100_samples_parse_with_an_ebnf_grammar(engine: Engine) -> None:
    outs = gen(engine, input_ids=[PROMPTS[i % len(PROMPTS)] for i in range(100)],
               sampling_params={"ebnf": EBNF, "temperature": 1.0, "max_new_tokens": 40})
    for o in outs:
        assert re.fullmatch(EBNF_REGEX, o["text"]), o["text"]
    assert any("[" in o["text"] for o in outs) and any("[" not in o["text"] for o in outs)
    assert_idle(engine)


def test_json_schema_as_a_string_or_an_object_and_n_samples(engine: Engine) -> None:
    small = {"type": "object", "properties": {"tag": {"enum": ["red", "blue"]}}, "required": ["tag"],
             "additionalProperties": False}
    as_str = gen(engine, input_ids=PROMPTS[0], sampling_params={"json_schema": json.dumps(small), "temperature": 0})
    as_obj = gen(engine, input_ids=PROMPTS[0], sampling_params={"json_schema": small, "temperature": 0})
    assert as_str["text"] == as_obj["text"] and json.loads(as_str["text"])["tag"] in ("red", "blue")
    many = gen(engine, input_ids=PROMPTS[1], sampling_params={"regex": REGEXES["date"], "n": 5, "temperature": 1.0})
    assert len(many) == 5 and all(re.fullmatch(REGEXES["date"], o["text"]) for o in many)


# ---- the mask changes nothing it need not change --------------------------------------------------


def _ascii_prefix(engine: Engine, ids: list[int]) -> list[int]:
    """The leading tokens that decode to printable ASCII."""
    out = []
    for t in ids:
        s = engine.tokenizer.decode([t])
        if not s or not all(" " <= c <= "~" for c in s):
            break
        out.append(t)
    return out


def literal_regex(text: str) -> str:
    """A regex matching exactly `text` (every non-alphanumeric character as a hex escape, which
    Python's and the grammar libraries' regex syntaxes read alike)."""
    return "".join(c if c.isalnum() else f"\\x{ord(c):02x}" for c in text)


def test_greedy_constrained_equals_unconstrained_where_the_mask_allows_the_argmax(
        engine_no_jf: Engine) -> None:
    eng = engine_no_jf
    prompts = [[_rng.randrange(3, 260) for _ in range(12)] for _ in range(100)]
    free = gen(eng, input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 8, "ignore_eos": True})
    checked = 0
    for p, o in zip(prompts, free, strict=True):
        prefix = _ascii_prefix(eng, o["output_ids"])
        if len(prefix) < 2:
            continue
        literal = eng.tokenizer.decode(prefix)
        # a regex for exactly the text the model wrote: the argmax is allowed at every step
        c = gen(eng, input_ids=p, sampling_params={"temperature": 0, "max_new_tokens": 8,
                                                  "regex": re.escape(literal).replace("\\ ", " ")})
        assert c["output_ids"] == prefix and c["text"] == literal
        assert c["meta_info"]["finish_reason"]["type"] == "stop"
        checked += 1
    assert checked >= 3, "too few prompts whose greedy output starts in ASCII"
    # constrained and unconstrained rows in one batch: the unconstrained ones are untouched
    mixed = gen(eng, input_ids=prompts[:4],
                sampling_params=[{"temperature": 0, "max_new_tokens": 8, "ignore_eos": True},
                                 {"temperature": 0, "max_new_tokens": 8, "regex": "[a-z]{8}"},
                                 {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True},
                                 {"temperature": 0, "max_new_tokens": 8, "regex": "[0-9]{8}"}])
    assert mixed[0]["output_ids"] == free[0]["output_ids"] and mixed[2]["output_ids"] == free[2]["output_ids"]
    assert re.fullmatch("[a-z]{8}", mixed[1]["text"]) and re.fullmatch("[0-9]{8}", mixed[3]["text"])


def test_masks_allow_a_stop_token_only_where_the_grammar_accepts(engine: Engine) -> None:
    from radixfair.sampling_params import SamplingParams
    from radixfair.sched.request import Req

    gm = engine.grammar
    grammar = gm.check(SamplingParams(regex="[0-9]{2,3}"))
    assert grammar is not None
    digit = engine.tokenizer.encode("7")[0]

    def allowed(req: Req) -> set[int]:
        mask = gm.masks([req])
        assert mask is not None
        return set(np.flatnonzero(mask.allowed[0].numpy()).tolist())

    for ignore_eos in (False, True):
        r = Req(origin_input_ids=[5], sampling_params=SamplingParams(regex="[0-9]{2,3}", ignore_eos=ignore_eos))
        r.constraint = gm.constraint(grammar, return_logprob=False)
        stops = set(engine.eos_token_ids)
        a0 = allowed(r)
        assert digit in a0 and not a0 & stops  # nothing yet: must write digits
        for _ in range(2):
            assert r.constraint.accept(digit)
        a2 = allowed(r)
        assert digit in a2
        # two digits complete the regex: every stop token may end it, unless the request ignores EOS
        assert (a2 & stops == set()) if ignore_eos else (stops <= a2)
        assert r.constraint.accept(digit)
        assert allowed(r) == stops  # three: only a stop token is left, even with ignore_eos
        assert r.constraint.is_terminated()


def test_a_row_is_never_left_without_a_token(engine: Engine) -> None:
    from radixfair.engine.constrained.base import allocate_bitmask
    from radixfair.sampling_params import SamplingParams
    from radixfair.sched.request import Req

    gm = engine.grammar
    reqs = [Req(origin_input_ids=[5], sampling_params=SamplingParams()) for _ in range(2)]
    bitmask = allocate_bitmask(2, gm.vocab_size)  # a matcher in an error state allows nothing
    bitmask[1, 0] = 1 << 9  # token 9 only
    gm._fix_stop_tokens(bitmask, reqs)
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
    assert set(np.flatnonzero(bits[0]).tolist()) == set(engine.eos_token_ids)  # the request can end
    assert np.flatnonzero(bits[1]).tolist() == [9]


def test_min_new_tokens_stop_strings_penalties_and_logprobs_under_a_constraint(
        engine: Engine, engine_no_jf: Engine) -> None:
    # min_new_tokens holds EOS back while the grammar can go on
    o = gen(engine, input_ids=PROMPTS[2], sampling_params={"regex": "[0-9]+", "temperature": 0,
                                                          "min_new_tokens": 6, "max_new_tokens": 10})
    assert re.fullmatch("[0-9]+", o["text"]) and len(o["output_ids"]) >= 6
    # ...but the grammar wins where it allows nothing but a banned stop token: the row keeps it
    a = engine_no_jf.tokenizer.encode("a")[0]
    o = gen(engine_no_jf, input_ids=PROMPTS[2], sampling_params={"regex": "a", "temperature": 0, "min_new_tokens": 3,
                                                                "max_new_tokens": 5, "stop_token_ids": [a]})
    assert o["output_ids"] == [a] and o["meta_info"]["finish_reason"]["type"] == "stop"
    # a stop string cuts a constrained output like any other
    o = gen(engine, input_ids=PROMPTS[3], sampling_params={"regex": "[ab]{12}", "temperature": 1.0, "seed": 3,
                                                          "stop": "b", "max_new_tokens": 20})
    assert "b" not in o["text"] and re.fullmatch("a*", o["text"])
    assert o["meta_info"]["finish_reason"] == {"type": "stop", "matched": "b"}
    # penalties reshape the distribution inside the mask
    for sp in ({"repetition_penalty": 1.5}, {"frequency_penalty": 1.5, "presence_penalty": 1.0}):
        outs = gen(engine, input_ids=PROMPTS[:3], sampling_params={"regex": REGEXES["ipv4"], "temperature": 0.8, **sp})
        assert all(re.fullmatch(REGEXES["ipv4"], x["text"]) for x in outs)
    # logprobs: every token sampled (no jump-forward), each with the model's own logprob
    o = gen(engine, input_ids=PROMPTS[4], return_logprob=True, top_logprobs_num=2,
            sampling_params={"json_schema": SCHEMA, "temperature": 0, "max_new_tokens": 200})
    jsonschema.validate(json.loads(o["text"]), SCHEMA)
    lps = o["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in lps] == o["output_ids"] and all(lp <= 0 for lp, _, _ in lps)
    assert "jump_forward_tokens" not in o["meta_info"]


def test_max_new_tokens_mid_structure_ends_with_length(engine: Engine) -> None:
    o = gen(engine, input_ids=PROMPTS[0], sampling_params={"json_schema": SCHEMA, "temperature": 0,
                                                          "max_new_tokens": 20})
    assert o["meta_info"]["finish_reason"] == {"type": "length", "length": 20}
    assert len(o["output_ids"]) == 20 and o["text"].startswith('{"id":')


# ---- jump-forward -------------------------------------------------------------------------------------


def test_jump_forward_output_equals_the_output_without_it(engine: Engine, engine_no_jf: Engine) -> None:
    params = {"json_schema": SCHEMA, "temperature": 0, "max_new_tokens": 200}
    jf_passes, plain_passes = PassCounter(engine), PassCounter(engine_no_jf)
    with_jf = gen(engine, input_ids=PROMPTS, sampling_params=params)
    without = gen(engine_no_jf, input_ids=PROMPTS, sampling_params=params)
    for a, b in zip(with_jf, without, strict=True):
        assert a["text"] == b["text"] and a["output_ids"] == b["output_ids"]
        jsonschema.validate(json.loads(a["text"]), SCHEMA)
        assert a["meta_info"]["completion_tokens"] == b["meta_info"]["completion_tokens"]
        assert a["meta_info"]["jump_forward_tokens"] > 0 and "jump_forward_tokens" not in b["meta_info"]
    # the forced tokens were computed in extend passes, not one decode step each
    assert jf_passes.counts[BatchMode.DECODE] < plain_passes.counts[BatchMode.DECODE] / 2
    assert_idle(engine)
    assert_idle(engine_no_jf)


def test_an_output_the_grammar_forces_whole_needs_no_sample(engine: Engine, engine_no_jf: Engine) -> None:
    params = {"regex": "hello world", "temperature": 1.0}
    forced = gen(engine, input_ids=PROMPTS[1], sampling_params=params)
    sampled = gen(engine_no_jf, input_ids=PROMPTS[1], sampling_params=params)
    assert forced["text"] == sampled["text"] == "hello world"
    assert forced["meta_info"]["jump_forward_tokens"] == forced["meta_info"]["completion_tokens"]
    assert forced["meta_info"]["finish_reason"]["type"] == "stop"
    assert_idle(engine)


def test_jump_forward_tokens_enter_the_radix_tree(engine: Engine) -> None:
    engine.flush_cache()
    prompt = PROMPTS[5]
    o = gen(engine, input_ids=prompt, sampling_params={"json_schema": SCHEMA, "temperature": 0, "max_new_tokens": 200})
    # the output, forced tokens included, is cached: a prompt repeating it hits all but the few last
    # tokens (after the last sampled one the grammar forced the closing `]}` and ended: never computed)
    again = gen(engine, input_ids=prompt + o["output_ids"], sampling_params={"max_new_tokens": 1})
    assert o["meta_info"]["jump_forward_tokens"] > 20
    assert again["meta_info"]["cached_tokens"] >= len(prompt) + len(o["output_ids"]) - 4


def test_retraction_mid_structure_resumes_the_grammar(tiny_llama: Path, engine: Engine) -> None:
    prompts = [[_rng.randrange(3, 260) for _ in range(30)] for _ in range(8)]
    params = {"json_schema": SCHEMA, "temperature": 0, "max_new_tokens": 120}
    want = gen(engine, input_ids=prompts, sampling_params=params)
    for jump_forward in (True, False):
        small = make_engine(tiny_llama, max_total_tokens=260, disable_regex_jump_forward=not jump_forward)
        try:
            got = gen(small, input_ids=prompts, sampling_params=params)
            assert small.get_stats().retractions > 0
            assert [g["text"] for g in got] == [w["text"] for w in want]
            for g in got:
                jsonschema.validate(json.loads(g["text"]), SCHEMA)
            assert_idle(small)
        finally:
            small.shutdown()


# ---- bad input ----------------------------------------------------------------------------------


BAD = [
    ({"regex": "(ab"}, "regex"),
    ({"regex": "[0-9]{40}", "max_new_tokens": 4}, "regex"),  # needs >= 10 tokens of at most 4 bytes
    ({"json_schema": "{not json"}, "json_schema"),
    ({"json_schema": {"type": "frobnicate"}}, "json_schema"),
    ({"json_schema": {"type": "string", "format": "no-such-format"}}, "json_schema"),  # unsupported feature
    ({"json_schema": SCHEMA, "max_new_tokens": 5}, "json_schema"),
    ({"ebnf": "root ::= undefined_rule"}, "ebnf"),
    ({"regex": "a", "ebnf": 'root ::= "a"'}, "regex"),
]


@pytest.mark.parametrize(("params", "field"), BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_constraints_are_refused_before_queueing(engine: Engine, params: dict[str, Any], field: str) -> None:
    before = engine.get_stats().input_tokens
    with pytest.raises(ValueError, match=f"^{field}: "):
        gen(engine, input_ids=PROMPTS[0], sampling_params=params)
    assert engine.get_stats().input_tokens == before  # nothing was queued


def test_the_length_bound_is_the_shortest_output() -> None:
    assert regex_min_chars("[0-9]{4}-(ab|c)?x+") == 6
    assert regex_min_chars("(?<n>x)") == 0  # not Python's syntax: no bound
    shortest = {
        json.dumps(SCHEMA): '{"id":0,"tag":"red","ok":true,"pos":{"x":0,"y":0},"list":[""]}',
        json.dumps({"$defs": {"p": {"type": "object", "properties": {"a": {"const": 10}}, "required": ["a"]}},
                    "type": "array", "items": {"$ref": "#/$defs/p"}, "minItems": 2}): '[{"a":10},{"a":10}]',
        json.dumps({"anyOf": [{"type": "string", "minLength": 3}, {"type": "integer", "minimum": 100}]}): "100",
        json.dumps({"type": "object", "required": ["s", "b"],
                    "properties": {"s": {"type": "string", "pattern": "^[a-z]{4}$"}, "b": {"type": "null"}}}):
            '{"s":"abcd","b":null}',
    }
    for text, want in shortest.items():
        schema = json.loads(text)
        assert json_min_bytes(schema, schema, 0) == len(want), text


def test_grammar_backend_none_refuses_constraints(tiny_llama: Path) -> None:
    with make_engine(tiny_llama, grammar_backend="none") as e:
        with pytest.raises(ValueError, match="regex: structured outputs are off"):
            gen(e, input_ids=PROMPTS[0], sampling_params={"regex": "a"})
        assert gen(e, input_ids=PROMPTS[0], sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


def test_compile_cache_compiles_a_repeated_grammar_once_and_bounds_the_time() -> None:
    calls: list[GrammarSpec] = []
    release = threading.Event()

    def compile_fn(spec: GrammarSpec) -> Any:
        calls.append(spec)
        if spec.text == "slow":
            release.wait(10)
        if spec.text == "bad":
            raise RuntimeError("the library says no")
        return object()

    cache = GrammarCache(compile_fn, capacity=2, timeout_s=0.2)
    try:
        a = cache.get(GrammarSpec("regex", "a"))
        assert cache.get(GrammarSpec("regex", "a")) is a and len(calls) == 1 and cache.hits == 1
        with pytest.raises(GrammarError, match=r"^regex: the library says no"):
            cache.get(GrammarSpec("regex", "bad"))
        with pytest.raises(GrammarError, match=r"^json_schema: compiling it took longer than 0\.2 s"):
            cache.get(GrammarSpec("json_schema", "slow"))
        release.set()
        cache.get(GrammarSpec("regex", "b"))  # capacity 2: "a" is the least recently used, evicted
        cache.get(GrammarSpec("regex", "a"))
        assert [c.text for c in calls].count("a") == 2 and len(cache) == 2
    finally:
        release.set()
        cache.shutdown()


def test_a_schema_that_compiles_too_slowly_is_refused(tiny_llama: Path) -> None:
    with make_engine(tiny_llama, grammar_compile_timeout=0.3) as e:
        assert e.grammar.cache is not None
        compile_fn = e.grammar.cache._compile_fn
        e.grammar.cache._compile_fn = lambda spec: time.sleep(1.0) or compile_fn(spec)
        with pytest.raises(ValueError, match=r"^json_schema: compiling it took longer than 0.3 s"):
            gen(e, input_ids=PROMPTS[0], sampling_params={"json_schema": SCHEMA})
        assert gen(e, input_ids=PROMPTS[0], sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


# ---- the other grammar backends ---------------------------------------------------------------------


OTHER_SCHEMA: dict[str, Any] = {  # without numeric bounds, which outlines-core does not enforce
    "type": "object",
    "properties": {"tag": {"enum": ["red", "blue", "gold"]}, "ok": {"type": "boolean"},
                   "name": {"type": "string", "maxLength": 4}},
    "required": ["tag", "ok", "name"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("backend", ["xgrammar", "outlines"])
def test_other_backends_enforce_regexes_and_schemas(tiny_llama: Path, backend: str) -> None:
    pytest.importorskip({"xgrammar": "xgrammar", "outlines": "outlines_core"}[backend])
    with make_engine(tiny_llama, grammar_backend=backend) as e:
        outs = gen(e, input_ids=[PROMPTS[i % 6] for i in range(30)],
                   sampling_params={"regex": REGEXES["date"], "temperature": 1.0, "max_new_tokens": 20})
        assert all(re.fullmatch(REGEXES["date"], o["text"]) for o in outs)
        outs = gen(e, input_ids=[PROMPTS[i % 6] for i in range(30)],
                   sampling_params={"json_schema": OTHER_SCHEMA, "temperature": 1.0, "max_new_tokens": 80})
        for o in outs:
            # xgrammar's JSON strings admit raw control characters (U+0000-U+001F other than \r \n),
            # which strict JSON forbids (README, "Structured outputs")
            jsonschema.validate(json.loads(o["text"], strict=backend != "xgrammar"), OTHER_SCHEMA)
        assert sum(o["meta_info"].get("jump_forward_tokens", 0) for o in outs) > 0
        with pytest.raises(ValueError, match=r"^regex: "):
            gen(e, input_ids=PROMPTS[0], sampling_params={"regex": "(ab"})
        assert_idle(e)
