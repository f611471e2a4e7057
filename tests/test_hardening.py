"""Hardening: no single request exhausts the server or hurts another tenant, and every failure is
answered. Live uvicorn servers over the tiny model; faults are injected into the model runner, the
sampler and the scheduler."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures.live_server import LiveServer
from test_server import sse_events

from radixfair.engine.engine import Engine
from radixfair.server import ServerClient, create_app
from radixfair.server.connections import uvicorn_config
from radixfair.server.server_args import ServerArgs

LONG = {"max_new_tokens": 1500, "ignore_eos": True, "temperature": 0}


def make_engine(path: Path, **kw: Any) -> Engine:
    kw.setdefault("max_total_tokens", 4096)
    return Engine(str(path), dtype="float32", **kw)


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> Iterator[Engine]:
    with make_engine(tiny_llama) as e:
        yield e


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[LiveServer]:
    srv = LiveServer(create_app(engine))
    yield srv
    srv.stop()


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def wait_drained(engine: Engine, within: float) -> float:
    """Seconds until nothing runs or waits; fails past `within`."""
    t0 = time.monotonic()
    while True:
        s = engine.get_stats()
        if s.running == 0 and s.waiting == 0:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < within, f"still {s.running} running, {s.waiting} waiting"
        time.sleep(0.02)


def assert_no_leak(engine: Engine) -> None:
    engine.wait_idle(timeout=20)
    free, evictable, protected = engine.check_invariant()
    assert protected == 0 and free + evictable == engine.max_total_tokens
    assert engine.get_stats().leaked_slots == 0


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# ---- one request must not exhaust the server --------------------------------------------------------
@pytest.mark.parametrize(("body", "param", "limit"), [
    ({"input_ids": [[5]] * 300}, "input_ids", "--max-prompts-per-request"),
    ({"text": ["a"] * 300}, "text", "--max-prompts-per-request"),
    ({"text": ["a", "b", "c", "d", "e"], "sampling_params": {"n": 128}}, "n", "--max-sequences-per-request"),
    ({"input_ids": [[5] * 1500] * 200}, "input_ids", "--max-request-tokens"),
    ({"text": "x", "sampling_params": {"stop_token_ids": list(range(200_000))}}, "stop_token_ids",
     "--max-stop-token-ids"),
    ({"input_ids": [5] * 1000, "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 20,
      "sampling_params": {"max_new_tokens": 1000, "n": 64}}, "return_logprob", "--max-logprob-entries"),
])
def test_request_shape_limits_are_400s_naming_field_and_limit(http: httpx.Client, body: dict[str, Any], param: str,
                                                              limit: str) -> None:
    err = error_of(http.post("/generate", json=body), 400)
    assert err["param"] == param and param in err["message"] and limit in err["message"], err
    assert http.get("/health_generate").status_code == 200


def test_a_huge_one_token_batch_is_refused_before_it_is_built(http: httpx.Client, engine: Engine,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """~1M one-token prompts with n: 128 (the 8 MiB body of the issue) build no request object."""
    import radixfair.io_struct as io

    built: list[int] = []
    orig = io.EngineRequest.__post_init__
    monkeypatch.setattr(io.EngineRequest, "__post_init__", lambda self: (built.append(1), orig(self))[1])
    body = b'{"input_ids": [' + b",".join([b"[1]"] * 1_000_000) + b'], "sampling_params": {"n": 128}}'
    t = time.monotonic()
    r = http.post("/generate", content=body, headers={"content-type": "application/json"})
    assert "--max-prompts-per-request" in error_of(r, 400)["message"]
    assert not built and time.monotonic() - t < 20


def test_openai_limits_name_openai_fields(http: httpx.Client) -> None:
    err = error_of(http.post("/v1/completions", json={"prompt": ["a"] * 300, "max_tokens": 1}), 400)
    assert err["param"] == "prompt" and "--max-prompts-per-request" in err["message"]
    err = error_of(http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1,
                                                      "stop_token_ids": list(range(1000))}), 400)
    assert err["param"] == "stop_token_ids"


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_seed_out_of_range_is_a_400(http: httpx.Client, seed: int) -> None:
    for path, body in (("/generate", {"text": "x", "sampling_params": {"seed": seed, "max_new_tokens": 2}}),
                       ("/v1/completions", {"prompt": "x", "seed": seed, "max_tokens": 2})):
        err = error_of(http.post(path, json=body), 400)
        assert err["param"] == "seed" and "seed" in err["message"]


def test_seed_range_edges_are_served_and_n_wraps(http: httpx.Client) -> None:
    for seed in (2**64 - 1, -(2**63)):
        r = http.post("/generate", json={"text": "x", "sampling_params": {"seed": seed, "max_new_tokens": 2,
                                                                          "n": 3, "temperature": 1.0}})
        assert r.status_code == 200, r.text
        assert len(r.json()) == 3


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/generate", '{"text": "\\ud800"}', "text"),
    ("/generate", '{"text": ["ok", "a\\udfffb"]}', "text"),
    ("/generate", '{"text": "x", "rid": "\\ud800"}', "rid"),
    ("/generate", '{"text": "x", "sampling_params": {"stop": ["\\ud800"]}}', "stop"),
    ("/generate", '{"text": "x", "sampling_params": {"\\ud800": 1}}', None),
    ("/v1/completions", '{"prompt": "\\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": "x", "user": "\\ud800", "max_tokens": 2}', "user"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}', "messages"),
])
def test_lone_surrogates_are_400s(http: httpx.Client, path: str, body: str, param: str | None) -> None:
    r = http.post(path, content=body.encode(), headers={"content-type": "application/json"})
    err = error_of(r, 400)
    if param is not None:
        assert err["param"] == param, err


def test_per_client_and_global_queue_bounds_are_429s(engine: Engine) -> None:
    srv = LiveServer(create_app(engine, max_requests_per_client=2, max_queued_requests=0))
    try:
        async def scenario() -> None:
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                async def hold(client: str, i: int) -> None:
                    body = {"text": f"hold {i}", "sampling_params": LONG, "stream": True}
                    async with c.stream("POST", "/generate", json=body, headers={"X-Client-Id": client}) as r:
                        assert r.status_code == 200
                        async for line in r.aiter_lines():
                            if line.startswith("data: "):
                                await asyncio.sleep(1.0)
                                return

                holders = [asyncio.create_task(hold("flood", i)) for i in range(2)]
                await asyncio.sleep(0.5)
                r = await c.post("/generate", json={"text": "one more", "sampling_params": {"max_new_tokens": 1}},
                                 headers={"X-Client-Id": "flood"})
                err = error_of(r, 429)
                assert r.headers["Retry-After"] == "1" and "--max-requests-per-client" in err["message"]
                r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                                 headers={"X-Client-Id": "flood"})
                assert error_of(r, 429)["type"] == "rate_limit_error"
                # another client is not refused for the flooder's requests
                r = await c.post("/generate", json={"text": "ok", "sampling_params": {"max_new_tokens": 1}},
                                 headers={"X-Client-Id": "polite"})
                assert r.status_code == 200, r.text
                # more than a client may ever hold is not worth retrying: a 400
                r = await c.post("/generate", json={"text": "x", "sampling_params": {"n": 3}},
                                 headers={"X-Client-Id": "polite"})
                assert error_of(r, 400)["param"] == "n"
                await asyncio.gather(*holders)

        asyncio.run(scenario())
        state = srv.server.config.app.state.radixfair
        deadline = time.monotonic() + 10
        while state.admission.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert state.admission.in_flight == 0 and not state.admission.per_client, "admission counts leaked"
    finally:
        srv.stop()
    assert_no_leak(engine)


def test_global_bound(engine: Engine) -> None:
    srv = LiveServer(create_app(engine, max_queued_requests=0))
    try:
        state = srv.server.config.app.state.radixfair
        cap = state.admission.limits.capacity
        ticket = state.admission.admit("someone", cap)  # the server is full
        try:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                err = error_of(c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}}), 429)
                assert "--max-queued-requests" in err["message"]
        finally:
            ticket.release()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}}).status_code == 200
    finally:
        srv.stop()


# ---- streaming and logprobs -----------------------------------------------------------------------------
def _stream(c: httpx.Client, body: dict[str, Any]) -> list[Any]:
    with c.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        return sse_events(r.iter_lines())


def test_native_stream_cumulative_by_default_and_incremental_on_request(engine: Engine, http: httpx.Client) -> None:
    body = {"input_ids": [5, 6, 7, 8], "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3,
            "sampling_params": {"max_new_tokens": 12, "ignore_eos": True, "temperature": 0}}
    final = http.post("/generate", json=body).json()
    events = _stream(http, body)
    assert len(events) == 12
    for k, e in enumerate(events):  # SGLang's shape: each chunk is the result so far
        assert e["output_ids"] == final["output_ids"][: k + 1]
        assert final["text"].startswith(e["text"])
        meta = e["meta_info"]
        assert meta["output_token_logprobs"] == final["meta_info"]["output_token_logprobs"][: k + 1]
        assert meta["output_top_logprobs"] == final["meta_info"]["output_top_logprobs"][: k + 1]
        assert meta["input_token_logprobs"] == final["meta_info"]["input_token_logprobs"]
        assert meta["normalized_prompt_logprob"] == pytest.approx(final["meta_info"]["normalized_prompt_logprob"])
    assert events[-1]["text"] == final["text"]
    srv = LiveServer(create_app(engine, incremental_streaming_output=True))
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            deltas = _stream(c, body)
    finally:
        srv.stop()
    assert "".join(e["text"] for e in deltas) == final["text"]
    assert [t for e in deltas for t in e["output_ids"]] == final["output_ids"]
    assert all(len(e["output_ids"]) == 1 for e in deltas)
    lps = [x for e in deltas for x in e["meta_info"]["output_token_logprobs"]]
    assert lps == final["meta_info"]["output_token_logprobs"]
    assert deltas[0]["meta_info"]["input_token_logprobs"] == final["meta_info"]["input_token_logprobs"]
    assert all(e["meta_info"]["input_token_logprobs"] == [] for e in deltas[1:])
    assert deltas[-1]["meta_info"]["completion_tokens"] == 12


def test_cumulative_chunks_encode_only_the_new_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The work per chunk stays constant as the output grows: every logprob entry is converted (and
    serialized) once, not once per chunk; the chunk text still equals the whole result's JSON."""
    from radixfair.io_struct import EngineOutput, RequestResult, TokenLogprob
    from radixfair.server import native_stream

    calls = [0]
    orig = native_stream._entry

    def counted(x: Any, token_text: Any) -> list[Any]:
        calls[0] += 1
        return orig(x, token_text)

    monkeypatch.setattr(native_stream, "_entry", counted)
    res = RequestResult("r", return_logprob=True, top_logprobs_num=2)
    enc = native_stream.StreamEncoder(res, incremental=False, token_text=None, index=None)
    per_chunk = []
    for k in range(300):
        top = ((-0.5, 7), (-1.5, 8))
        out = EngineOutput("r", "ab", (7,), output_logprobs=(TokenLogprob(-0.5, 7, top),), completion_tokens=k + 1)
        res.add(out)
        before = calls[0]
        text = enc.chunk(out)
        per_chunk.append(calls[0] - before)
    assert set(per_chunk) == {3}  # the token's entry and its two alternatives, whatever the length
    assert json.loads(text) == json.loads(json.dumps(native_stream.native_result(res)))


