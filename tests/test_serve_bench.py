"""`radixfair bench serve` against a live server over the tiny model, plus its in-process phase."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.live_server import LiveServer

from radixfair.bench import serve_bench
from radixfair.engine.engine import Engine
from radixfair.server import create_app


@pytest.fixture(scope="module")
def live(tiny_llama: Path) -> Iterator[tuple[Engine, LiveServer]]:
    with Engine(str(tiny_llama), dtype="float32", max_total_tokens=4096) as e:
        srv = LiveServer(create_app(e))
        yield e, srv
        srv.stop()
        assert not srv.thread.is_alive()


def test_serve_bench_http_and_inprocess(live: tuple[Engine, LiveServer], tmp_path: Path) -> None:
    engine, srv = live
    out = tmp_path / "serve.json"
    ns = argparse.Namespace(url=srv.url, clients=2, duration=1.5, max_new_tokens=8, seed=0, no_inprocess=False,
                            json=str(out))
    t = time.monotonic()
    assert serve_bench.main(ns) == 0
    assert time.monotonic() - t < 30
    res = json.loads(out.read_text())
    for k in ("http_req_s", "inprocess_req_s", "http_mean_e2e", "inprocess_mean_e2e", "http_overhead"):
        assert isinstance(res[k], float), k
    assert res["http_req_s"] > 0 and res["inprocess_req_s"] > 0
    assert res["http_overhead"] == pytest.approx(res["http_mean_e2e"] / res["inprocess_mean_e2e"] - 1)
    assert [c["client"] for c in res["clients"]] == ["c0", "c1"]
    for c in res["clients"]:
        for mode in ("http", "inprocess"):
            s = c[mode]
            assert s["requests"] >= 1
            assert 0 < s["ttft_p50"] <= s["ttft_p99"] < 30
            assert 0 < s["itl_p50"] <= s["itl_p99"] < 30
    # the server saw both clients by name, and was left clean
    engine.wait_idle(timeout=20)
    assert engine.check_invariant()[2] == 0


def test_serve_bench_no_inprocess(live: tuple[Engine, LiveServer]) -> None:
    _, srv = live
    ns = argparse.Namespace(url=srv.url, clients=1, duration=0.3, max_new_tokens=4, seed=1, no_inprocess=True,
                            json=None)
    res = serve_bench.run(ns)
    assert res["inprocess_req_s"] is None and res["http_overhead"] is None
    assert res["clients"][0]["inprocess"] is None and res["clients"][0]["http"]["requests"] >= 1


def test_engine_kwargs_from_info(live: tuple[Engine, LiveServer]) -> None:
    import httpx

    engine, srv = live
    info = httpx.get(srv.url + "/get_server_info", timeout=10).json()
    kw = serve_bench.engine_kwargs_from_info(info)
    assert kw["model"] == engine.model_path and kw["max_total_tokens"] == 4096 and kw["dtype"] == "float32"
    assert kw["schedule_policy"] == engine.args.schedule_policy
    assert kw["chunked_prefill_size"] == engine.args.chunked_prefill_size
    assert info["vocab_size"] == engine.model_config.vocab_size


def test_serve_bench_abusive_clients(live: tuple[Engine, LiveServer], tmp_path: Path) -> None:
    """Every hostile kind once (duration 5 s, one request per second): the refused ones are 4xx, nothing
    is a 5xx or unanswered, and no KV slot leaks."""
    engine, srv = live
    out = tmp_path / "abuse.json"
    ns = argparse.Namespace(url=srv.url, clients=2, duration=5.0, max_new_tokens=4, seed=0, no_inprocess=False,
                            json=str(out), abusive=1, admin_key=None)
    assert serve_bench.main(ns) == 0
    res = json.loads(out.read_text())
    for k in ("abusive_requests", "abusive_refused", "server_errors", "e2e_p99", "e2e_p99_no_abuse", "leaked_slots"):
        assert k in res, k
    assert res["abusive_requests"] == 5 and set(res["abusive_sent"]) == set(serve_bench_abuse_kinds())
    statuses = res["abusive_statuses"]
    assert statuses.get("batch_5000 400") == 1 and statuses.get("seed_2_64 400") == 1
    assert statuses.get("stop_token_ids_200k 400") == 1 and statuses.get("dropped_2000 dropped") == 1
    assert res["abusive_refused"] >= 3
    assert res["server_errors"] == 0, res["server_error_samples"]
    assert res["leaked_slots"] == 0 and res["e2e_p99"] > 0 and res["e2e_p99_no_abuse"] > 0
    engine.wait_idle(timeout=20)
    assert engine.check_invariant()[2] == 0


def serve_bench_abuse_kinds() -> tuple[str, ...]:
    from radixfair.bench.abuse import HOSTILE_KINDS

    return HOSTILE_KINDS
