"""`radixfair bench router`'s parts: the replay through a live router in front of a tiny worker, and
the row it reports."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from fixtures.live_server import LiveServer

from radixfair.bench.fairness_workload import FAIRNESS_TRACE, make_workload
from radixfair.bench.router_bench import _run_ours, row
from radixfair.engine.engine import Engine
from radixfair.metrics import RequestRecord
from radixfair.server import create_app

ROW_KEYS = {"policy", "throughput", "hit_rate", "jain", "p99_latency", "p99_latency_well_behaved", "retries"}


def test_row_has_the_issue_keys_and_separates_the_heavy_client() -> None:
    cfg = replace(FAIRNESS_TRACE, num_clients=2, duration=4.0, rate=1.0, doc_len=(8, 8), question_len=(2, 2),
                  output_len=(2, 2))
    wl = make_workload(cfg, 320)
    heavy, light = wl.clients[0], wl.clients[1]
    records = [RequestRecord(heavy, 0.0, 0.5, 9.0, 10, 0, 2),  # the heavy client waited long
               RequestRecord(light, 0.0, 0.1, 1.0, 10, 8, 2),
               RequestRecord(light, 1.0, None, None, 10, 0, 0)]  # never finished: no latency
    r = row("d2lpm", wl, records, elapsed=10.0, retries=3, window=1.0)
    assert set(r) >= ROW_KEYS
    assert r["throughput"] == pytest.approx(24 / 10.0)
    assert r["hit_rate"] == pytest.approx(8 / 20)
    assert r["p99_latency"] > 8.0 and r["p99_latency_well_behaved"] == pytest.approx(1.0)
    assert (r["retries"], r["requests"], r["finished"]) == (3, 3, 2)


def test_replay_through_the_router(tiny_llama: Path) -> None:
    cfg = replace(FAIRNESS_TRACE, num_clients=2, duration=2.0, rate=2.0, doc_len=(32, 48), question_len=(4, 8),
                  output_len=(2, 3))
    wl = make_workload(cfg, 320)
    with Engine(str(tiny_llama), dtype="float32", max_total_tokens=2048) as engine:
        worker = LiveServer(create_app(engine))
        try:
            texts = [engine.tokenizer.decode(a.input_ids) for a in wl.arrivals]
            records, elapsed, retries = _run_ours("d2lpm", [worker.url], wl, texts, cut=60.0)
        finally:
            worker.stop()
    assert len(records) == len(wl.arrivals) and all(r.finish is not None for r in records)
    assert {r.client for r in records} == set(wl.clients) and retries == 0 and elapsed > 0
    assert sum(r.cached_tokens for r in records) > 0  # each client's document was reused


