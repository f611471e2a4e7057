"""The router as a service: a live router in front of two live tiny workers (in-process uvicorn
servers on free ports; a subprocess worker where one must die), and the pieces it is built from."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures.live_server import LiveServer, free_port

from radixfair.engine.engine import Engine
from radixfair.router.app import create_router_app
from radixfair.router.circuit_breaker import BreakerState, CircuitBreaker
from radixfair.router.policies import RouteRequest
from radixfair.router.prompt_tokens import max_new_tokens, prompt_tokens
from radixfair.router.request_queue import RequestQueue
from radixfair.router.retry import Backoff
from radixfair.router.router_args import RouterArgs
from radixfair.router.serve import build_policy
from radixfair.router.state import RouterState
from radixfair.server import ServerClient, create_app
from radixfair.server.app import metrics_for
from radixfair.server.errors import APIError

ROUTER_KEY = "sk-router"
WORKER_KEYS = {ROUTER_KEY: ServerClient("router", trusted_proxy=True), "sk-alice": ServerClient("alice")}
GREEDY = {"temperature": 0, "ignore_eos": True}


# ---- fixtures ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engines(tiny_llama: Path) -> Iterator[list[Engine]]:
    es = [Engine(str(tiny_llama), dtype="float32", max_total_tokens=8192) for _ in range(2)]
    try:
        yield es
    finally:
        for e in es:
            e.shutdown()


@pytest.fixture(scope="module")
def workers(engines: list[Engine]) -> Iterator[list[LiveServer]]:
    servers = [LiveServer(create_app(e, WORKER_KEYS)) for e in engines]
    yield servers
    for s in servers:
        s.stop()


class RouterUnderTest:
    def __init__(self, urls: list[str], policy: str = "d2lpm", **kw: Any) -> None:
        kw.setdefault("worker_api_key", ROUTER_KEY)
        kw.setdefault("health_check_interval_secs", 0.2)
        kw.setdefault("retry_initial_backoff_ms", 1.0)
        self.args = RouterArgs(worker_urls=tuple(urls), policy=policy, **kw)
        self.state = RouterState(self.args, build_policy(policy, {}))
        self.server = LiveServer(create_router_app(self.state))
        self.url = self.server.url

    def http(self, **kw: Any) -> httpx.Client:
        kw.setdefault("timeout", 60)
        return httpx.Client(base_url=self.url, **kw)

    def wait_idle(self, within: float = 30.0) -> None:
        """Every dispatch finished and every queue place handed back."""
        deadline = time.monotonic() + within
        while self.state.in_flight() or self.state.queue.active or self.state.holders:
            assert time.monotonic() < deadline, self.state.snapshot()
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def router_factory(workers: list[LiveServer]) -> Iterator[Callable[..., RouterUnderTest]]:
    made: list[RouterUnderTest] = []

    def make(policy: str = "d2lpm", urls: list[str] | None = None, **kw: Any) -> RouterUnderTest:
        r = RouterUnderTest(urls if urls is not None else [w.url for w in workers], policy, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


def sse_events(lines: Iterator[str]) -> list[Any]:
    out: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def drained(engines: list[Engine], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while any(e.get_stats().running or e.get_stats().waiting for e in engines):
        assert time.monotonic() < deadline, [e.get_stats() for e in engines]
        time.sleep(0.02)


# ---- forwarding ----------------------------------------------------------------------------------------------

def test_native_and_openai_requests_are_forwarded_with_the_clients_identity(
        router_factory: Callable[..., RouterUnderTest], engines: list[Engine]) -> None:
    r = router_factory()
    with r.http() as c:
        out = c.post("/generate", json={"text": "hello there", "sampling_params": {"max_new_tokens": 4, **GREEDY}},
                     headers={"x-client-id": "carol"})
        assert out.status_code == 200, out.text
        assert out.json()["meta_info"]["completion_tokens"] == 4
        comp = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "user": "dave", **GREEDY})
        assert comp.status_code == 200 and comp.json()["usage"]["completion_tokens"] == 3
        chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 2, **GREEDY}, headers={"x-client-id": "erin"})
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
        assert c.get("/v1/models").json()["data"][0]["id"]
        assert c.get("/get_model_info").json()["is_generation"] is True
        assert c.get("/health").status_code == 200
    # the workers charged the clients the router named, not the router's own key
    text = "".join(metrics_for(e).render(e.get_stats()).decode() for e in engines)
    for client in ("carol", "dave", "erin"):
        assert f'client="{client}"' in text
    r.wait_idle()
    assert r.state.tokenizer is not None, "the router did not fetch the workers' tokenizer"
    service = {c for w in r.state.workers.values() for c in w.service}
    assert {"carol", "dave", "erin"} <= service


def test_streams_pass_through_event_by_event(router_factory: Callable[..., RouterUnderTest]) -> None:
    r = router_factory()
    with r.http() as c:
        with c.stream("POST", "/generate", json={"text": "abc", "stream": True,
                                                 "sampling_params": {"max_new_tokens": 6, **GREEDY}}) as s:
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
            events = sse_events(s.iter_lines())
        assert events[-1] == "[DONE]" and len(events) >= 3
        assert events[-2]["meta_info"]["completion_tokens"] == 6
        with c.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                            "stream": True, "max_tokens": 4, **GREEDY}) as s:
            events = sse_events(s.iter_lines())
        assert events[-1] == "[DONE]" and events[0]["object"] == "chat.completion.chunk"
    r.wait_idle()


@pytest.mark.parametrize(("path", "body"), [
    ("/generate", "{not json"),
    ("/generate", {"text": "a", "input_ids": [1, 2]}),
    ("/generate", {"text": "a", "sampling_params": {"temperature": -1}}),
    ("/generate", {"text": 5}),
    ("/v1/completions", {"prompt": "a", "max_tokens": -3}),
    ("/v1/completions", {"prompt": "a", "model": "no-such-model"}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": "hi"}),
])
def test_bad_input_gets_the_same_4xx_as_from_a_worker(router_factory: Callable[..., RouterUnderTest],
                                                      workers: list[LiveServer], path: str, body: Any) -> None:
    r = router_factory()
    content = body if isinstance(body, str) else json.dumps(body)
    direct = httpx.post(workers[0].url + path, content=content, timeout=30,
                        headers={"authorization": "Bearer sk-alice", "content-type": "application/json"})
    assert 400 <= direct.status_code < 500, direct.text
    with r.http() as c:
        routed = c.post(path, content=content, headers={"content-type": "application/json"})
    assert (routed.status_code, routed.json()) == (direct.status_code, direct.json())
    r.wait_idle()


def test_a_client_id_too_long_is_refused_by_the_router_as_by_a_worker(
        router_factory: Callable[..., RouterUnderTest]) -> None:
    r = router_factory()
    with r.http() as c:
        out = c.post("/generate", json={"text": "a"}, headers={"x-client-id": "x" * 500})
    assert out.status_code == 400 and out.json()["error"]["param"] == "x-client-id"


def test_router_api_keys_name_the_client(router_factory: Callable[..., RouterUnderTest], engines: list[Engine],
                                         tmp_path: Path) -> None:
    keys = {"sk-frank": ServerClient("frank", 2.0)}
    r = router_factory()
    r.stop()
    args = RouterArgs(worker_urls=r.args.worker_urls, worker_api_key=ROUTER_KEY)
    state = RouterState(args, build_policy("d2lpm", {}), keys)
    server = LiveServer(create_router_app(state))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.post("/generate", json={"text": "a"}).status_code == 401
            out = c.post("/generate", json={"text": "a", "sampling_params": {"max_new_tokens": 2}},
                         headers={"authorization": "Bearer sk-frank", "x-client-id": "someone-else"})
            assert out.status_code == 200, out.text
            listed = c.get("/workers", headers={"authorization": "Bearer sk-frank"}).json()["workers"]
            assert listed and all("service" not in w for w in listed)  # client names: operators only
            assert c.post("/workers", json={"url": "http://127.0.0.1:1"},
                          headers={"authorization": "Bearer sk-frank"}).status_code == 403
    finally:
        server.stop()
    assert any("frank" in w.service for w in state.workers.values())
    assert not any("someone-else" in w.service for w in state.workers.values())


# ---- locality ------------------------------------------------------------------------------------------------

def _hit_rate(router: RouterUnderTest, engines: list[Engine]) -> float:
    for e in engines:
        e.wait_idle(timeout=30)
        e.flush_cache()
    before = [e.get_stats() for e in engines]
    prefixes = [f"client {k} shares this long system prompt about topic {k * 7}: " + f"{k}" * 300 for k in range(4)]
    # a fixed shuffle: in a plain rotation of an even number of clients, round robin would send
    # each client to the same worker every time
    order = [(i, k) for i in range(4) for k in range(4)]
    random.Random(0).shuffle(order)
    with router.http() as c:
        for i, k in order:
            out = c.post("/generate", json={"text": f"{prefixes[k]} question {i}",
                                            "sampling_params": {"max_new_tokens": 1, **GREEDY}},
                         headers={"x-client-id": f"client-{k}"})
            assert out.status_code == 200, out.text
    after = [e.get_stats() for e in engines]
    cached = sum(a.cached_tokens - b.cached_tokens for a, b in zip(after, before, strict=True))
    total = sum(a.input_tokens - b.input_tokens for a, b in zip(after, before, strict=True))
    router.wait_idle()
    return cached / total


def test_clients_with_distinct_prefixes_land_with_locality(router_factory: Callable[..., RouterUnderTest],
                                                           engines: list[Engine]) -> None:
    rates = {p: _hit_rate(router_factory(p), engines) for p in ("round_robin", "d2lpm", "cache_aware")}
    assert rates["d2lpm"] > rates["round_robin"], rates
    assert rates["cache_aware"] > rates["round_robin"], rates


# ---- faults --------------------------------------------------------------------------------------------------

def test_a_client_that_disconnects_aborts_its_request_on_the_worker(
        router_factory: Callable[..., RouterUnderTest], engines: list[Engine]) -> None:
    r = router_factory("round_robin")
    drained(engines)
    decoded = sum(e.get_stats().decode_tokens for e in engines)
    body = {"text": "never read", "sampling_params": {"max_new_tokens": 3000, **GREEDY}}
    with r.http(timeout=httpx.Timeout(30, read=0.5)) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/generate", json=body)
    drained(engines, within=10.0)
    assert sum(e.get_stats().decode_tokens for e in engines) - decoded < 3000, "the request ran to its end"
    r.wait_idle()
    # a stream read once and dropped
    decoded = sum(e.get_stats().decode_tokens for e in engines)
    with r.http() as c, c.stream("POST", "/generate", json={**body, "stream": True}) as s:
        next(s.iter_lines())
    drained(engines, within=10.0)
    assert sum(e.get_stats().decode_tokens for e in engines) - decoded < 3000
    r.wait_idle()


def test_abort_request_reaches_the_worker_holding_it(router_factory: Callable[..., RouterUnderTest],
                                                     engines: list[Engine]) -> None:
    r = router_factory("round_robin")
    body = {"text": "abort me", "rid": "job-1", "stream": True,
            "sampling_params": {"max_new_tokens": 3000, **GREEDY}}
    with r.http() as c, c.stream("POST", "/generate", json=body, headers={"x-client-id": "gina"}) as s:
        lines = s.iter_lines()
        next(lines)
        other = c.post("/abort_request", json={"rid": "job-1"}, headers={"x-client-id": "someone"})
        assert other.status_code == 404  # request ids are per client, at the router as at the worker
        out = c.post("/abort_request", json={"rid": "job-1"}, headers={"x-client-id": "gina"})
        assert out.status_code == 200, out.text
        events = sse_events(lines)
    assert events[-1] == "[DONE]"
    assert events[-2]["meta_info"]["finish_reason"]["type"] == "abort"
    r.wait_idle()
    drained(engines)


def test_workers_are_added_and_removed_at_run_time(router_factory: Callable[..., RouterUnderTest],
                                                   workers: list[LiveServer]) -> None:
    r = router_factory("round_robin", urls=[workers[0].url])
    a, b = workers[0].url, workers[1].url
    with r.http() as c:
        assert c.get("/workers").json()["workers"][0]["url"] == a
        added = c.post("/workers", json={"url": b})
        assert added.status_code == 201 and added.json() == {"url": b, "added": True}
        assert c.post("/workers", json={"url": b}).status_code == 200  # already there
        assert c.post("/workers", json={"url": "ftp://x"}).status_code == 400
        for _ in range(4):
            assert c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}}).status_code == 200
        assert r.state.workers[b].dispatched == 2
        assert c.delete(f"/workers/{a}").json() == {"url": a, "removed": True}
        assert c.delete(f"/workers/{a}").status_code == 404
        for _ in range(2):
            assert c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}}).status_code == 200
        assert r.state.workers[b].dispatched == 4
        assert c.get("/list_workers").json() == {"urls": [b]}
        assert c.post("/add_worker", params={"url": a}).status_code == 201
        assert c.post("/remove_worker", params={"url": b}).status_code == 200
        assert c.get("/list_workers").json() == {"urls": [a]}
        loads = c.get("/get_loads").json()["workers"]
        assert [x["worker"] for x in loads] == [a] and "num_reqs" in loads[0]["load"]
        assert c.post("/remove_worker", params={"url": a}).status_code == 200
        out = c.post("/generate", json={"text": "x"})
        assert out.status_code == 503 and "no healthy worker" in out.json()["error"]["message"]
    r.wait_idle()


def test_flush_cache_and_metrics(router_factory: Callable[..., RouterUnderTest]) -> None:
    r = router_factory()
    with r.http() as c:
        assert c.post("/generate", json={"text": "abc", "sampling_params": {"max_new_tokens": 1}}).status_code == 200
        flushed = c.post("/flush_cache")
        # the router's key is a client key at the workers, not an operator's: the workers say so
        assert flushed.status_code == 502 and {w["status"] for w in flushed.json()["workers"]} == {403}
        text = c.get("/metrics").text
    for series in ("radixfair_router_requests_total", "radixfair_router_requests_in_flight",
                   "radixfair_router_decisions_total", "radixfair_router_prefix_index_tokens",
                   "radixfair_router_client_service_total", "radixfair_router_worker_healthy",
                   "radixfair_router_retries_total", "radixfair_router_circuit_breaker_state"):
        assert series in text, series
    r.wait_idle()


def test_the_queue_answers_429_past_its_bounds(router_factory: Callable[..., RouterUnderTest],
                                               engines: list[Engine]) -> None:
    r = router_factory("round_robin", max_concurrent_requests=1, queue_size=0)

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(base_url=r.url, timeout=60) as c:
            long = asyncio.create_task(c.post("/generate", json={"text": "hold", "sampling_params":
                                                                 {"max_new_tokens": 200, **GREEDY}}))
            deadline = time.monotonic() + 20
            while not r.state.in_flight():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            second = await c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}})
            return [(await long).status_code, second.status_code]

    assert asyncio.run(scenario()) == [200, 429]
    r.wait_idle()
    assert r.state.queue.refused == 1


def test_global_vtc_holds_and_releases_every_request(router_factory: Callable[..., RouterUnderTest]) -> None:
    r = router_factory("global_vtc")
    r.state.policy.config = type(r.state.policy.config)(max_worker_requests=1)

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(base_url=r.url, timeout=60) as c:
            outs = await asyncio.gather(*(c.post("/generate", json={"text": f"q{i}", "sampling_params":
                                                                    {"max_new_tokens": 8, **GREEDY}},
                                                 headers={"x-client-id": f"c{i % 3}"}) for i in range(8)))
            return [o.status_code for o in outs]

    assert asyncio.run(scenario()) == [200] * 8
    r.wait_idle()
    assert r.state.policy.decisions["held"] > 0


def _spawn_worker(model: Path, port: int, keys: Path) -> subprocess.Popen[str]:
    keys.write_text(json.dumps({ROUTER_KEY: {"client": "router", "trusted_proxy": True}}))
    return subprocess.Popen(
        [sys.executable, "-m", "radixfair.cli", "serve", "--model", str(model), "--dtype", "float32",
         "--max-total-tokens", "8192", "--port", str(port), "--num-threads", "1", "--api-keys", str(keys)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})


def _wait_healthy(url: str, proc: subprocess.Popen[str], within: float = 120.0) -> None:
    deadline = time.monotonic() + within
    while True:
        assert proc.poll() is None, "the worker exited"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.2)


def test_a_worker_killed_mid_run(router_factory: Callable[..., RouterUnderTest], workers: list[LiveServer],
                                 tiny_llama: Path, tmp_path: Path) -> None:
    """Non-streamed requests complete on the survivor, streams on the dead worker end with an error
    event, and every counter returns to zero."""
    port = free_port()
    doomed = f"http://127.0.0.1:{port}"
    proc = _spawn_worker(tiny_llama, port, tmp_path / "keys.json")
    try:
        _wait_healthy(doomed, proc)
        r = router_factory("round_robin", urls=[doomed, workers[0].url])
        body = {"text": "long", "sampling_params": {"max_new_tokens": 400, **GREEDY}}

        async def scenario() -> tuple[list[httpx.Response], list[list[Any]]]:
            async with httpx.AsyncClient(base_url=r.url, timeout=120) as c:
                async def stream(i: int) -> list[Any]:
                    async with c.stream("POST", "/generate", json={**body, "stream": True, "text": f"s{i}"}) as s:
                        return sse_events(iter([line async for line in s.aiter_lines()]))

                plain = [asyncio.create_task(c.post("/generate", json={**body, "text": f"p{i}"})) for i in range(6)]
                streams = [asyncio.create_task(stream(i)) for i in range(4)]
                deadline = time.monotonic() + 60
                while r.state.workers[doomed].requests < 4:  # some of each kind are at the doomed worker
                    assert time.monotonic() < deadline, r.state.snapshot()
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.3)
                proc.kill()
                return list(await asyncio.gather(*plain)), list(await asyncio.gather(*streams))

        plain, streams = asyncio.run(scenario())
        assert [p.status_code for p in plain] == [200] * 6, [p.text for p in plain]
        assert all(p.json()["meta_info"]["completion_tokens"] == 400 for p in plain)
        broken = [s for s in streams if isinstance(s[-2], dict) and "error" in s[-2]]
        assert broken, "no stream was at the killed worker: test too weak"
        for s in streams:
            assert s[-1] == "[DONE]"
            if s in broken:
                assert s[-2]["error"]["code"] == 502
            else:
                assert s[-2]["meta_info"]["completion_tokens"] == 400
        r.wait_idle()
        assert r.state.retries >= 1 and r.state.stream_errors == len(broken)
        deadline = time.monotonic() + 20
        while r.state.workers[doomed].healthy:  # the health checks take it out
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with r.http() as c:
            assert c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}}).status_code == 200
            assert "radixfair_router_worker_healthy" in c.get("/metrics").text
        r.wait_idle()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_a_worker_that_never_answers_is_retried_elsewhere_and_its_breaker_opens(
        router_factory: Callable[..., RouterUnderTest], workers: list[LiveServer]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    r = router_factory("round_robin", urls=[dead, workers[0].url], cb_failure_threshold=2,
                       health_check_interval_secs=3600)
    with r.http() as c:
        for _ in range(6):
            out = c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}})
            assert out.status_code == 200, out.text
    assert r.state.workers[dead].breaker.state is BreakerState.OPEN
    assert r.state.retries == 2  # the third request found the breaker open and went straight to the live worker
    r.wait_idle()


def test_retries_are_bounded(router_factory: Callable[..., RouterUnderTest]) -> None:
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    r = router_factory("round_robin", urls=dead, retry_max_retries=3, health_check_interval_secs=3600,
                       disable_circuit_breaker=True)
    with r.http() as c:
        out = c.post("/generate", json={"text": "x"})
        streamed = c.post("/generate", json={"text": "x", "stream": True})
    assert out.status_code == 502 and "after 3 retries" in out.json()["error"]["message"]
    assert streamed.status_code == 502
    assert r.state.retries == 6
    r.wait_idle()


# ---- the parts -----------------------------------------------------------------------------------------------

def test_circuit_breaker_opens_half_opens_and_closes() -> None:
    now = [0.0]
    b = CircuitBreaker(failure_threshold=2, success_threshold=2, timeout_secs=10, clock=lambda: now[0])
    b.record(False)
    assert b.allows()
    b.record(True)  # a success resets the run of failures
    b.record(False)
    assert b.state is BreakerState.CLOSED
    b.record(False)
    assert b.state is BreakerState.OPEN and not b.allows()
    now[0] = 10.0
    assert b.state is BreakerState.HALF_OPEN and b.allows()
    b.record(False)  # one failure while half-open opens it again
    assert b.state is BreakerState.OPEN
    now[0] = 20.0
    b.record(True)
    assert b.state is BreakerState.HALF_OPEN
    b.record(True)
    assert b.state is BreakerState.CLOSED and b.opened == 2
    off = CircuitBreaker(1, 1, 10, enabled=False)
    off.record(False)
    assert off.allows()


def test_backoff_grows_is_capped_and_jittered() -> None:
    b = Backoff(initial_ms=100, max_ms=1000, multiplier=2, jitter=0.2)
    rng = random.Random(0)
    for retry, base in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        d = [b.delay_secs(retry, rng) for _ in range(50)]
        assert all(base * 0.8 <= x <= base * 1.2 for x in d)
        assert len(set(d)) > 1


def test_request_queue_waits_then_refuses() -> None:
    async def scenario() -> None:
        q = RequestQueue(max_concurrent=1, queue_size=1, timeout_secs=0.2)
        first = await q.acquire()
        waiter = asyncio.create_task(q.acquire())
        await asyncio.sleep(0)
        with pytest.raises(APIError) as full:
            await q.acquire()  # the one queue place is taken
        assert full.value.status == 429
        first.release()
        second = await waiter
        assert q.active == 1
        with pytest.raises(APIError) as late:
            await q.acquire()  # waits its 0.2 s, then gives up
        assert late.value.status == 429 and "queue-timeout-secs" in late.value.message
        second.release()
        second.release()  # idempotent
        assert q.active == 0 and q.waiting == 0 and q.refused == 2

    asyncio.run(scenario())


def test_prompt_tokens_read_every_api_and_never_raise(engines: list[Engine]) -> None:
    tok = engines[0].tokenizer
    assert prompt_tokens(tok, "/generate", {"text": "ab"}) == tuple(tok.encode("ab"))
    assert prompt_tokens(tok, "/generate", {"text": ["ab", "cd"]}) == tuple(tok.encode("ab"))
    assert prompt_tokens(tok, "/generate", {"input_ids": [[5, 6], [7]]}) == (5, 6)
    assert prompt_tokens(tok, "/v1/completions", {"prompt": [3, 4]}) == (3, 4)
    chat = [{"role": "user", "content": "hi"}]
    assert prompt_tokens(tok, "/v1/chat/completions", {"messages": chat}) == \
        tuple(tok.encode(tok.apply_chat_template(chat)))
    for bad in (None, [], {"text": 5}, {"input_ids": ["x"]}, {"messages": [{"role": 1}]}, "text"):
        assert prompt_tokens(tok, "/generate", bad) == () or isinstance(bad, dict)
        prompt_tokens(tok, "/v1/chat/completions", bad)
    assert max_new_tokens("/generate", {"sampling_params": {"max_new_tokens": 7}}) == 7
    assert max_new_tokens("/generate", {"sampling_params": [{"max_new_tokens": 9}]}) == 9
    assert max_new_tokens("/v1/completions", {"max_tokens": 5}) == 5
    assert max_new_tokens("/v1/chat/completions", {"max_completion_tokens": 6}) == 6
    assert max_new_tokens("/generate", {"sampling_params": "x"}) == 128


def test_dispatch_is_finished_once_on_every_path() -> None:
    args = RouterArgs(worker_urls=("http://127.0.0.1:1", "http://127.0.0.1:2"), policy="d2lpm")
    state = RouterState(args, build_policy("d2lpm", {}))

    async def scenario() -> None:
        reqs = [state.route_request(f"c{i}", (1, 2, 3), 4) for i in range(5)]
        ds = [await state.acquire(q) for q in reqs]
        assert state.in_flight() == 5
        for d in ds:
            d.finish(None, ok=False)
            d.finish(None, ok=False)  # a second finish is a no-op
        assert state.in_flight() == 0 and sum(w.tokens for w in state.workers.values()) == 0
        assert sum(w.failed for w in state.workers.values()) == 5

    asyncio.run(scenario())
    assert not state.policy.deficits or all(v <= 0 for d in state.policy.deficits.values() for v in d.values())


def test_router_cli_flags_come_from_the_configs() -> None:
    from radixfair.cli import build_parser
    from radixfair.router.serve import policy_values, router_args

    ns = build_parser().parse_args(["router", "--worker-urls", "http://a:1", "http://b:2", "--policy", "cache_aware",
                                    "--cache-threshold", "0.5", "--balance-abs-threshold", "8",
                                    "--balance-rel-threshold", "2", "--eviction-interval-secs", "5",
                                    "--max-tree-size", "1000", "--retry-max-retries", "2", "--port", "30081"])
    args = router_args(ns)
    assert args.worker_urls == ("http://a:1", "http://b:2") and args.port == 30081 and args.retry_max_retries == 2
    policy = build_policy(args.policy, policy_values(ns))
    cfg = policy.config
    assert (cfg.cache_threshold, cfg.balance_abs_threshold, cfg.balance_rel_threshold, cfg.eviction_interval_secs,
            cfg.max_tree_size) == (0.5, 8, 2.0, 5.0, 1000)
    with pytest.raises(ValueError, match="worker url"):
        RouterArgs(worker_urls=("localhost:3000",))
    with pytest.raises(ValueError, match="retry-jitter-factor"):
        RouterArgs(retry_jitter_factor=2)


def test_a_route_request_is_what_the_policy_sees() -> None:
    args = RouterArgs()
    keys = {"k": ServerClient("heavy", 3.0)}
    state = RouterState(args, build_policy("d2lpm", {}), keys)

    async def make() -> RouteRequest:
        return state.route_request("heavy", (1,), 2, "r")

    req = asyncio.run(make())
    assert (req.client_id, req.weight, req.rid, req.max_new_tokens) == ("heavy", 3.0, "r", 2)




def test_a_worker_that_takes_too_long_times_out_and_every_counter_is_released(
        router_factory: Callable[..., RouterUnderTest], engines: list[Engine]) -> None:
    r = router_factory("round_robin", request_timeout_secs=0.3, retry_max_retries=1,
                       health_check_interval_secs=3600)
    with r.http() as c:
        out = c.post("/generate", json={"text": "slow", "sampling_params": {"max_new_tokens": 3000, **GREEDY}})
    assert out.status_code == 502 and "after 1 retries" in out.json()["error"]["message"]
    assert r.state.retries == 1 and sum(w.failed for w in r.state.workers.values()) == 2
    r.wait_idle()
    drained(engines)  # the router closed both connections: each worker aborted its attempt


def test_a_worker_that_moved_is_swapped_in_from_another_thread(router_factory: Callable[..., RouterUnderTest],
                                                                workers: list[LiveServer]) -> None:
    """What `launch --ray` does when Ray restarts an actor at a new address (`RayFleet.sync`)."""
    from types import SimpleNamespace

    from radixfair.router.ray_workers import RayFleet

    a, b = workers[0].url, workers[1].url
    r = router_factory("round_robin", urls=[a])
    address = [a]
    actor = SimpleNamespace(url=SimpleNamespace(remote=lambda: address[0]))
    fleet = RayFleet.__new__(RayFleet)  # no Ray: a stand-in actor whose address changes
    fleet.ray = SimpleNamespace(get=lambda ref, timeout=None: ref)
    fleet.actors, fleet.urls = [actor], [a]
    fleet.sync(r.state)
    assert list(r.state.workers) == [a]  # unchanged: nothing to do
    address[0] = b
    threading.Thread(target=fleet.sync, args=(r.state,)).start()  # the follower runs in its own thread
    deadline = time.monotonic() + 10
    while list(r.state.workers) != [b]:
        assert time.monotonic() < deadline, list(r.state.workers)
        time.sleep(0.02)
    with r.http() as c:
        assert c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}}).status_code == 200
    assert r.state.workers[b].dispatched == 1 and fleet.urls == [b]
    r.wait_idle()


# ---- the fleet's fairness view, and recording its traffic --------------------------------------------------

FAIRNESS_FIELDS = {"policy", "quantum", "window_s", "throughput", "hit_rate", "kv_used", "clients", "workers"}
ROUTER_CLIENT_FIELDS = {"client", "service_rate", "waiting", "running", "deficit", "hit_rate", "ttft_p50", "ttft_p99",
                        "e2e_p50", "e2e_p99", "backlogged", "behind"}


def _wait_sampled(r: RouterUnderTest, within: float = 20.0) -> None:
    """The view's first sample, taken before any traffic: the base its rates count from."""
    deadline = time.monotonic() + within
    while r.state.fairness.latest is None:
        assert time.monotonic() < deadline, "the router's fairness view was never sampled"
        time.sleep(0.02)


