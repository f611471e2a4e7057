"""Structured outputs over HTTP: SGLang's native `regex` / `json_schema` / `ebnf`, OpenAI's
`response_format` through the openai client, and bad constraints as 400s with the server still up."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from fixtures.live_server import LiveServer

from radixfair.engine.engine import Engine
from radixfair.server import create_app

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"tag": {"enum": ["red", "blue", "gold"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                   "sub": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                           "additionalProperties": False}},
    "required": ["tag", "n", "sub"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[LiveServer]:
    with Engine(str(tiny_llama), dtype="float32", max_total_tokens=4096) as engine:
        srv = LiveServer(create_app(engine))
        yield srv
        srv.stop()


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture
def oai(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=30, max_retries=0)


def test_native_generate_with_each_constraint(http: httpx.Client) -> None:
    for sp, check in [
        ({"regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        ({"json_schema": json.dumps(SCHEMA)}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
        ({"json_schema": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
        ({"ebnf": 'root ::= "<" ("yes" | "no") ">"'}, lambda t: t in ("<yes>", "<no>")),
    ]:
        # SGLang's frontend sends the unset constraint fields as null
        params = {"regex": None, "json_schema": None, "ebnf": None, **sp, "temperature": 1.0, "max_new_tokens": 64}
        r = http.post("/generate", json={"text": ["Hello", "World"], "sampling_params": params})
        assert r.status_code == 200, r.text
        for out in r.json():
            assert check(out["text"]), out["text"]


def test_native_stream_of_a_constrained_request(http: httpx.Client) -> None:
    body = {"text": "Hi", "stream": True, "sampling_params": {"json_schema": SCHEMA, "temperature": 0}}
    with http.stream("POST", "/generate", json=body) as r:
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))  # cumulative, never rewritten
    jsonschema.validate(json.loads(texts[-1]), SCHEMA)
    assert chunks[-1]["meta_info"]["jump_forward_tokens"] > 0


def test_openai_response_format_round_trip(oai: openai.OpenAI) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "card", "schema": SCHEMA, "strict": True}}
    r = oai.chat.completions.create(model=None, messages=[{"role": "user", "content": "A card, please."}],  # type: ignore[arg-type]
                                    response_format=fmt, temperature=1.0, n=3, max_tokens=80)
    assert len(r.choices) == 3
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content or ""), SCHEMA)
    assert r.usage is not None and r.usage.completion_tokens >= 3 * len('{"tag":"red","n":0,"sub":{"ok":true}}') // 4
    r = oai.chat.completions.create(model=None, messages=[{"role": "user", "content": "JSON!"}],  # type: ignore[arg-type]
                                    response_format={"type": "json_object"}, temperature=0, max_tokens=60)
    text = r.choices[0].message.content or ""
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens mid-object: the text so far, and finish_reason length
        assert r.choices[0].finish_reason == "length" and text.startswith("{")
    # legacy completions, streamed, with SGLang's regex extension
    chunks = list(oai.completions.create(model=None, prompt="Number:", stream=True, max_tokens=10,  # type: ignore[arg-type]
                                         extra_body={"regex": "[1-9][0-9]{2}"}))
    assert re.fullmatch("[1-9][0-9]{2}", "".join(c.choices[0].text for c in chunks if c.choices))


BAD = [
    ("/generate", {"text": "x", "sampling_params": {"regex": "(ab"}}, "regex"),
    ("/generate", {"text": "x", "sampling_params": {"json_schema": "{not json"}}, "json_schema"),
    ("/generate", {"text": "x", "sampling_params": {"json_schema": {"type": "string", "format": "bogus"}}},
     "json_schema"),
    ("/generate", {"text": "x", "sampling_params": {"ebnf": "root ::= missing"}}, "ebnf"),
    ("/generate", {"text": "x", "sampling_params": {"regex": "[0-9]{40}", "max_new_tokens": 4}}, "regex"),
    ("/generate", {"text": "x", "sampling_params": {"regex": "a", "json_schema": "{}"}}, "regex"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
     "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format"),
    ("/v1/completions", {"prompt": "x", "regex": "(("}, "regex"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(BAD)])
def test_bad_constraints_are_400_and_the_server_stays_up(http: httpx.Client, path: str, body: dict[str, Any],
                                                         param: str) -> None:
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param + ":"), err
    assert http.get("/health_generate").status_code == 200
