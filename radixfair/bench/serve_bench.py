"""`radixfair bench serve`: closed-loop streaming clients against a running server, then the same
workload in-process through `Engine.async_generate`, so the cost of HTTP is a ratio.

Each client sends one `/generate` stream at a time (`X-Client-Id: cK`), greedy with `ignore_eos`, a
prompt of seeded random token ids, and sends the next as soon as the previous one ends. Token
arrival times are taken as the client sees them (SSE chunks over HTTP, queue outputs in-process).
The two phases run one after the other, so they do not compete for the CPU: the server is left
idle while the in-process engine (built with the server's own engine arguments from
`GET /get_server_info`) runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from radixfair.bench.report import print_table, write_json
from radixfair.io_struct import EngineRequest
from radixfair.sampling_params import SamplingParams

if TYPE_CHECKING:
    import httpx

    from radixfair.engine.engine import Engine

PROMPT_RANGE = (64, 256)
# one request as a client sees it: given (prompt ids, max new tokens), yields the token count so far per chunk
Stream = Callable[[list[int], int], AsyncIterator[int]]


@dataclass
class ClientStats:
    client: str
    requests: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"requests": self.requests, "ttft_p50": _pct(self.ttft, 50), "ttft_p99": _pct(self.ttft, 99),
                "itl_p50": _pct(self.itl, 50), "itl_p99": _pct(self.itl, 99), "mean_e2e": _mean(self.e2e)}


@dataclass
class PhaseResult:
    clients: list[ClientStats]
    elapsed: float

    @property
    def requests(self) -> int:
        return sum(c.requests for c in self.clients)

    @property
    def req_s(self) -> float:
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def mean_e2e(self) -> float | None:
        return _mean([x for c in self.clients for x in c.e2e])


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def make_prompt(rng: np.random.Generator, vocab_size: int) -> list[int]:
    n = int(rng.integers(PROMPT_RANGE[0], PROMPT_RANGE[1] + 1))
    lo = min(10, vocab_size - 1)
    return rng.integers(lo, vocab_size, n).tolist()


async def run_phase(streams: list[Stream], duration: float, max_new_tokens: int, vocab_size: int,
                    seed: int, on_error: Callable[[str], None] | None = None) -> PhaseResult:
    """One closed loop per stream (client) for `duration` seconds; requests in flight at the end are
    finished (each is bounded by `max_new_tokens`) and counted. With `on_error`, a request that fails
    is reported there (and not counted) instead of ending the run."""
    # warm up outside the measurement (first-call costs: kernels, allocator, connections)
    await _one(streams[0], make_prompt(np.random.default_rng([seed, 1 << 20]), vocab_size), max_new_tokens, None)
    stats = [ClientStats(f"c{k}") for k in range(len(streams))]
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def loop(k: int) -> None:
        rng = np.random.default_rng([seed, k])  # the same prompt sequence in both phases
        while time.perf_counter() < deadline:
            try:
                await _one(streams[k], make_prompt(rng, vocab_size), max_new_tokens, stats[k])
            except Exception as e:
                if on_error is None:
                    raise
                on_error(f"{stats[k].client}: {e}")
                await asyncio.sleep(0.1)

    await asyncio.gather(*(loop(k) for k in range(len(streams))))
    return PhaseResult(stats, time.perf_counter() - t0)


async def _one(stream: Stream, prompt: list[int], max_new_tokens: int, st: ClientStats | None) -> None:
    start = time.perf_counter()
    last: float | None = None
    seen = 0
    ttft: float | None = None
    gaps: list[float] = []
    async for n in stream(prompt, max_new_tokens):
        now = time.perf_counter()
        if n <= seen:
            continue
        if last is None:
            ttft = now - start
        else:
            gaps.extend([(now - last) / (n - seen)] * (n - seen))  # a chunk of several tokens: spread it
        last, seen = now, n
    end = time.perf_counter()
    if st is None:
        return
    if seen < max_new_tokens:
        raise RuntimeError(f"a request ended after {seen} of {max_new_tokens} tokens")
    st.requests += 1
    if ttft is not None:
        st.ttft.append(ttft)
    st.itl.extend(gaps)
    st.e2e.append(end - start)


def http_stream(http: httpx.AsyncClient, client: str, headers: dict[str, str] | None = None) -> Stream:
    async def stream(prompt: list[int], max_new_tokens: int) -> AsyncIterator[int]:
        body = {"input_ids": prompt, "stream": True,
                "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
        async with http.stream("POST", "/generate", json=body,
                               headers={**(headers or {}), "X-Client-Id": client}) as r:
            if r.status_code != 200:
                await r.aread()
                raise RuntimeError(f"/generate answered {r.status_code}: {r.text}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    return
                event = json.loads(payload)
                if "error" in event:
                    raise RuntimeError(f"the stream failed: {event['error']}")
                yield int(event["meta_info"]["completion_tokens"])

    return stream


def engine_stream(engine: Engine, client: str) -> Stream:
    async def stream(prompt: list[int], max_new_tokens: int) -> AsyncIterator[int]:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
        req = EngineRequest(input_ids=prompt, sampling_params=params, client_id=client)
        async for out in engine.generate_async(req):
            yield out.completion_tokens

    return stream


def engine_kwargs_from_info(info: dict[str, Any]) -> dict[str, Any]:
    """The server's engine arguments, as `Engine(**kw)` takes them, from `GET /get_server_info`."""
    from radixfair.engine_args import EngineArgs

    args = dict(info.get("engine_args") or info)
    names = {f.name for f in fields(EngineArgs)}
    kw = {k: v for k, v in args.items() if k in names}
    # the resolved model and pool size, so that the in-process engine is the server's exactly
    # (the resolved file or folder, which the server shows operators; else the model argument as the
    # server was given it)
    if "model_file" in info:
        kw["model"] = info["model_file"]
        kw.pop("gguf_file", None)  # already picked
    kw["max_total_tokens"] = info["max_total_tokens"]
    kw["device"] = info.get("device", kw.get("device", "auto"))
    if str(kw.get("dtype", "auto")).startswith("torch."):
        kw["dtype"] = str(info.get("dtype", "auto")).removeprefix("torch.")
    return kw


