"""How long one scheduling decision takes with thousands of waiting requests.

A 200k-token radix tree (100 clients, each with long documents under a shared system prompt and a
few past questions per document) and 4,096 waiting requests from those clients: most ask a new
question about a cached document, some continue a past exchange, a few bring a new document. Each
timed step is `Scheduler.schedule()` (policy order + admission pass + batch assembly); between steps
(untimed) the batch "runs", its requests finish and new ones arrive so 4,096 keep waiting.

`python -m radixfair.bench.schedule_bench` prints the medians; the re-match line is what SGLang's LPM would
pay per decision (match every waiting request against the tree, then sort), which is why it falls
back to FCFS past 128 waiting requests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from radixfair.sampling_params import SamplingParams
from radixfair.sched.batch import BatchOutput
from radixfair.sched.policies import make_policy
from radixfair.sched.request import Req
from radixfair.sched.scheduler import Scheduler, SchedulerConfig
from radixfair.sim.trace import group_tokens


@dataclass(frozen=True)
class BenchShape:
    clients: int = 100
    docs_per_client: int = 2
    system_len: int = 64
    doc_len: int = 800
    past_questions: int = 8  # per document, already in the tree
    question_len: int = 25
    answer_len: int = 25
    waiting: int = 4096
    pool: int = 262_144


class Workload:
    """Token streams for the benchmark, named as in simulator traces (`radixfair.sim.trace`): the
    shared system prompt, each client's documents, the past exchanges already in the tree and every
    fresh question. A shared stream is expanded once and its ids reused by every prompt quoting it."""

    def __init__(self, shape: BenchShape, seed: int = 0) -> None:
        self.shape = shape
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.system = group_tokens(f"system/{seed}", shape.system_len)
        self.docs = [
            [self.system + group_tokens(f"doc/{seed}/{u}/{d}", shape.doc_len) for d in range(shape.docs_per_client)]
            for u in range(shape.clients)
        ]
        self.past = [
            [doc + group_tokens(f"past/{seed}/{u}/{d}/{k}", shape.question_len + shape.answer_len)
             for k in range(shape.past_questions)]
            for u, docs in enumerate(self.docs)
            for d, doc in enumerate(docs)
        ]
        self._n = 0

    def history(self) -> list[list[int]]:
        return [seq for seqs in self.past for seq in seqs]

    def request(self) -> Req:
        s = self.shape
        u = int(self.rng.integers(s.clients))
        kind = self.rng.random()
        self._n += 1
        if kind < 0.85:  # a new question about a cached document
            prompt = self.docs[u][int(self.rng.integers(s.docs_per_client))] + self._fresh(s.question_len)
        elif kind < 0.95:  # a follow-up to a past exchange
            past = self.past[u * s.docs_per_client + int(self.rng.integers(s.docs_per_client))]
            prompt = past[int(self.rng.integers(len(past)))] + self._fresh(s.question_len)
        else:  # a new document
            prompt = self.system + self._fresh(s.doc_len + s.question_len)
        return Req(
            origin_input_ids=prompt,
            sampling_params=SamplingParams(max_new_tokens=1, ignore_eos=True),
            rid=f"b{self._n}",
            client_id=f"client{u}",
        )

    def _fresh(self, n: int) -> list[int]:
        return group_tokens(f"q/{self.seed}/{self._n}", n)


def build(policy: str, shape: BenchShape, seed: int = 0) -> tuple[Scheduler, Workload]:
    sched = Scheduler(SchedulerConfig(max_total_tokens=shape.pool), make_policy(policy))
    work = Workload(shape, seed)
    for seq in work.history():
        slots = sched.kv.allocator.alloc(len(seq))
        assert slots is not None, "the pool must hold the whole history"
        dup = sched.kv.tree.insert(seq, slots)
        sched.kv.allocator.free(slots[:dup])
    for _ in range(shape.waiting):
        sched.add_request(work.request())
    return sched, work


def time_decisions(policy: str, shape: BenchShape, steps: int, seed: int = 0) -> dict[str, float]:
    sched, work = build(policy, shape, seed)
    decide: list[float] = []
    decide_cpu: list[float] = []  # this process's CPU time: steadier than wall time on a shared machine
    upkeep: list[float] = []
    admitted: list[int] = []
    for _ in range(steps):
        c0, t0 = time.process_time(), time.perf_counter()
        batch = sched.schedule()
        t1, c1 = time.perf_counter(), time.process_time()
        assert batch is not None
        # the rest of the step: results, tree inserts (and the index's share of them), new arrivals
        sched.process_output(batch, BatchOutput(next_token_ids=[7] * len(batch.reqs)))
        for _ in range(shape.waiting - len(sched.waiting)):
            sched.add_request(work.request())
        t2 = time.perf_counter()
        decide.append(t1 - t0)
        decide_cpu.append(c1 - c0)
        upkeep.append(t2 - t1)
        admitted.append(len(batch.reqs))
    tree_tokens = sched.tree.evictable_size() + sched.tree.protected_size()
    return {
        "decision_ms_median": 1e3 * statistics.median(decide),
        "decision_ms_p90": 1e3 * sorted(decide)[int(0.9 * (len(decide) - 1))],
        "decision_cpu_ms_median": 1e3 * statistics.median(decide_cpu),
        "upkeep_ms_median": 1e3 * statistics.median(upkeep),
        "admitted_per_step": statistics.mean(admitted),
        "tree_tokens": tree_tokens,
        "hit_rate": sched.stats().hit_rate,
    }


def time_rematch(shape: BenchShape, repeats: int, seed: int = 0) -> float:
    """Matching every waiting request from scratch and sorting (what an index-free LPM pays)."""
    sched, _ = build("fcfs", shape, seed)
    keys = [tuple(r.fill_ids[: r.max_prefix_len()]) for r in sched.waiting]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lens = [sched.tree.peek(k).length for k in keys]
        order = sorted(range(len(keys)), key=lambda i: -lens[i])
        times.append(time.perf_counter() - t0)
        assert len(order) == len(keys)
    return 1e3 * statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m radixfair.bench.schedule_bench", description=__doc__.split("\n")[0])
    p.add_argument("--policies", default="lpm,dlpm,fcfs")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--waiting", type=int, default=BenchShape.waiting)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    ns = p.parse_args(argv)
    shape = BenchShape(waiting=ns.waiting)
    results: dict[str, dict[str, float]] = {}
    for name in ns.policies.split(","):
        r = time_decisions(name, shape, ns.steps)
        results[name] = r
        print(
            f"{name:>10}: decision {r['decision_ms_median']:.2f} ms median (p90 {r['decision_ms_p90']:.2f}, "
            f"CPU time {r['decision_cpu_ms_median']:.2f}), "
            f"rest of step {r['upkeep_ms_median']:.2f} ms, {r['admitted_per_step']:.0f} admitted/step, "
            f"tree {r['tree_tokens']:.0f} tokens, hit rate {r['hit_rate']:.3f}"
        )
    rematch = time_rematch(shape, 5)
    results["rematch_all"] = {"ms_median": rematch}
    print(f"{'re-match':>10}: {rematch:.1f} ms median to match all {shape.waiting} waiting requests and sort")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"waiting": shape.waiting, "clients": shape.clients, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