def test_router_fairness_shows_the_fleets_clients_and_workers(router_factory: Callable[..., RouterUnderTest],
                                                              workers: list[LiveServer]) -> None:
    r = router_factory("d2lpm", fairness_window=30.0)
    _wait_sampled(r)
    doc = "A shared document about routing: " + " ".join(f"w{i}" for i in range(60))
    with r.http() as c:
        for i in range(3):
            out = c.post("/generate", json={"text": f"{doc} question {i}",
                                            "sampling_params": {"max_new_tokens": 4, **GREEDY}},
                         headers={"x-client-id": "fa"})
            assert out.status_code == 200, out.text
        with c.stream("POST", "/generate", json={"text": f"{doc} streamed", "stream": True,
                                                 "sampling_params": {"max_new_tokens": 4, **GREEDY}},
                      headers={"x-client-id": "fb"}) as s:
            assert sse_events(s.iter_lines())[-1] == "[DONE]"
        # a request in flight: its client is running (backlogged) and its worker holds it
        with c.stream("POST", "/generate", json={"text": "long one", "stream": True,
                                                 "sampling_params": {"max_new_tokens": 3000, **GREEDY}},
                      headers={"x-client-id": "fc"}) as s:
            lines = s.iter_lines()  # held: a dropped iterator closes the stream, which aborts it
            next(lines)
            # the workers' KV use is read every sampling interval: wait for a reading that sees it
            deadline = time.monotonic() + 20
            while (live := c.get("/fairness").json())["kv_used"] in (None, 0):
                assert time.monotonic() < deadline, live
                time.sleep(0.1)
        r.wait_idle()
        data = c.get("/fairness").json()
    rows = {row["client"]: row for row in live["clients"]}
    assert "fc" in rows, live
    assert rows["fc"]["running"] == 1 and rows["fc"]["waiting"] == 0 and rows["fc"]["backlogged"] is True
    held = [w for w in live["workers"] if "fc" in w["clients"]]
    assert held and held[0]["load"] == 1 and held[0]["clients"][0] == "fc"  # in flight there: listed first

    assert set(data) >= FAIRNESS_FIELDS
    assert data["policy"] == "d2lpm" and data["quantum"] == r.state.policy.config.router_quantum
    assert data["window_s"] == 30.0 and data["balance"] == "deficit"
    assert data["throughput"] > 0 and 0 < data["hit_rate"] <= 1  # the shared document was cached
    assert 0 < live["kv_used"] <= 1 and 0 < max(w["kv_used"] for w in live["workers"]) <= 1
    assert data["kv_used"] is not None and 0 <= data["kv_used"] <= 1
    rows = {row["client"]: row for row in data["clients"]}
    assert {"fa", "fb", "fc"} <= set(rows)
    assert rows["fc"]["service_rate"] > 0 and rows["fc"]["running"] == 0  # charged what it was sent, then left
    for name in ("fa", "fb"):
        row = rows[name]
        assert set(row) == ROUTER_CLIENT_FIELDS, row
        assert row["service_rate"] > 0 and row["waiting"] == 0 and row["running"] == 0
        assert row["backlogged"] is False and row["behind"] is False
        assert row["e2e_p50"] is not None and row["e2e_p99"] >= row["e2e_p50"] > 0
    assert rows["fa"]["hit_rate"] > 0  # its second and third requests found the document cached
    # TTFT: a stream's first event relayed; a whole native answer's first token at the worker, plus the
    # time before the router sent it
    for name in ("fa", "fb"):
        assert rows[name]["ttft_p50"] is not None and 0 < rows[name]["ttft_p50"] <= rows[name]["e2e_p50"]
    # the fleet's service per client is what the workers were charged for it
    assert r.state.service["fa"] == pytest.approx(sum(w.service.get("fa", 0.0) for w in r.state.workers.values()))
    assert [w["url"] for w in data["workers"]] == [w.url for w in workers]
    assert all(w["healthy"] is True and w["load"] == 0 and 0 <= w["kv_used"] <= 1 for w in data["workers"])
    assert {"fa", "fb", "fc"} <= {c for w in data["workers"] for c in w["clients"]}