async def _http_phase(url: str, ns: argparse.Namespace) -> tuple[dict[str, Any], PhaseResult]:
    import httpx

    limits = httpx.Limits(max_connections=ns.clients + 4, max_keepalive_connections=ns.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0, connect=10.0), limits=limits) as http:
        r = await http.get("/get_server_info")
        r.raise_for_status()
        info: dict[str, Any] = r.json()
        await http.post("/flush_cache")  # best effort: an earlier run's prompts would be cache hits

        def wrap(c: str) -> Stream:
            return http_stream(http, c)

        res = await _phase(wrap, ns, int(info["vocab_size"]))
    return info, res


async def _phase(wrap: Callable[[str], Stream], ns: argparse.Namespace, vocab_size: int) -> PhaseResult:
    streams = [wrap(f"c{k}") for k in range(ns.clients)]
    return await run_phase(streams, ns.duration, ns.max_new_tokens, vocab_size, ns.seed)


def _inprocess_phase(info: dict[str, Any], ns: argparse.Namespace) -> PhaseResult:
    from radixfair.engine.engine import Engine

    with Engine(**engine_kwargs_from_info(info)) as engine:
        def wrap(c: str) -> Stream:
            return engine_stream(engine, c)

        async def go() -> PhaseResult:
            res = await _phase(wrap, ns, int(info["vocab_size"]))
            await asyncio.to_thread(engine.wait_idle, 60.0)
            return res

        return asyncio.run(go())


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def _admin_headers(ns: argparse.Namespace) -> dict[str, str]:
    key = getattr(ns, "admin_key", None)
    return {"Authorization": f"Bearer {key}"} if key else {}


async def _abuse_run(url: str, ns: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from radixfair.bench.abuse import leaked_slots, run_with_abuse

    headers = _admin_headers(ns)
    n = ns.clients + 4
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    timeout = httpx.Timeout(600.0, connect=10.0)
    # the abusive clients get their own connections, as separate machines would: sharing one pool,
    # their long requests would hold its connections and the normal clients' requests would queue
    # for one here, in the benchmark, before reaching the server
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http, \
            httpx.AsyncClient(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=None)) as abuse_http:
        r = await http.get("/get_server_info", headers=headers)
        r.raise_for_status()
        info: dict[str, Any] = r.json()
        vocab = int(info["vocab_size"])
        await http.post("/flush_cache", headers=headers)
        normal_errors: list[str] = []

        async def phase() -> PhaseResult:
            streams = [http_stream(http, f"c{k}") for k in range(ns.clients)]
            return await run_phase(streams, ns.duration, ns.max_new_tokens, vocab, ns.seed, normal_errors.append)

        print(f"normal clients alone: {ns.clients} clients for {ns.duration:g}s ...", flush=True)
        alone = await phase()
        before = await leaked_slots(http, headers)
        print(f"beside {ns.abusive} abusive clients ...", flush=True)
        abused, tally = await run_with_abuse(phase, abuse_http, ns.abusive, ns.duration, vocab, ns.max_new_tokens, ns.seed)
        leaked = await leaked_slots(http, headers)
    for e in normal_errors:
        tally.server_error(f"normal client: {e}")

    def p99(res: PhaseResult) -> float | None:
        return _pct([x for c in res.clients for x in c.e2e], 99)

    e2e, base = p99(abused), p99(alone)
    return {"url": url, "model_path": info["model_path"], "clients_n": ns.clients, "abusive_n": ns.abusive,
            "duration": ns.duration, "max_new_tokens": ns.max_new_tokens,
            "abusive_requests": sum(tally.sent.values()), "abusive_refused": tally.refused,
            "abusive_abandoned": tally.abandoned,
            "server_errors": tally.server_errors, "e2e_p99": e2e, "e2e_p99_no_abuse": base,
            "e2e_p99_ratio": e2e / base if e2e is not None and base else None,
            "leaked_slots": leaked, "leaked_slots_before_abuse": before,
            "normal_requests": abused.requests, "normal_requests_no_abuse": alone.requests,
            "normal_req_s": abused.req_s, "normal_req_s_no_abuse": alone.req_s,
            "abusive_sent": dict(tally.sent), "abusive_statuses": dict(sorted(tally.statuses.items())),
            "server_error_samples": tally.errors}


