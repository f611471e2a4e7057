"""HTTP server: native and OpenAI APIs against a live uvicorn server over the tiny model."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fixtures.live_server import LiveServer

from radixfair.engine.engine import Engine
from radixfair.io_struct import EngineRequest, TokenizedRequest
from radixfair.server import ServerClient, create_app

KEYS = {"sk-alice": ServerClient("alice", 2.0), "sk-bob": ServerClient("bob")}
GREEDY = {"max_new_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> Iterator[Engine]:
    with Engine(str(tiny_llama), dtype="float32", max_total_tokens=4096) as e:
        yield e


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[LiveServer]:
    srv = LiveServer(create_app(engine))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def auth_server(engine: Engine) -> Iterator[LiveServer]:
    srv = LiveServer(create_app(engine, KEYS))
    yield srv
    srv.stop()


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture
def oai(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=30, max_retries=0)


def sse_events(lines: Iterator[str]) -> list[Any]:
    """Parse an SSE body, checking its framing: only `data:` lines, ending with [DONE]."""
    events: list[Any] = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        if payload == "[DONE]":
            events.append(payload)
            break
        events.append(json.loads(payload))
    assert events and events[-1] == "[DONE]"
    return events[:-1]


def assert_clean(engine: Engine) -> None:
    engine.wait_idle(timeout=20)
    _free, _evictable, protected = engine.check_invariant()
    assert protected == 0


# ---- native API ---------------------------------------------------------------------------------------
def test_generate_single_matches_engine(http: httpx.Client, engine: Engine) -> None:
    r = http.post("/generate", json={"text": "Hello world", "sampling_params": GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"text", "output_ids", "meta_info"}
    direct = engine.generate("Hello world", GREEDY)
    assert body["output_ids"] == direct["output_ids"] and body["text"] == direct["text"]
    meta = body["meta_info"]
    assert meta["completion_tokens"] == len(body["output_ids"]) and meta["prompt_tokens"] > 0
    assert meta["finish_reason"]["type"] in ("stop", "length")


def test_generate_batch_input_ids_and_logprobs(http: httpx.Client) -> None:
    r = http.post("/generate", json={"text": ["a b", "c d e"], "sampling_params": GREEDY})
    assert r.status_code == 200 and isinstance(r.json(), list) and len(r.json()) == 2
    r = http.post("/generate", json={"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3},
                                     "return_logprob": True, "top_logprobs_num": 2, "rid": "my-rid"})
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    assert meta["id"] == "my-rid"
    assert len(meta["output_token_logprobs"]) == meta["completion_tokens"]
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])
    r = http.post("/generate", json={"input_ids": [[5, 6], [7, 8]], "sampling_params": {"max_new_tokens": 0}})
    assert r.status_code == 200 and [x["output_ids"] for x in r.json()] == [[], []]  # prefill-only


def test_generate_stream_framing(http: httpx.Client) -> None:
    params = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    with http.stream("POST", "/generate", json={"text": "stream me", "sampling_params": params, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    assert raw.endswith("data: [DONE]\n\n") and "\n\n\n" not in raw
    events = sse_events(iter(raw.split("\n")))
    assert len(events) == 6
    texts = [e["text"] for e in events]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))  # cumulative
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(set(e) == {"text", "output_ids", "meta_info"} for e in events)


def test_info_endpoints(http: httpx.Client, engine: Engine) -> None:
    assert http.get("/health").status_code == 200
    assert http.get("/health_generate").status_code == 200
    name = engine.model_names.served
    assert http.get("/get_model_info").json() == {
        "model_path": name, "tokenizer_path": name, "served_model_name": name, "is_generation": True,
        "chat_template": engine.tokenizer.chat_template, "special_tokens": engine.tokenizer.special_token_strings()}
    info = http.get("/get_server_info").json()
    assert info["max_total_tokens"] == 4096 and info["schedule_policy"] == engine.args.schedule_policy
    load = http.get("/get_load").json()
    assert load["max_total_tokens"] == 4096 and load["num_reqs"] >= 0
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == name
    r = http.post("/abort_request", json={"rid": "nobody"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "rid"
    engine.wait_idle(timeout=20)
    r = http.post("/flush_cache")
    assert r.status_code == 200, r.text
    assert engine.get_stats().tree_tokens == 0


def test_flush_cache_refused_while_busy(http: httpx.Client, engine: Engine) -> None:
    params = {"max_new_tokens": 1500, "ignore_eos": True, "temperature": 0}
    with http.stream("POST", "/generate", json={"text": "busy", "sampling_params": params, "stream": True}) as r:
        # keep the line iterator referenced: closing it closes the response, i.e. disconnects
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        assert first.startswith("data: ")
        busy = http.post("/flush_cache")
        assert engine.get_stats().running == 1, "the request finished too soon for this test"
        assert busy.status_code == 400 and "flush" in busy.json()["error"]["message"]
    assert_clean(engine)


# ---- OpenAI API --------------------------------------------------------------------------------------
def test_openai_chat(oai: openai.OpenAI, engine: Engine) -> None:
    msgs = [{"role": "user", "content": "Hi there"}]
    c = oai.chat.completions.create(model=engine.model_names.served, messages=msgs, max_tokens=5, temperature=0)  # type: ignore[arg-type]
    text = engine.tokenizer.apply_chat_template(msgs)
    direct = engine.generate(text, {"max_new_tokens": 5, "temperature": 0})
    assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == direct["text"]
    assert c.choices[0].finish_reason == direct["meta_info"]["finish_reason"]["type"]
    assert c.usage is not None and c.usage.completion_tokens == direct["meta_info"]["completion_tokens"]
    assert c.usage.prompt_tokens == direct["meta_info"]["prompt_tokens"]
    # the second identical prompt is served from the radix cache
    assert c.usage.prompt_tokens_details is not None and c.usage.prompt_tokens_details.cached_tokens is not None


def test_openai_chat_stream_n_and_logprobs(oai: openai.OpenAI, engine: Engine) -> None:
    stream = oai.chat.completions.create(
        model=engine.model_names.served, messages=[{"role": "user", "content": "count"}], max_completion_tokens=4,
        temperature=0.8, seed=1, n=2, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    texts = {0: "", 1: ""}
    finish: dict[int, str | None] = {}
    usage = None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert finish == {0: "length", 1: "length"}
    assert usage is not None and usage.completion_tokens == 8
    c = oai.chat.completions.create(model=engine.model_names.served, messages=[{"role": "user", "content": "lp"}], max_tokens=3,
                                    temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == c.usage.completion_tokens  # type: ignore[union-attr]
    assert all(len(t.top_logprobs) == 2 for t in content)


def test_openai_completions(oai: openai.OpenAI, engine: Engine) -> None:
    c = oai.completions.create(model=engine.model_names.served, prompt="The", max_tokens=4, temperature=0, n=3, seed=3, logprobs=1)
    assert c.object == "text_completion" and [ch.index for ch in c.choices] == [0, 1, 2]
    assert c.usage is not None and c.usage.completion_tokens == sum(
        len(ch.logprobs.tokens or []) for ch in c.choices)  # type: ignore[union-attr]
    assert c.choices[0].text == c.choices[1].text  # greedy: the same sample n times
    s = oai.completions.create(model=engine.model_names.served, prompt=[[5, 6, 7]], max_tokens=3, temperature=0, stream=True,
                               extra_body={"ignore_eos": True})
    chunks = list(s)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(ch.object == "text_completion" for ch in chunks)


def test_openai_stop(oai: openai.OpenAI, engine: Engine) -> None:
    c = oai.completions.create(model=engine.model_names.served, prompt="abc", max_tokens=12, temperature=0)
    full = c.choices[0].text
    if len(full) >= 3:
        stop = full[1:3]
        c2 = oai.completions.create(model=engine.model_names.served, prompt="abc", max_tokens=12, temperature=0, stop=[stop])
        assert c2.choices[0].finish_reason == "stop" and stop not in c2.choices[0].text


# ---- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 2}, "top_p"),
    ("/v1/completions", {"prompt": "", "max_tokens": 2}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 2, "bogus": 1}}, None),
    ("/generate", {"text": "x", "sampling_params": {"top_p": 2}}, "top_p"),
    ("/generate", {"text": "", "sampling_params": {"max_new_tokens": 2}}, None),
    ("/generate", {"input_ids": [10**9]}, None),
    ("/generate", {"sampling_params": {}}, None),
    ("/generate", {"text": "x", "top_logprobs_num": 99}, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}, "max_tokens"),
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 10**9}}, "max_new_tokens"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": ["ok", 5]}, "stop"),
    ("/generate", {"text": "x", "sampling_params": {"stop": 5}}, "stop"),
    ("/generate", {"text": "x", "sampling_params": {"stop": ["ok", None]}}, "stop"),
    ("/v1/completions", {"prompt": "x", "n": 1000}, "n"),
    ("/generate", {"text": "x", "sampling_params": {"n": 1000}}, "n"),
])
def test_bad_input_is_4xx(http: httpx.Client, path: str, body: dict[str, Any], param: str | None) -> None:
    r = http.post(path, json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param and param in err["message"]
    if "bogus" in json.dumps(body):
        assert "bogus" in err["message"]
    assert http.get("/health_generate").status_code == 200  # still serving


def test_malformed_json(http: httpx.Client) -> None:
    for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
        r = http.post(path, content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = http.post(path, json=[1, 2])
        assert 400 <= r.status_code < 500
    assert http.get("/health").status_code == 200


# ---- auth and client identity --------------------------------------------------------------------------
def test_auth(auth_server: LiveServer, engine: Engine) -> None:
    with httpx.Client(base_url=auth_server.url, timeout=30) as c:
        assert c.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-alice"}):
            for path in ("/get_model_info", "/v1/models", "/health_generate"):
                r = c.get(path, headers=headers)
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
                assert "sk-" not in r.text  # never echo keys
        r = c.post("/generate", json={"text": "x", "sampling_params": GREEDY})
        assert r.status_code == 401
        ok = {"Authorization": "Bearer sk-bob"}
        assert c.get("/get_model_info", headers=ok).status_code == 200
        assert c.post("/generate", json={"text": "x", "sampling_params": GREEDY}, headers=ok).status_code == 200
    client = openai.OpenAI(base_url=auth_server.url + "/v1", api_key="sk-alice", max_retries=0, timeout=30)
    assert client.completions.create(model=engine.model_names.served, prompt="hi", max_tokens=2).choices
    bad = openai.OpenAI(base_url=auth_server.url + "/v1", api_key="sk-nope", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=engine.model_names.served, prompt="hi", max_tokens=2)


def _clients_seen(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    orig = engine.tokenize

    def spy(req: EngineRequest) -> TokenizedRequest:
        seen.append(req.client_id)
        return orig(req)

    monkeypatch.setattr(engine, "tokenize", spy)
    return seen


def test_client_identity(server: LiveServer, auth_server: LiveServer, engine: Engine,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _clients_seen(engine, monkeypatch)
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        c.post("/v1/chat/completions", json=chat)
        c.post("/v1/chat/completions", json={**chat, "user": "carol"})
        c.post("/v1/chat/completions", json={**chat, "user": "carol"}, headers={"X-Client-Id": "dave"})
        c.post("/generate", json={"text": "x", "sampling_params": GREEDY},
               headers={"x-gateway-inference-fairness-id": "erin"})
    with httpx.Client(base_url=auth_server.url, timeout=30) as c:
        # the key's client wins over anything the caller claims
        c.post("/v1/chat/completions", json={**chat, "user": "carol"},
               headers={"X-Client-Id": "dave", "Authorization": "Bearer sk-alice"})
    assert seen == ["default", "carol", "dave", "erin", "alice"]


# ---- disconnects --------------------------------------------------------------------------------------------
def test_cancelled_streams_release_kv(server: LiveServer, engine: Engine) -> None:
    """50 native streams, open at once, each dropped after its second chunk, and an OpenAI stream
    (n=2) dropped after its first: every KV slot comes back."""
    params = {"max_new_tokens": 1000, "ignore_eos": True, "temperature": 0}
    decoded_before = engine.get_stats().decode_tokens

    async def drop_after(c: httpx.AsyncClient, i: int) -> None:
        async with c.stream("POST", "/generate", json={"text": f"long {i}", "sampling_params": params,
                                                       "stream": True}) as r:
            got = 0
            async for line in r.aiter_lines():
                got += line.startswith("data: ")
                if got >= 2:
                    break  # leaving the block closes the connection mid-stream

    async def drop_all() -> None:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as c:
            await asyncio.wait_for(asyncio.gather(*(drop_after(c, i) for i in range(50))), 60)

    asyncio.run(drop_all())
    chat = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 1000, "stream": True,
            "ignore_eos": True, "n": 2}
    with httpx.Client(base_url=server.url, timeout=30) as c, c.stream("POST", "/v1/chat/completions",
                                                                     json=chat) as r:
        next(line for line in r.iter_lines() if line)
    deadline = time.monotonic() + 20
    while engine.get_stats().running + engine.get_stats().waiting and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = engine.get_stats()
    assert stats.running == stats.waiting == 0, "disconnected streams were not aborted"
    assert stats.decode_tokens - decoded_before < 26000  # 52 1000-token requests were cut short
    engine.wait_idle(timeout=20)
    free, evictable, protected = engine.check_invariant()
    assert protected == 0 and free + evictable == engine.max_total_tokens


def test_curl_style_form_content_type(http: httpx.Client) -> None:
    # `curl -d '{...}'` labels the body as a form; it is still read as JSON
    r = http.post("/generate", content=b'{"text": "x", "sampling_params": {"max_new_tokens": 1}}',
                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 1


# ---- command line --------------------------------------------------------------------------------------------
def test_api_keys_file(tmp_path: Path) -> None:
    from radixfair.cli import build_parser, load_api_keys, server_args

    f = tmp_path / "keys.json"
    f.write_text(json.dumps({"sk-1": {"client": "alice", "weight": 2}, "sk-2": "bob"}))
    ns = build_parser().parse_args(["serve", "--api-keys", str(f)])
    assert (ns.host, ns.port) == ("127.0.0.1", 30000)
    assert load_api_keys(server_args(ns)) == {"sk-1": ServerClient("alice", 2.0), "sk-2": ServerClient("bob", 1.0)}
    ns = build_parser().parse_args(["serve", "--api-key", "sk-x"])
    assert load_api_keys(server_args(ns)) == {"sk-x": ServerClient("default")}
    with pytest.raises(SystemExit):  # one or the other
        build_parser().parse_args(["serve", "--api-key", "sk-x", "--api-keys", str(f)])
    f.write_text(json.dumps({"sk-secret": {"client": "alice", "weight": -1}}))
    with pytest.raises(ValueError, match="weight") as e:
        load_api_keys(server_args(build_parser().parse_args(["serve", "--api-keys", str(f)])))
    assert "sk-secret" not in str(e.value)  # errors never echo a key


def test_serve_command_starts_and_stops(tiny_llama: Path) -> None:
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "radixfair.cli", "serve", "--model", str(tiny_llama), "--dtype", "float32",
         "--max-total-tokens", "1024", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        # read in a helper thread so a silent, hung server fails the test instead of blocking it
        threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True).start()
        deadline = time.monotonic() + 30
        while not any("serving" in x for x in lines) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert any(f"http://127.0.0.1:{port}" in x for x in lines), lines
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def scrape(http: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics parsed with prometheus_client's own parser: (sample name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    m = http.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(m.text) for s in fam.samples}


def test_metrics(http: httpx.Client, engine: Engine) -> None:
    client = (("client", "metered"),)
    body = {"text": "metered prompt", "sampling_params": {"max_new_tokens": 2, "ignore_eos": True}}
    http.post("/generate", json=body, headers={"X-Client-Id": "metered"})  # the prompt is now cached
    before = scrape(http)
    r = http.post("/generate", json=body, headers={"X-Client-Id": "metered"})
    assert r.status_code == 200
    meta = r.json()["meta_info"]
    after = scrape(http)

    def moved(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert after[("radixfair_kv_pool_slots", ())] == 4096
    assert moved("radixfair_requests_total", (("client", "metered"), ("finish_reason", "length"))) == 1
    assert moved("radixfair_client_output_tokens_total", client) == 2
    assert moved("radixfair_client_prompt_tokens_total", client) == meta["prompt_tokens"]
    assert meta["cached_tokens"] > 0
    assert moved("radixfair_client_cached_tokens_total", client) == meta["cached_tokens"]
    w_in, w_out = engine.args.w_in, engine.args.w_out
    assert moved("radixfair_client_service_total", client) == pytest.approx(
        w_in * (meta["prompt_tokens"] - meta["cached_tokens"]) + w_out * 2)
    for hist in ("radixfair_time_to_first_token_seconds", "radixfair_e2e_request_latency_seconds"):
        assert moved(hist + "_count") == 1 and moved(hist + "_sum") > 0
        assert after[(hist + "_bucket", (("le", "+Inf"),))] == after[(hist + "_count", ())]
    assert moved("radixfair_e2e_request_latency_seconds_sum") == pytest.approx(meta["e2e_latency"])


def test_prompt_longer_than_context(http: httpx.Client, engine: Engine) -> None:
    ids = [5] * (engine.context_len + 1)
    for path, body in (("/generate", {"input_ids": ids}), ("/v1/completions", {"prompt": ids, "max_tokens": 1})):
        r = http.post(path, json=body)
        assert r.status_code == 400, (path, r.status_code, r.text)
        assert "prompt" in r.json()["error"]["message"] and "context" in r.json()["error"]["message"]
    assert http.get("/health_generate").status_code == 200


def test_unknown_model_is_404(http: httpx.Client, oai: openai.OpenAI, engine: Engine) -> None:
    served = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert served == [engine.model_names.served] and "/" not in served[0]
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    for path, body in (("/v1/completions", {"prompt": "x", "max_tokens": 1}), ("/v1/chat/completions", chat)):
        r = http.post(path, json={**body, "model": "gpt-nope"})
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["code"] == "model_not_found"
        assert err["param"] == "model" and "gpt-nope" in err["message"]
        assert http.post(path, json=body).status_code == 200  # no model field: the served one
        assert http.post(path, json={**body, "model": served[0]}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="x", prompt="hi", max_tokens=1)
    assert http.get("/health_generate").status_code == 200


def test_oversized_body_is_413(engine: Engine) -> None:
    srv = LiveServer(create_app(engine, max_body_bytes=1000))
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            big = {"text": "x" * 2000, "sampling_params": {"max_new_tokens": 1}}
            r = c.post("/generate", json=big)  # Content-Length says it
            assert r.status_code == 413 and "limit" in r.json()["error"]["message"], r.text

            def chunks() -> Iterator[bytes]:  # chunked: no Content-Length, caught as it streams in
                data = json.dumps(big).encode()
                for i in range(0, len(data), 300):
                    yield data[i:i + 300]

            r = c.post("/generate", content=chunks(), headers={"content-type": "application/json"})
            assert r.status_code == 413, r.text
            ok = c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}})
            assert ok.status_code == 200, ok.text
            small = json.dumps({"text": "x", "sampling_params": {"max_new_tokens": 1}}).encode()
            r = c.post("/generate", content=iter([small[:10], small[10:]]),
                       headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text  # a chunked body under the limit is reassembled
            assert c.get("/health_generate").status_code == 200
    finally:
        srv.stop()
    assert_clean(engine)


def test_generate_text_in_logprobs(http: httpx.Client, engine: Engine) -> None:
    body = {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 3, "temperature": 0},
            "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2}
    plain = http.post("/generate", json=body).json()["meta_info"]
    assert all(e[2] is None for e in plain["output_token_logprobs"])
    r = http.post("/generate", json={**body, "return_text_in_logprobs": True})
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]

    def text(i: int) -> str:
        return engine.tokenizer.decode([i], skip_special_tokens=False)

    for key in ("input_token_logprobs", "output_token_logprobs"):
        assert meta[key] and all(e[2] == text(e[1]) for e in meta[key])
        assert [e[:2] for e in meta[key]] == [e[:2] for e in plain[key]]
    for key in ("input_top_logprobs", "output_top_logprobs"):
        tops = [t for t in meta[key] if t]
        assert tops and all(e[2] == text(e[1]) for top in tops for e in top)
    lps = [e[0] for e in meta["input_token_logprobs"] if e[0] is not None]
    assert lps and meta["normalized_prompt_logprob"] == pytest.approx(sum(lps) / len(lps))
    assert plain["normalized_prompt_logprob"] == pytest.approx(meta["normalized_prompt_logprob"])
    assert "normalized_prompt_logprob" not in http.post(
        "/generate", json={"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 1}}).json()["meta_info"]
    with http.stream("POST", "/generate", json={**body, "return_text_in_logprobs": True, "stream": True}) as s:
        events = sse_events(s.iter_lines())
    last = events[-1]["meta_info"]
    assert all(e[2] == text(e[1]) for e in last["output_token_logprobs"])