def test_router_fairness_and_dashboard_need_the_operator_key(workers: list[LiveServer]) -> None:
    keys = {"sk-frank": ServerClient("frank")}
    args = RouterArgs(worker_urls=tuple(w.url for w in workers), worker_api_key=ROUTER_KEY,
                      admin_api_key=("sk-operator",))
    server = LiveServer(create_router_app(RouterState(args, build_policy("global_vtc", {}), keys)))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.get("/fairness").status_code == 401
            page = c.get("/dashboard", headers={"Accept": "text/html"})
            assert page.status_code == 401 and "Operator key" in page.text  # the page that asks for it
            frank = {"authorization": "Bearer sk-frank"}
            assert c.get("/fairness", headers=frank).status_code == 403
            assert c.get("/dashboard", headers={**frank, "Accept": "text/html"}).status_code == 403
            operator = {"authorization": "Bearer sk-operator"}
            data = c.get("/fairness", headers=operator).json()
            assert data["policy"] == "global_vtc" and data["quantum"] is None and data["balance"] == "counter"
            dash = c.get("/dashboard", headers={**operator, "Accept": "text/html"})
            assert dash.status_code == 200 and 'id="workers"' in dash.text
    finally:
        server.stop()


def test_router_records_a_trace_the_simulator_reads(router_factory: Callable[..., RouterUnderTest],
                                                    engines: list[Engine], tmp_path: Path) -> None:
    from radixfair.cli import main as cli_main
    from radixfair.sim.trace import BLOCK_SIZE, block_hashes, read_jsonl

    path = tmp_path / "router.jsonl"
    r = router_factory("d2lpm", record_trace=str(path))
    clients = ("ta", "tb")
    prompts: dict[str, list[int]] = {}
    with r.http() as c:
        for i in range(4):
            for client in clients:
                text = f"Document of {client}: " + " ".join(f"{client}-{k}" for k in range(80)) + f" Question {i}?"
                out = c.post("/generate", json={"text": text, "sampling_params": {"max_new_tokens": 5, **GREEDY}},
                             headers={"x-client-id": client})
                assert out.status_code == 200, out.text
                prompts[f"{client}{i}"] = list(engines[0].tokenizer.encode(text))
                assert out.json()["meta_info"]["prompt_tokens"] == len(prompts[f"{client}{i}"])
        # streamed through the router: recorded too
        with c.stream("POST", "/v1/completions", json={"prompt": "a streamed one", "max_tokens": 3, "stream": True,
                                                       "user": "tc", **GREEDY}) as s:
            assert sse_events(s.iter_lines())[-1] == "[DONE]"
        # refused by the worker: never ran, not recorded
        assert c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": -1}}).status_code == 400
    r.wait_idle()
    r.stop()  # closes the file
    trace = read_jsonl(path)
    assert len(trace) == 9 and {t.client for t in trace} == {"ta", "tb", "tc"}
    assert [t.time for t in trace] == sorted(t.time for t in trace) and trace[0].time >= 0
    docs = [t for t in trace if t.client != "tc"]
    assert all(t.output_len == 5 and t.block_size == BLOCK_SIZE for t in docs)
    assert "Document" not in path.read_text()  # hashes only: no prompt text, no token ids
    # the router tokenizes as the worker does: each record's block hashes are those of the worker's ids
    expected = {tuple(block_hashes(ids)) for ids in prompts.values()}
    chains = [tuple(g for g, _ in t.segments) for t in docs]
    assert set(chains) == expected
    # one client's prompts share their document's blocks; the two clients' share none
    ta = [ch for ch, t in zip(chains, docs, strict=True) if t.client == "ta"]
    tb = [ch for ch, t in zip(chains, docs, strict=True) if t.client == "tb"]
    assert ta[0][:3] == ta[1][:3] and not set(ta[0]) & set(tb[0])
    out = tmp_path / "sim.json"
    assert cli_main(["bench", "sim", "--trace", str(path), "--policies", "dlpm", "--profile", "cpu-smollm2",
                     "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows[0]["requests"] == 9 and rows[0]["hit_rate"] > 0.5, rows[0]
