"""DLPM's quantum against locality and fairness, on a long-document QA workload.

The production scheduler and policy run with a stand-in executor (every sampled token is the same
id; nothing checks KV contents) over a KV pool too small for every client's documents, so the order
in which questions are served decides what the cache keeps. Each client asks questions about its
own documents, arriving faster than they can be served, so all clients stay backlogged.

Per policy it reports the prefix-cache hit rate, the prompt tokens actually computed, the number of
forward passes, a modelled run time (`t = a + b * prefill tokens + c * decode requests` per pass),
and the largest service difference between two clients over an interval in which both stayed
backlogged (charged service as DLPM counts it: uncached prompt tokens + w_out * output tokens).

`python -m radixfair.sched.quantum_bench` prints the table the README quotes.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from radixfair.sampling_params import SamplingParams
from radixfair.sched.batch import BatchMode, BatchOutput
from radixfair.sched.policies import PolicyConfig, make_policy
from radixfair.sched.policies.meter import MeteredPolicy
from radixfair.sched.request import Req
from radixfair.sched.scheduler import Scheduler, SchedulerConfig


@dataclass(frozen=True)
class DocQAShape:
    clients: int = 8
    docs_per_client: int = 3
    doc_len: int = 3000
    questions_per_client: int = 60
    question_len: int = 24
    output_len: tuple[int, int] = (16, 64)
    arrivals_per_step: float = 0.5  # per client: faster than the server drains them
    flood: float = 1.0  # client0 sends this many times more questions, this much faster (S1)
    pool: int = 24_576
    max_running: int = 32
    # modelled pass time in ms: a Llama-3-8B-on-one-A100-like shape, illustrative only
    pass_ms: float = 8.0
    prefill_token_ms: float = 0.07
    decode_req_ms: float = 0.1


Arrival = tuple[str, list[int], int]  # client, prompt, max_new_tokens


def workload(shape: DocQAShape, seed: int) -> dict[int, list[Arrival]]:
    rng = np.random.default_rng(seed)
    docs = [[rng.integers(10, 30_000, shape.doc_len).tolist() for _ in range(shape.docs_per_client)]
            for _ in range(shape.clients)]
    arrivals: dict[int, list[Arrival]] = {}
    for u in range(shape.clients):
        t = 0.0
        boost = shape.flood if u == 0 else 1.0
        for _ in range(int(shape.questions_per_client * boost)):
            t += rng.exponential(1 / (shape.arrivals_per_step * boost))
            doc = docs[u][int(rng.integers(shape.docs_per_client))]
            prompt = [*doc, *rng.integers(10, 30_000, shape.question_len).tolist()]
            arrivals.setdefault(int(t), []).append((f"client{u}", prompt, int(rng.integers(*shape.output_len))))
    return arrivals


def run(policy: str, quantum: float, shape: DocQAShape, seed: int = 0) -> dict[str, float]:
    cfg = PolicyConfig(dlpm_quantum=quantum)
    s = Scheduler(
        SchedulerConfig(max_total_tokens=shape.pool, max_running_requests=shape.max_running),
        MeteredPolicy(make_policy(policy, cfg), charge_cached=False),  # one yardstick for all
    )
    arrivals = workload(shape, seed)
    last = max(arrivals)
    assert isinstance(s.policy, MeteredPolicy)
    service = s.policy.service
    points: list[tuple[dict[str, float], set[str]]] = []
    step = passes = 0
    ms = 0.0
    n = itertools.count()
    while step <= last or not s.is_idle():
        # built on arrival: a request's arrival time (FCFS order, VTC's "oldest") is its creation
        for client, prompt, out in arrivals.get(step, []):
            params = SamplingParams(max_new_tokens=out, ignore_eos=True)
            s.add_request(Req(origin_input_ids=prompt, sampling_params=params, rid=f"r{next(n)}", client_id=client))
        step += 1
        points.append((dict(service), {r.client_id for r in s.waiting}))
        batch = s.schedule()
        s.pop_dropped()
        if batch is None:
            continue
        passes += 1
        if batch.mode is BatchMode.PREFILL:
            ms += shape.pass_ms + shape.prefill_token_ms * batch.num_tokens
        else:
            ms += shape.pass_ms + shape.decode_req_ms * len(batch.reqs)
        s.process_output(batch, BatchOutput(next_token_ids=[7 if x else -1 for x in batch.sample]))
    points.append((dict(service), set()))
    return {
        "hit_rate": s.stats().hit_rate,
        "prefill_tokens": s.stats().prefill_tokens,
        "passes": passes,
        "modelled_s": ms / 1e3,
        "max_service_diff": max_backlogged_difference(points),
    }


def max_backlogged_difference(points: Sequence[tuple[dict[str, float], set[str]]]) -> float:
    """Largest |W_f - W_g| gained over an interval in which f and g both had requests waiting."""
    clients = sorted({u for w, _ in points for u in w})
    worst = 0.0
    for f, g in itertools.combinations(clients, 2):
        lo = hi = None
        for w, backlogged in points:
            d = w.get(f, 0.0) - w.get(g, 0.0)
            if lo is not None and hi is not None:
                worst = max(worst, d - lo, hi - d)
                lo, hi = min(lo, d), max(hi, d)
            if {f, g} <= backlogged:
                if lo is None:
                    lo = hi = d
            else:
                lo = hi = None
    return worst


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m radixfair.sched.quantum_bench", description=__doc__.split("\n")[0])
    p.add_argument("--quanta", default="256,1024,4096,16384")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--flood", type=float, default=1.0, help="S1: client0 sends this many times more")
    ns = p.parse_args(argv)
    shape = DocQAShape(flood=ns.flood)
    rows = [("fcfs", 0.0), ("vtc", 0.0), ("lpm", 0.0)] + [("dlpm", float(q)) for q in ns.quanta.split(",")]
    print(f"{'policy':>12} {'hit rate':>9} {'prefill tok':>12} {'passes':>7} {'model s':>8} {'max diff':>9}")
    for name, q in rows:
        runs = [run(name, q or 4096, shape, seed) for seed in range(ns.seeds)]
        mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        label = f"dlpm Q={int(q)}" if name == "dlpm" else name
        print(f"{label:>12} {mean['hit_rate']:9.3f} {mean['prefill_tokens']:12.0f} {mean['passes']:7.0f} "
              f"{mean['modelled_s']:8.1f} {mean['max_service_diff']:9.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