def print_abuse_report(res: dict[str, Any]) -> None:
    rows = [[k, str(res[k]) if not isinstance(res[k], float) else f"{res[k]:.3f}"]
            for k in ("abusive_requests", "abusive_refused", "abusive_abandoned", "server_errors", "e2e_p99",
                      "e2e_p99_no_abuse",
                      "e2e_p99_ratio", "leaked_slots", "normal_requests", "normal_requests_no_abuse")
            if res[k] is not None]
    print_table(["figure", "value"], rows, title=f"bench serve --abusive {res['abusive_n']}: {res['clients_n']} "
                                                 f"normal clients, {res['duration']:g}s", width=120)
    print_table(["hostile request, answer", "count"], [[k, str(v)] for k, v in res["abusive_statuses"].items()],
                width=120)


def run(ns: argparse.Namespace) -> dict[str, Any]:
    url = ns.url.rstrip("/")
    if getattr(ns, "abusive", 0):
        return asyncio.run(_abuse_run(url, ns))
    print(f"http: {ns.clients} clients for {ns.duration:g}s against {url} ...", flush=True)
    info, http_res = asyncio.run(_http_phase(url, ns))
    inproc: PhaseResult | None = None
    if not ns.no_inprocess:
        print(f"in-process: the same workload on {info['model_path']} ...", flush=True)
        inproc = _inprocess_phase(info, ns)
    h_e2e = http_res.mean_e2e
    i_e2e = inproc.mean_e2e if inproc is not None else None
    overhead = h_e2e / i_e2e - 1 if h_e2e is not None and i_e2e else None
    clients = []
    for k, hc in enumerate(http_res.clients):
        clients.append({"client": hc.client, "http": hc.summary(),
                        "inprocess": inproc.clients[k].summary() if inproc is not None else None})
    return {"url": url, "model_path": info["model_path"], "clients_n": ns.clients, "duration": ns.duration,
            "max_new_tokens": ns.max_new_tokens,
            "http_req_s": http_res.req_s, "inprocess_req_s": inproc.req_s if inproc is not None else None,
            "http_mean_e2e": h_e2e, "inprocess_mean_e2e": i_e2e, "http_overhead": overhead,
            "clients": clients}


def print_report(res: dict[str, Any]) -> None:
    header = ["client", "mode", "requests", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "e2e ms"]
    rows = []
    for c in res["clients"]:
        for mode in ("http", "inprocess"):
            s = c[mode]
            if s is None:
                continue
            rows.append([c["client"], mode, str(s["requests"]), _ms(s["ttft_p50"]), _ms(s["ttft_p99"]),
                         _ms(s["itl_p50"]), _ms(s["itl_p99"]), _ms(s["mean_e2e"])])
    print_table(header, rows, title=f"bench serve: {res['clients_n']} clients, {res['duration']:g}s, "
                                    f"{res['max_new_tokens']} new tokens", width=120)
    inp = res["inprocess_req_s"]
    summary = [["http", f"{res['http_req_s']:.2f}", _ms(res["http_mean_e2e"])]]
    if inp is not None:
        summary.append(["in-process", f"{inp:.2f}", _ms(res["inprocess_mean_e2e"])])
    print_table(["mode", "requests/s", "mean e2e ms"], summary, width=120)
    if res["http_overhead"] is not None:
        print(f"http_overhead = mean_e2e_http / mean_e2e_inprocess - 1 = {res['http_overhead'] * 100:+.1f}%")


def main(ns: argparse.Namespace) -> int:
    if ns.clients < 1 or ns.duration <= 0 or ns.max_new_tokens < 1:
        raise ValueError("--clients and --max-new-tokens must be >= 1 and --duration > 0")
    if getattr(ns, "abusive", 0) < 0:
        raise ValueError("--abusive must be >= 0")
    res = run(ns)
    if getattr(ns, "abusive", 0):
        print_abuse_report(res)
    else:
        print_report(res)
    write_json(ns.json, res)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="streaming clients against a running server vs the same load in-process")
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:30000")
    p.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients")
    p.add_argument("--duration", type=float, default=30.0, help="seconds each phase sends requests")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-inprocess", action="store_true", help="skip the in-process comparison")
    p.add_argument("--abusive", type=int, default=0, metavar="N",
                   help="instead of the in-process comparison: run the clients alone, then beside N abusive "
                        "clients (one hostile request per second each) and report the p99 ratio and failures")
    p.add_argument("--admin-key", default=None, metavar="KEY",
                   help="operator key of the server (--admin-api-key), to flush its cache and read its KV state")
    p.add_argument("--json", default=None)
    p.set_defaults(func=main)

