"""schemathesis against the server's own OpenAPI schema, on the tiny model: valid and invalid bodies
for every operation, bounded in examples and time. No response may be a 5xx, every 4xx names the
problem, and the server still generates afterwards."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from test_server import LiveServer

from radixfair.engine.engine import Engine
from radixfair.server import create_app

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402

# a longer run: RADIXFAIR_FUZZ_EXAMPLES=200 RADIXFAIR_FUZZ_SECONDS=600 pytest tests/test_fuzz.py
EXAMPLES_PER_OPERATION = int(os.environ.get("RADIXFAIR_FUZZ_EXAMPLES", "12"))
TIME_BUDGET_S = float(os.environ.get("RADIXFAIR_FUZZ_SECONDS", "60"))  # all operations and modes together


@pytest.fixture(scope="module")
def live(tiny_llama: Path) -> Iterator[tuple[Engine, LiveServer]]:
    # a short context bounds what a generated max_new_tokens can cost
    with Engine(str(tiny_llama), dtype="float32", max_total_tokens=4096, context_length=128) as e:
        srv = LiveServer(create_app(e))
        yield e, srv
        srv.stop()


def test_openapi_schema_describes_the_request_bodies(live: tuple[Engine, LiveServer]) -> None:
    _, srv = live
    spec = httpx.get(srv.url + "/openapi.json", timeout=10).json()
    for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        name = body["$ref"].rsplit("/", 1)[-1]
        props = spec["components"]["schemas"][name]["properties"]
        assert props, path
    gen = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"text", "input_ids", "sampling_params", "stream", "return_logprob", "rid"} <= set(gen)
    sp = spec["components"]["schemas"]["SamplingParamsBody"]["properties"]
    assert {"max_new_tokens", "temperature", "seed", "stop", "stop_token_ids", "n"} <= set(sp)


def test_schemathesis_finds_no_server_error(live: tuple[Engine, LiveServer]) -> None:
    engine, srv = live
    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
    statuses: Counter[int] = Counter()
    bad: list[str] = []
    deadline = time.monotonic() + TIME_BUDGET_S

    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = op.as_strategy(generation_mode=mode)

            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def run(case: Any) -> None:
                if time.monotonic() > deadline:
                    return
                r = case.call(base_url=srv.url, timeout=30)
                statuses[r.status_code] += 1
                where = f"{case.method} {case.path} {str(case.body)[:200]!r}"
                if r.status_code >= 500:
                    bad.append(f"{r.status_code} for {where}: {r.text[:300]}")
                elif r.status_code >= 400:
                    try:
                        message = r.json()["error"]["message"]
                    except Exception:
                        message = None
                    if not message:
                        bad.append(f"{r.status_code} without a message for {where}: {r.text[:300]}")

            try:
                run()
            except Unsatisfiable:  # no invalid input exists for an operation without parameters
                assert mode is GenerationMode.NEGATIVE, op.label
    print(f"schemathesis: {sum(statuses.values())} calls, statuses {dict(sorted(statuses.items()))}")
    assert not bad, "\n".join(bad[:10])
    assert sum(statuses.values()) >= 50, statuses  # the run was not cut short to nothing
    assert any(400 <= s < 500 for s in statuses) and 200 in statuses, statuses
    assert httpx.get(srv.url + "/health_generate", timeout=30).status_code == 200
    engine.wait_idle(timeout=30)
    assert engine.get_stats().leaked_slots == 0