# ---- a client that goes away frees its work ----------------------------------------------------------------
def test_non_streaming_request_is_aborted_when_its_client_disconnects(server: LiveServer, engine: Engine) -> None:
    engine.wait_idle(timeout=20)
    decoded = engine.get_stats().decode_tokens
    body = {"text": "never read", "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True, "temperature": 0}}
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(30, read=0.5)) as c, \
            pytest.raises(httpx.ReadTimeout):
        c.post("/generate", json=body)  # the client gives up after 0.5 s and closes the connection
    assert engine.get_stats().running == 1, "the request finished before the client left: test too weak"
    assert wait_drained(engine, within=1.0) < 1.0
    assert engine.get_stats().decode_tokens - decoded < 2000, "the request ran to its end"
    assert_no_leak(engine)


# ---- failures are answered -----------------------------------------------------------------------------------
def test_a_model_call_failure_is_a_500_with_a_generic_message(server: LiveServer, engine: Engine,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(batch: Any) -> Any:
        raise RuntimeError("CUDA error: secret internal detail")

    monkeypatch.setattr(engine.runner, "run", broken)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path, body in (("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 2}}),
                           ("/v1/completions", {"prompt": "x", "max_tokens": 2}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})):
            r = c.post(path, json=body)
            err = error_of(r, 500)
            assert "secret" not in r.text and err["type"] == "internal_server_error"
        events = _stream(c, {"text": "x", "sampling_params": {"max_new_tokens": 2}})
        assert events and events[-1]["error"]["code"] == 500 and "secret" not in json.dumps(events)
        monkeypatch.undo()
        assert c.get("/health_generate").status_code == 200  # the engine goes on
    assert_no_leak(engine)


def test_one_rows_sampling_failure_fails_only_that_request(server: LiveServer, engine: Engine,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A row whose sampling raises (here: seed 666 after its fifth token, so that it shares a decode
    batch first) fails its own request; the others of the same batch, from another client, finish
    normally."""
    sampler = engine.runner.sampler
    orig = sampler.sample

    def sample(logits: Any, reqs: list[Any], mask: Any = None) -> Any:
        if any(r.sampling_params.seed == 666 and len(r.output_ids) >= 5 for r in reqs):
            raise RuntimeError("poisoned row")
        return orig(logits, reqs, mask)

    monkeypatch.setattr(sampler, "sample", sample)
    engine.wait_idle(timeout=20)

    async def both() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            good = c.post("/generate", json={"text": "fine", "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}},
                          headers={"X-Client-Id": "good"})
            bad = c.post("/generate", json={"text": "poison", "sampling_params": {"max_new_tokens": 40, "seed": 666,
                                                                                  "temperature": 1.0}},
                         headers={"X-Client-Id": "bad"})
            g, b = await asyncio.gather(good, bad)
            return g, b

    batches: list[int] = []
    orig_run = engine.runner.run
    monkeypatch.setattr(engine.runner, "run", lambda batch: (batches.append(len(batch.reqs)), orig_run(batch))[1])
    good, bad = asyncio.run(both())
    assert max(batches) == 2, "the two requests never shared a batch: test too weak"
    assert good.status_code == 200 and good.json()["meta_info"]["completion_tokens"] == 400
    err = error_of(bad, 500)
    assert "poisoned" not in bad.text and "sampling" in err["message"]
    assert_no_leak(engine)


def test_a_detokenizer_failure_fails_only_that_request(engine: Engine) -> None:
    """The engine thread survives a request whose output cannot be decoded."""
    it = engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 30, "ignore_eos": True},
                         stream=True)
    next(it)
    sub = next(iter(engine._subs.values()))
    assert sub.req is not None and sub.req.detokenizer is not None

    def broken(ids: Any) -> str:
        raise ValueError("undecodable")

    sub.req.detokenizer.add = broken  # type: ignore[method-assign]
    last = list(it)[-1]
    assert last["meta_info"]["finish_reason"]["type"] == "abort" and "decoding" in last["meta_info"]["error"]
    assert engine.alive and engine.generate("ok", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2
    assert_no_leak(engine)


@pytest.mark.parametrize("fault", ["scheduler", "runner"])
def test_engine_death_answers_everything_503_and_health_says_so(tiny_llama: Path, fault: str) -> None:
    """A fault outside the model call kills the engine thread: in the scheduler (schedule), or in the
    model runner's bookkeeping (forget, when a request finishes)."""
    eng = make_engine(tiny_llama)
    srv = LiveServer(create_app(eng))
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/health").status_code == 200

            async def in_flight() -> list[Any]:
                async with httpx.AsyncClient(base_url=srv.url, timeout=30) as ac:
                    blocking = ac.post("/generate", json={"text": "a", "sampling_params": LONG})
                    chat = ac.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "b"}],
                                                                 "max_tokens": 1500, "ignore_eos": True})

                    async def stream() -> list[Any]:
                        async with ac.stream("POST", "/generate", json={"text": "c", "sampling_params": LONG,
                                                                        "stream": True}) as r:
                            lines = [line async for line in r.aiter_lines()]
                        return sse_events(iter(lines))

                    async def kill() -> None:
                        while eng.get_stats().running < 3:
                            await asyncio.sleep(0.02)

                        def boom(*args: Any) -> Any:
                            raise RuntimeError(f"{fault} bug")

                        if fault == "scheduler":
                            eng.scheduler.schedule = boom  # type: ignore[method-assign]
                        else:
                            eng.runner.forget = boom  # type: ignore[method-assign]
                            short = await ac.post("/generate", json={"text": "d", "sampling_params": {"max_new_tokens": 1}})
                            assert short.status_code == 503, short.text  # it finished, and the engine died there

                    return list(await asyncio.gather(blocking, chat, stream(), kill()))

            blocking, chat, events, _ = asyncio.run(in_flight())
            assert error_of(blocking, 503)["type"] == "service_unavailable"
            assert error_of(chat, 503)["type"] == "service_unavailable"
            assert events[-1]["error"]["code"] == 503
            assert eng.stopped.wait(5) and eng.failure is not None and not eng.alive
            assert c.get("/health").status_code == 503
            assert c.get("/health_generate").status_code == 503
            t = time.monotonic()
            for path, body in (("/generate", {"text": "x"}), ("/v1/completions", {"prompt": "x"}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
                error_of(c.post(path, json=body), 503)
            assert time.monotonic() - t < 2, "new requests must be refused at once"
            assert c.get("/get_load").status_code == 503
    finally:
        srv.stop()
        eng.shutdown()


def test_requests_after_shutdown_get_503(tiny_llama: Path) -> None:
    eng = make_engine(tiny_llama, max_total_tokens=1024)
    srv = LiveServer(create_app(eng))
    try:
        eng.shutdown()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            error_of(c.post("/generate", json={"text": "x"}), 503)
            assert c.get("/health").status_code == 503
    finally:
        srv.stop()


def test_serve_exits_non_zero_when_the_engine_thread_dies(tiny_llama: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "faulty_serve.py"
    script.write_text(
        "import sys\n"
        "from radixfair.sched.scheduler import Scheduler\n"
        "def boom(self, batch, out):\n"
        "    raise RuntimeError('injected scheduler fault')\n"
        "Scheduler.process_output = boom\n"
        "from radixfair.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen(
        [sys.executable, str(script), "serve", "--model", str(tiny_llama), "--dtype", "float32",
         "--max-total-tokens", "1024", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})  # this checkout's code
    try:
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True).start()
        deadline = time.monotonic() + 30
        while not any("serving" in x for x in lines) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json={"text": "x"}, timeout=20)
        assert r.status_code == 503, r.text
        assert proc.wait(timeout=20) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# ---- tenants cannot touch each other ---------------------------------------------------------------------------
KEYS = {"sk-alice": ServerClient("alice"), "sk-bob": ServerClient("bob"),
        "sk-router": ServerClient("router", trusted_proxy=True)}


@pytest.fixture(scope="module")
def tenant_server(engine: Engine) -> Iterator[LiveServer]:
    srv = LiveServer(create_app(engine, KEYS, admin_api_key=("sk-op1", "sk-op2")))
    yield srv
    srv.stop()


def bearer(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def test_request_ids_are_per_client_and_abort_only_ones_own(tenant_server: LiveServer, engine: Engine) -> None:
    with httpx.Client(base_url=tenant_server.url, timeout=30) as c:
        body = {"text": "alice's", "sampling_params": LONG, "stream": True, "rid": "shared"}
        with c.stream("POST", "/generate", json=body, headers=bearer("sk-alice")) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: ")
            # bob can neither abort nor detect alice's request, and may use the same id himself
            err = error_of(c.post("/abort_request", json={"rid": "shared"}, headers=bearer("sk-bob")), 404)
            assert "alice" not in err["message"]
            mine = c.post("/generate", json={"text": "bob's", "rid": "shared", "sampling_params": {"max_new_tokens": 2}},
                          headers=bearer("sk-bob"))
            assert mine.status_code == 200 and mine.json()["meta_info"]["id"] == "shared"
            # alice's own duplicate is refused, naming the field
            dup = c.post("/generate", json={"text": "again", "rid": "shared"}, headers=bearer("sk-alice"))
            assert error_of(dup, 400)["param"] == "rid"
            dup = c.post("/generate", json={"text": "again", "rid": "shared", "stream": True}, headers=bearer("sk-alice"))
            assert error_of(dup, 400)["param"] == "rid"
            assert engine.get_stats().running >= 1, "bob's attempts touched alice's request"
            ok = c.post("/abort_request", json={"rid": "shared"}, headers=bearer("sk-alice"))
            assert ok.status_code == 200
            events = sse_events(lines)
        assert events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
        assert len(events[-1]["output_ids"]) < 1500
    assert_no_leak(engine)


def test_trusted_proxy_names_the_client_others_cannot(tenant_server: LiveServer, engine: Engine,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    orig = engine.tokenize_all

    def spy(reqs: Any) -> Any:
        seen.extend(r.client_id for r in reqs)
        return orig(reqs)

    monkeypatch.setattr(engine, "tokenize_all", spy)
    body = {"text": "x", "sampling_params": {"max_new_tokens": 1}}
    with httpx.Client(base_url=tenant_server.url, timeout=30) as c:
        assert c.post("/generate", json=body, headers=bearer("sk-router", **{"X-Client-Id": "carol"})).status_code == 200
        assert c.post("/generate", json=body, headers=bearer("sk-router")).status_code == 200
        assert c.post("/generate", json=body, headers=bearer("sk-bob", **{"X-Client-Id": "carol"})).status_code == 200
    assert seen == ["carol", "router", "bob"]


def test_operator_endpoints_need_an_operator_key(tenant_server: LiveServer, engine: Engine) -> None:
    with httpx.Client(base_url=tenant_server.url, timeout=30) as c:
        for key in ("sk-alice", "sk-router"):
            error_of(c.post("/flush_cache", headers=bearer(key)), 403)
            error_of(c.get("/metrics", headers=bearer(key)), 403)
            info = c.get("/get_server_info", headers=bearer(key)).json()
            assert "client_weights" not in info and "client_weights" not in info["engine_args"]
        error_of(c.get("/metrics"), 401)
        engine.wait_idle(timeout=20)
        for key in ("sk-op1", "sk-op2"):
            assert c.post("/flush_cache", headers=bearer(key)).status_code == 200
            assert c.get("/metrics", headers=bearer(key)).status_code == 200
            info = c.get("/get_server_info", headers=bearer(key)).json()
            assert "client_weights" in info and info["stats"]["leaked_slots"] == 0


def test_with_keys_and_no_operator_key_the_operator_endpoints_are_closed(engine: Engine) -> None:
    srv = LiveServer(create_app(engine, KEYS))
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            err = error_of(c.post("/flush_cache", headers=bearer("sk-alice")), 403)
            assert "--admin-api-key" in err["message"]
            error_of(c.get("/metrics", headers=bearer("sk-bob")), 403)
    finally:
        srv.stop()


def test_identity_header_is_chosen_or_turned_off(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    orig = engine.tokenize_all
    monkeypatch.setattr(engine, "tokenize_all", lambda reqs: (seen.extend(r.client_id for r in reqs), orig(reqs))[1])
    body = {"prompt": "x", "max_tokens": 1, "user": "u"}
    headers = {"X-Client-Id": "forged", "X-Tenant": "t1"}
    for setting in ("x-tenant", "none"):
        srv = LiveServer(create_app(engine, client_id_header=setting))
        try:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                assert c.post("/v1/completions", json=body, headers=headers).status_code == 200
        finally:
            srv.stop()
    assert seen == ["t1", "u"]


def test_prometheus_client_series_are_bounded(engine: Engine) -> None:
    from test_server import scrape

    from radixfair.server.metrics import ServerMetrics

    srv = LiveServer(create_app(engine))
    metrics: ServerMetrics = srv.server.config.app.state.radixfair.metrics
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for i in range(6 * metrics.clients.max_clients):
                r = c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1 + i % 3,
                                                                               "ignore_eos": True}},
                           headers={"X-Client-Id": f"sybil-{i}"})
                assert r.status_code == 200
            samples = scrape(c)
    finally:
        srv.stop()
    clients = {dict(labels)["client"] for (name, labels) in samples if name == "radixfair_client_service_total"}
    assert len(clients) <= metrics.clients.max_clients + 1 and "other" in clients
    assert len(metrics.clients.tracked) <= 4 * metrics.clients.max_clients
    requests = sum(v for (name, _), v in samples.items() if name == "radixfair_requests_total")
    assert requests >= 6 * metrics.clients.max_clients  # nothing lost in the folding


def test_client_series_keep_the_top_clients() -> None:
    from radixfair.server.metrics import ClientSeries

    s = ClientSeries(max_clients=2)
    for i in range(50):
        s.add(f"small-{i}", "length", 1, 1, 0, 1.0)
    s.add("big", "length", 1000, 0, 0, 1000.0)
    s.add("bigger", "length", 2000, 0, 0, 2000.0)
    series = dict(s.series())
    assert list(series) == ["bigger", "big", "other"]
    assert series["other"].service == 50.0 and sum(sum(t.requests.values()) for t in series.values()) == 52


# ---- connections ------------------------------------------------------------------------------------------------
class ConfiguredServer(LiveServer):
    """A live server run with `radixfair serve`'s uvicorn settings."""

    def __init__(self, app: Any, args: ServerArgs) -> None:
        super().__init__(app, lambda a, port: uvicorn_config(a, replace(args, port=port), log_level="warning"))


def test_slow_headers_and_slow_bodies_are_cut_off(engine: Engine) -> None:
    args = ServerArgs(read_timeout=0.5, max_connections=3)
    srv = ConfiguredServer(create_app(engine, args=args), args)
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")  # headers never finish
            t = time.monotonic()
            assert s.recv(100) == b"" and time.monotonic() - t < 3  # closed by the server
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"text\": ")  # the body never finishes
            head = s.recv(4096)
            assert head.startswith(b"HTTP/1.1 408"), head
        def health_until(status: int) -> int:
            """/health's status once it is `status`, or the last one after 5 s (the server accepts and
            closes connections on its own loop, later on a busy machine)."""
            deadline = time.monotonic() + 5
            while True:
                with httpx.Client(base_url=srv.url, timeout=10) as c:
                    got = c.get("/health").status_code
                if got == status or time.monotonic() > deadline:
                    return got
                time.sleep(0.05)

        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(3)]
        try:
            assert health_until(503) == 503  # over --max-connections
        finally:
            for s in idle:
                s.close()
        assert health_until(200) == 200
    finally:
        srv.stop()


def test_chat_template_renders_off_the_event_loop(server: LiveServer, http: httpx.Client, engine: Engine,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    orig = engine.tokenizer.apply_chat_template

    def spy(messages: Any, *a: Any, **kw: Any) -> str:
        threads.append(threading.current_thread())
        return orig(messages, *a, **kw)

    monkeypatch.setattr(engine.tokenizer, "apply_chat_template", spy)
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
    assert r.status_code == 200
    assert threads and all(t is not server.thread for t in threads)  # the event loop runs in server.thread
