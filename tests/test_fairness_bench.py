"""`bench fairness` end to end on a tiny random model: the trace, the replay, the analysis, the outputs."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
from fixtures.helpers import bounded

from radixfair.bench.fairness_workload import FAIRNESS_TRACE, make_workload
from radixfair.cli import main

ROW_FIELDS = {"policy", "throughput", "hit_rate", "jain", "max_service_diff", "avg_service_diff", "p50_latency",
              "p99_latency", "arrived", "completed", "clients", "timeline", "heavy_client"}


def test_workload_is_seeded_and_shaped() -> None:
    cfg = replace(FAIRNESS_TRACE, num_clients=4, duration=50, rate=2.0, heavy_factor=4, doc_len=(100, 120),
                  question_len=(5, 9), output_len=(3, 6), seed=7)
    wl = make_workload(cfg, vocab_size=1000)
    assert make_workload(cfg, vocab_size=1000) == wl
    assert make_workload(replace(cfg, seed=8), vocab_size=1000) != wl
    times = [a.time for a in wl.arrivals]
    assert times == sorted(times) and times[0] >= 0 and times[-1] < 50
    counts = {c: sum(a.client == c for a in wl.arrivals) for c in wl.clients}
    # Poisson counts around 100 per normal client, 400 for the heavy one
    assert wl.heavy_client == "c0" and counts["c0"] > 2.5 * max(counts[c] for c in ("c1", "c2", "c3"))
    assert wl.rate_of("c0") == 8.0 and wl.rate_of("c1") == 2.0 and wl.heavy_factor == 4
    # a client's document is what all its prompts share
    documents = {c: _common_prefix([a.input_ids for a in wl.arrivals if a.client == c]) for c in wl.clients}
    for a in wl.arrivals:
        doc = documents[a.client]
        assert 100 <= len(doc) <= 120
        assert 5 <= len(a.input_ids) - len(doc) <= 9 and 3 <= a.max_new_tokens <= 6
        assert all(100 <= t < 1000 for t in a.input_ids)  # none from the special range at the start
    # each client's document is its own
    assert len({tuple(d[:100]) for d in documents.values()}) == 4


def _common_prefix(seqs: list[list[int]]) -> list[int]:
    n = min(map(len, seqs))
    for i in range(n):
        if len({s[i] for s in seqs}) > 1:
            return seqs[0][:i]
    return seqs[0][:n]


def test_unknown_policy_fails_before_any_engine(capsys: pytest.CaptureFixture[str]) -> None:
    # the model path does not exist: the policy check must come first to produce this message
    rc = main(["bench", "fairness", "--policies", "fcfs,nope", "--model", "/nonexistent/model.gguf"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "fcfs" in err


def test_fcfs_run_end_to_end(tiny_llama: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "fair.json", tmp_path / "fair.png"
    argv = ["bench", "fairness", "--model", str(tiny_llama), "--dtype", "float32", "--policies", "fcfs",
            "--clients", "3", "--duration", "3", "--window", "1", "--rate", "3", "--doc-len", "48,96",
            "--question-len", "4,8", "--output-len", "4,8", "--max-total-tokens", "400", "--no-progress",
            "--json", str(out), "--plot", str(png)]
    t = time.monotonic()
    assert bounded(lambda: main(argv), timeout=60) == 0
    assert time.monotonic() - t < 20
    rows = json.loads(out.read_text())
    assert len(rows) == 1
    row = rows[0]
    assert row.keys() >= ROW_FIELDS and row["policy"] == "fcfs"
    assert 0 < row["completed"] <= row["arrived"]
    assert row["throughput"] > 0 and 0 <= row["hit_rate"] <= 1
    # documents repeat within a client, so some prompt tokens must come from the cache
    assert row["hit_rate"] > 0
    assert row["jain"] is None or 1 / 3 - 1e-9 <= row["jain"] <= 1 + 1e-9
    assert row["max_service_diff"] is None or row["max_service_diff"] >= row["avg_service_diff"] >= 0
    assert row["p99_latency"] >= row["p50_latency"] > 0
    clients = row["clients"]
    assert set(clients) == {"c0", "c1", "c2"} and row["heavy_client"] == "c0"
    assert sum(c["arrived"] for c in clients.values()) == row["arrived"]
    # the timeline is the per-client totals cut into windows
    timeline = row["timeline"]
    assert len(timeline["edges"]) == 4 and timeline["edges"][-1] == 3
    for c, info in clients.items():
        assert sum(timeline["service"][c]) == pytest.approx(info["service"])
    assert sum(c["service"] for c in clients.values()) > 0
    assert png.stat().st_size > 10_000


def test_workload_from_a_simulator_trace() -> None:
    """A trace the simulator runs is this benchmark's workload too: same arrivals, prompts expanded for
    the model's vocabulary, the busiest client as the heavy one, rates as the trace holds them."""
    from radixfair.bench.fairness_workload import workload_from_trace
    from radixfair.sim.trace import TraceConfig, generate

    trace = generate(TraceConfig(workload="judge", num_clients=3, duration=20, rate=0.5, heavy_factor=3,
                                 doc_len=(40, 60), candidate_len=(5, 9), output_len=(3, 6)))
    wl = workload_from_trace(trace, vocab_size=500)
    assert [(a.time, a.client, a.max_new_tokens) for a in wl.arrivals] == [
        (r.time, r.client, r.output_len) for r in trace]
    assert all(a.input_ids == r.input_ids(500) for a, r in zip(wl.arrivals, trace, strict=True))
    assert wl.clients == ("c0", "c1", "c2") and wl.heavy_client == "c0"
    span = wl.duration
    assert wl.rate_of("c0") == pytest.approx(sum(r.client == "c0" for r in trace) / span)
    cut = workload_from_trace(trace, vocab_size=500, duration=5.0)
    assert cut.duration == 5.0 and all(a.time < 5.0 for a in cut.arrivals) and len(cut.arrivals) < len(trace)
    with pytest.raises(ValueError, match="before"):
        workload_from_trace(trace, vocab_size=500, duration=1e-6)


def test_trace_run_end_to_end(tiny_llama: Path, tmp_path: Path) -> None:
    from radixfair.sim.trace import TraceConfig, generate, write_jsonl

    write_jsonl(tmp_path / "t.jsonl", generate(TraceConfig(
        workload="docqa", num_clients=2, duration=2.0, rate=2.0, doc_len=(48, 64), question_len=(4, 8),
        output_len=(4, 6))))
    out = tmp_path / "fair.json"
    argv = ["bench", "fairness", "--model", str(tiny_llama), "--dtype", "float32", "--policies", "dlpm",
            "--trace", str(tmp_path / "t.jsonl"), "--window", "0.5", "--max-total-tokens", "400",
            "--no-progress", "--json", str(out)]
    assert bounded(lambda: main(argv), timeout=60) == 0
    row = json.loads(out.read_text())[0]
    assert set(row["clients"]) == {"c0", "c1"} and row["completed"] > 0 and row["hit_rate"] > 0
    assert row["duration"] < 2.0  # the trace's span, not the default 90 s
