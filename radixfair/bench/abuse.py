"""`radixfair bench serve --abusive N`: the normal closed-loop clients of `bench serve`, once alone and
once beside N abusive clients, each sending one hostile request per second in a fixed rotation:

1. a batch of 5,000 prompts;
2. one prompt with `n: 128`;
3. a seed of 2**64;
4. 200,000 `stop_token_ids`;
5. a 2,000-token non-streaming request whose client leaves after 0.5 s.

Reported: the normal clients' end-to-end p99 in both runs, how many hostile requests were sent and
refused (4xx), every response >= 500 or request left unanswered (server errors, from anyone), and the
KV slots leaked once the server is idle again (its idle invariant, from `/get_server_info`, read with
the operator key when the server has one).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import httpx

HOSTILE_KINDS = ("batch_5000", "n_128", "seed_2_64", "stop_token_ids_200k", "dropped_2000")
DROP_AFTER_S = 0.5


@dataclass
class AbuseTally:
    sent: Counter[str] = field(default_factory=Counter)  # kind -> requests
    statuses: Counter[str] = field(default_factory=Counter)  # "kind status" -> responses
    refused: int = 0  # 4xx
    server_errors: int = 0  # >= 500, or no answer (a connection error)
    abandoned: int = 0  # still waiting for an answer when the run ended: the client left
    errors: list[str] = field(default_factory=list)  # the first few server errors, for the report

    def server_error(self, what: str) -> None:
        self.server_errors += 1
        if len(self.errors) < 10:
            self.errors.append(what)


def hostile_body(kind: str, rng: np.random.Generator, vocab_size: int, max_new_tokens: int) -> dict[str, Any]:
    prompt = rng.integers(10, vocab_size, 64).tolist()
    if kind == "batch_5000":
        return {"input_ids": [[int(t)] for t in rng.integers(10, vocab_size, 5000)],
                "sampling_params": {"max_new_tokens": max_new_tokens}}
    if kind == "n_128":
        return {"input_ids": prompt, "sampling_params": {"n": 128, "max_new_tokens": max_new_tokens,
                                                          "temperature": 1.0, "ignore_eos": True}}
    if kind == "seed_2_64":
        return {"input_ids": prompt, "sampling_params": {"seed": 2**64, "temperature": 1.0,
                                                          "max_new_tokens": max_new_tokens}}
    if kind == "stop_token_ids_200k":
        return {"input_ids": prompt, "sampling_params": {"stop_token_ids": list(range(200_000)),
                                                          "max_new_tokens": max_new_tokens}}
    if kind == "dropped_2000":
        return {"input_ids": prompt, "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
    raise ValueError(kind)


async def abusive_client(http: httpx.AsyncClient, client: str, index: int, stop_at: float, vocab_size: int,
                         max_new_tokens: int, tally: AbuseTally, seed: int) -> None:
    """One hostile request per second, in the fixed rotation (client k starts at kind k)."""
    import httpx

    rng = np.random.default_rng([seed, 7, index])
    pending: set[asyncio.Task[None]] = set()
    k = index
    next_at = time.perf_counter()
    while time.perf_counter() < stop_at:
        kind = HOSTILE_KINDS[k % len(HOSTILE_KINDS)]
        k += 1
        body = hostile_body(kind, rng, vocab_size, max_new_tokens)
        tally.sent[kind] += 1

        async def send(kind: str = kind, body: dict[str, Any] = body) -> None:
            timeout = httpx.Timeout(600.0, connect=10.0, read=DROP_AFTER_S if kind == "dropped_2000" else 600.0)
            try:
                r = await http.post("/generate", json=body, headers={"X-Client-Id": client}, timeout=timeout)
            except httpx.ReadTimeout:
                if kind != "dropped_2000":
                    tally.server_error(f"{kind}: no answer in 600 s")
                tally.statuses[f"{kind} dropped" if kind == "dropped_2000" else f"{kind} timeout"] += 1
                return
            except asyncio.CancelledError:
                tally.abandoned += 1  # the run ended first
                tally.statuses[f"{kind} abandoned"] += 1
                raise
            except httpx.HTTPError as e:
                tally.server_error(f"{kind}: {type(e).__name__}")
                return
            tally.statuses[f"{kind} {r.status_code}"] += 1
            if r.status_code >= 500:
                tally.server_error(f"{kind}: {r.status_code} {r.text[:200]}")
            elif r.status_code >= 400:
                tally.refused += 1

        task = asyncio.create_task(send())
        pending.add(task)
        task.add_done_callback(pending.discard)
        next_at += 1.0
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    # the abusive client leaves with the run: what the server is still working on for it (a fair
    # policy serves it slowly) is abandoned, as a client that disconnects, and the server must free it
    for task in list(pending):
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def run_with_abuse(normal: Callable[[], Awaitable[Any]], http: httpx.AsyncClient, n_abusive: int,
                         duration: float, vocab_size: int, max_new_tokens: int, seed: int) -> tuple[Any, AbuseTally]:
    """`normal()` (the closed-loop phase) beside `n_abusive` abusive clients, which send for `duration`
    seconds and leave when the normal clients are done."""
    tally = AbuseTally()
    stop_at = time.perf_counter() + duration
    abusers = [asyncio.create_task(abusive_client(http, f"abuser{k}", k, stop_at, vocab_size, max_new_tokens,
                                                  tally, seed)) for k in range(n_abusive)]
    result = await normal()
    await asyncio.gather(*abusers)
    return result, tally


async def leaked_slots(http: httpx.AsyncClient, headers: dict[str, str], timeout: float = 120.0) -> int | None:
    """KV slots neither free nor in the radix tree once nothing runs or waits (0 unless KV leaked);
    None if the server does not go idle within `timeout`."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        r = await http.get("/get_server_info", headers=headers)
        r.raise_for_status()
        stats = r.json()["stats"]
        if stats["running"] == 0 and stats["waiting"] == 0:
            return int(stats["leaked_slots"])
        await asyncio.sleep(0.2)
    return None
