"""`radixfair bench lang`: four frontend-language programs on a radixfair server, in three modes.

Programs (sizes fixed; `--smoke` shrinks them for a quick check of the command only):
- tree of thought: a shared instruction prefix and a problem; 3 levels of `fork(3)`, each node
  generating 48 tokens (temperature 0.7), level by level; 8 problems;
- few-shot QA: a 1,024-token example prefix, 32 questions by `run_batch`, 16 new tokens each;
- LLM-as-a-judge: a 512-token document, `fork` over 5 criteria, 32 new tokens each; 8 documents;
- multi-turn chat: 8 sessions of 4 turns (the model's chat template), 32 new tokens per turn.
Every generation ignores EOS, so each mode produces the same number of tokens.

Modes, one after another on one machine:
- `cache`: the programs through the language (`run_batch` with `RuntimeEndpoint`), radix cache on;
- `no_cache`: the same on a server started with `--disable-radix-cache`;
- `plain_client`: the same prompts as plain sequential OpenAI-client calls (`/v1/completions`,
  `/v1/chat/completions`), cache on: what a user without the language writes.

A row per (program, mode): `programs_per_s` (programs / wall seconds), `latency_p50` (seconds from a
program's start to its end: with the language all programs of a batch start together; the plain
client runs them one at a time), `hit_rate` (cached / input prompt tokens on the server over the run).
Each server is a `radixfair serve` subprocess on a free 127.0.0.1 port.

`--backend openai` measures what the language does for a model behind an OpenAI-style API instead
(the same server's `/v1`), with the program's own counters (`calls_per_program`,
`input_tokens_per_program`: what a program sent):
- character card (6 short fields, 32 cards, temperature 0): `openai` (the `OpenAI` backend, one call
  per field) and `openai_spec` (API speculative execution, `num_api_spec_tokens`);
- few-shot QA by `run_batch` on the native backend: `hoist` (the traced constant prefix prefilled
  once before the batch) and `no_hoist` (every program of the batch starts cold).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from radixfair.bench.processes import free_port, wait_healthy
from radixfair.bench.report import print_table, write_json
from radixfair.config_flags import add_flags, flag_values
from radixfair.engine_args import EngineArgs

ENGINE_FLAGS = ("model", "dtype", "max_total_tokens", "max_running_requests", "chunked_prefill_size", "num_threads")
MODES = ("cache", "no_cache", "plain_client")
PROGRAMS = ("tree_of_thought", "few_shot_qa", "llm_judge", "multi_turn_chat")
BACKENDS = ("native", "openai")
OPENAI_ROWS = (("character_card", "openai"), ("character_card", "openai_spec"), ("few_shot_qa", "hoist"),
               ("few_shot_qa", "no_hoist"))
CARD_FIELDS = ("Name", "Birthday", "Job", "Home town", "Favourite food", "Motto")
# an example card, so that the model writes each field on its own line, as the program asks
CARD_HEADER = ("Write a short character card for a story. Each card has the same six fields, one per line.\n\n"
               "Character: a cheerful baker\nName: Mia Rossi\nBirthday: 4 March 1990\nJob: Baker\n"
               "Home town: Naples\nFavourite food: Lemon cake\nMotto: Bread first.\n\n"
               "Character: a retired sailor\nName: Tom Harris\nBirthday: 12 July 1951\nJob: Sailor\n"
               "Home town: Bristol\nFavourite food: Fish pie\nMotto: Calm seas never taught anyone.\n\n")
CLIENT = "bench-lang"
CRITERIA = ("accuracy", "clarity", "completeness", "style", "relevance")

_WORDS = ("the", "river", "engine", "model", "garden", "quiet", "number", "seven", "market", "light",
          "paper", "winter", "signal", "forest", "careful", "machine", "bridge", "silver", "answer",
          "simple", "window", "travel", "letter", "mountain", "reason", "metal", "village", "distant",
          "ocean", "measure", "early", "circle", "storm", "planet", "history", "yellow", "method")


@dataclass(frozen=True)
class Sizes:
    tot_problems: int = 8
    tot_levels: int = 3
    tot_branches: int = 3
    tot_tokens: int = 48
    tot_header_tokens: int = 384  # instructions shared by every problem
    tot_problem_tokens: int = 128
    fewshot_prefix_tokens: int = 1024
    fewshot_questions: int = 32
    fewshot_tokens: int = 16
    cards: int = 32
    card_field_tokens: int = 16
    spec_tokens: int = 64  # the six fields and their labels take about 45 tokens
    judge_documents: int = 8
    judge_document_tokens: int = 512
    judge_tokens: int = 32
    chat_sessions: int = 8
    chat_turns: int = 4
    chat_tokens: int = 32
    chat_message_tokens: int = 48


SMOKE = Sizes(tot_problems=2, tot_levels=2, tot_branches=2, tot_tokens=4, tot_header_tokens=48,
              tot_problem_tokens=16, fewshot_prefix_tokens=64, fewshot_questions=4, fewshot_tokens=4,
              judge_documents=2, judge_document_tokens=48, judge_tokens=4, chat_sessions=2, chat_turns=2,
              chat_tokens=4, chat_message_tokens=8, cards=3, card_field_tokens=4, spec_tokens=16)


class TextMaker:
    """Seeded filler text cut to an exact token count of the served model's tokenizer."""

    def __init__(self, tokenizer: Any, seed: int) -> None:
        self.tok = tokenizer
        self.rng = np.random.default_rng(seed)

    def sentence(self, words: int) -> str:
        picked = self.rng.choice(_WORDS, size=words)
        return " ".join(picked).capitalize() + "."

    def text(self, tokens: int) -> str:
        parts: list[str] = []
        ids: list[int] = []
        while len(ids) < tokens:
            parts.append(self.sentence(int(self.rng.integers(6, 14))))
            ids = self.tok.encode(" ".join(parts), add_special_tokens=False)
        return str(self.tok.decode(ids[:tokens]))


@dataclass
class Workload:
    tot_header: str
    tot_problems: list[str]
    fewshot_prefix: str
    fewshot_questions: list[str]
    judge_documents: list[str]
    chat_system: str
    chat_sessions: list[list[str]]


def make_workload(tokenizer: Any, sizes: Sizes, seed: int) -> Workload:
    t = TextMaker(tokenizer, seed)
    header = ("Solve the problem step by step. Propose several independent thoughts at each step, then "
              "develop each of them. Background: " + t.text(sizes.tot_header_tokens) + "\n")
    examples = []
    n = 0
    while n < sizes.fewshot_prefix_tokens:
        examples.append(f"Question: {t.sentence(8)[:-1]}?\nAnswer: {t.sentence(5)}\n")
        n = len(tokenizer.encode("".join(examples), add_special_tokens=False))
    prefix = str(tokenizer.decode(tokenizer.encode("".join(examples), add_special_tokens=False)[
        :sizes.fewshot_prefix_tokens]))
    return Workload(
        tot_header=header,
        tot_problems=[t.text(sizes.tot_problem_tokens) for _ in range(sizes.tot_problems)],
        fewshot_prefix=prefix + "\n",
        fewshot_questions=[t.sentence(10)[:-1] + "?" for _ in range(sizes.fewshot_questions)],
        judge_documents=[t.text(sizes.judge_document_tokens) for _ in range(sizes.judge_documents)],
        chat_system="You are a helpful assistant. Answer briefly.",
        chat_sessions=[[t.text(sizes.chat_message_tokens) for _ in range(sizes.chat_turns)]
                       for _ in range(sizes.chat_sessions)],
    )


# ---- the programs in the language ---------------------------------------------------------------------
def language_programs(sizes: Sizes) -> dict[str, tuple[Any, float]]:
    """program name -> (an `@function` taking `(key, timing, ...)`, its temperature)."""
    import radixfair as sgl

    @sgl.function
    def tree_of_thought(s: Any, header: str, problem: str, key: int, timing: dict[int, float]) -> None:
        s += header + "Problem: " + problem + "\n"
        frontier, groups = [s], []
        for level in range(1, sizes.tot_levels + 1):
            nxt = []
            for node in frontier:
                forks = node.fork(sizes.tot_branches)
                forks += lambda i, level=level: (f"Thought {level}.{i + 1}:"
                                                 + sgl.gen("thought", max_tokens=sizes.tot_tokens))
                groups.append(forks)
                nxt.extend(forks)
            frontier = nxt
        for group in reversed(groups):
            group.join()
        timing[key] = time.perf_counter()

    @sgl.function
    def few_shot_qa(s: Any, prefix: str, question: str, key: int, timing: dict[int, float]) -> None:
        s += prefix
        s += "Question: " + question + "\nAnswer:" + sgl.gen("answer", max_tokens=sizes.fewshot_tokens)
        s["answer"]  # reading it waits for the answer
        timing[key] = time.perf_counter()

    @sgl.function
    def llm_judge(s: Any, document: str, key: int, timing: dict[int, float]) -> None:
        s += "Judge the following document on one criterion at a time.\nDocument: " + document + "\n"
        forks = s.fork(len(CRITERIA))
        forks += lambda i: f"Criterion: {CRITERIA[i]}.\nJudgement:" + sgl.gen("judgement",
                                                                               max_tokens=sizes.judge_tokens)
        forks.join()
        timing[key] = time.perf_counter()

    @sgl.function
    def multi_turn_chat(s: Any, system: str, turns: list[str], key: int, timing: dict[int, float]) -> None:
        s += sgl.system(system)
        for i, message in enumerate(turns):
            s += sgl.user(message)
            s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=sizes.chat_tokens))
        s[f"answer_{len(turns) - 1}"]  # reading it waits for the last answer
        timing[key] = time.perf_counter()

    return {"tree_of_thought": (tree_of_thought, 0.7), "few_shot_qa": (few_shot_qa, 0.0),
            "llm_judge": (llm_judge, 0.0), "multi_turn_chat": (multi_turn_chat, 0.0)}


def language_arguments(program: str, wl: Workload) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the arguments every program of the batch shares, bound: part of its constant prefix; each
    program's own)."""
    if program == "tree_of_thought":
        return {"header": wl.tot_header}, [{"problem": p} for p in wl.tot_problems]
    if program == "few_shot_qa":
        return {"prefix": wl.fewshot_prefix}, [{"question": q} for q in wl.fewshot_questions]
    if program == "llm_judge":
        return {}, [{"document": d} for d in wl.judge_documents]
    return {"system": wl.chat_system}, [{"turns": turns} for turns in wl.chat_sessions]


def run_language(url: str, program: str, wl: Workload, sizes: Sizes) -> tuple[float, list[float]]:
    """Wall seconds of one `run_batch`, and each program's latency."""
    import radixfair as sgl

    backend = sgl.RuntimeEndpoint(url, client_id=CLIENT)
    func, temperature = language_programs(sizes)[program]
    shared, own = language_arguments(program, wl)
    func = func.bind(**shared)
    timing: dict[int, float] = {}
    args = [{**a, "key": k, "timing": timing} for k, a in enumerate(own)]
    t0 = time.perf_counter()
    states = func.run_batch(args, backend=backend, temperature=temperature, ignore_eos=True)
    wall = time.perf_counter() - t0
    errors = [str(s.error()) for s in states if s.error() is not None]
    backend.shutdown()
    if errors:
        raise RuntimeError(f"{program}: {len(errors)} programs failed, e.g. {errors[0]}")
    return wall, [timing[k] - t0 for k in range(len(args))]


# ---- --backend openai: API speculative execution, prefix hoisting ---------------------------------
def card_program(sizes: Sizes, spec: bool) -> Any:
    import radixfair as sgl

    def character_card(s: Any, character: str) -> None:
        s += CARD_HEADER + "Character: " + character + "\n"
        for i, field in enumerate(CARD_FIELDS):
            s += ("\n" if i else "") + field + ":" + sgl.gen(f"field_{i}", max_tokens=sizes.card_field_tokens,
                                                          stop="\n")

    return sgl.function(character_card, num_api_spec_tokens=sizes.spec_tokens if spec else None)


def card_characters(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    adjectives = ("quiet", "brave", "curious", "grumpy", "young", "clever", "gentle", "restless")
    roles = ("gardener", "pilot", "teacher", "painter", "doctor", "miner", "singer", "engineer")
    return [f"a {rng.choice(adjectives)} {rng.choice(roles)}" for _ in range(n)]


def run_openai(url: str, mode: str, sizes: Sizes, seed: int) -> dict[str, Any]:
    """The character cards through the `OpenAI` backend on the server's /v1, speculative or not."""
    import radixfair as sgl

    backend = sgl.OpenAI(None, base_url=url + "/v1", is_chat_model=False, client_id=CLIENT)
    program = card_program(sizes, spec=mode == "openai_spec")
    args = [{"character": c} for c in card_characters(sizes.cards, seed)]
    t0 = time.perf_counter()
    states = program.run_batch(args, backend=backend, temperature=0.0)
    wall = time.perf_counter() - t0
    errors = [str(s.error()) for s in states if s.error() is not None]
    backend.shutdown()
    if errors:
        raise RuntimeError(f"character_card {mode}: {len(errors)} programs failed, e.g. {errors[0]}")
    usage = backend.api_usage.snapshot()
    n = len(states)
    return {"programs_per_s": n / wall, "programs": n, "seconds": wall,
            "calls_per_program": usage.calls / n, "input_tokens_per_program": usage.input_tokens / n,
            "output_tokens_per_program": usage.output_tokens / n, "spec_hits": usage.spec_hits,
            "spec_misses": usage.spec_misses,
            "cards": [[s[f"field_{i}"] for i in range(len(CARD_FIELDS))] for s in states]}


def run_hoisting(url: str, mode: str, wl: Workload, sizes: Sizes) -> dict[str, Any]:
    """Few-shot QA by `run_batch`, its constant prefix prefilled first (`hoist`) or not."""
    import radixfair as sgl
    from radixfair.lang.config import global_config

    backend = sgl.RuntimeEndpoint(url, client_id=CLIENT)
    func, _ = language_programs(sizes)["few_shot_qa"]
    shared, own = language_arguments("few_shot_qa", wl)
    func = func.bind(**shared)
    timing: dict[int, float] = {}
    args = [{**a, "key": k, "timing": timing} for k, a in enumerate(own)]
    saved = global_config.enable_precache_with_tracing
    global_config.enable_precache_with_tracing = mode == "hoist"
    try:
        t0 = time.perf_counter()
        states = func.run_batch(args, backend=backend, temperature=0.0, ignore_eos=True)
        wall = time.perf_counter() - t0
    finally:
        global_config.enable_precache_with_tracing = saved
    errors = [str(s.error()) for s in states if s.error() is not None]
    backend.shutdown()
    if errors:
        raise RuntimeError(f"few_shot_qa {mode}: {len(errors)} programs failed, e.g. {errors[0]}")
    usage = backend.api_usage.snapshot()
    n = len(states)
    latencies = [timing[k] - t0 for k in range(n)]
    return {"programs_per_s": n / wall, "programs": n, "seconds": wall,
            "latency_p50": float(np.percentile(latencies, 50)),
            "calls_per_program": usage.calls / n, "input_tokens_per_program": usage.input_tokens / n}


def measure_openai(url: str, program: str, mode: str, wl: Workload, sizes: Sizes, seed: int) -> dict[str, Any]:
    _reset(url)
    before = _stats(url)
    out = run_openai(url, mode, sizes, seed) if program == "character_card" else run_hoisting(url, mode, wl, sizes)
    after = _stats(url)
    inputs = after["input_tokens"] - before["input_tokens"]
    cached = after["cached_tokens"] - before["cached_tokens"]
    return {"program": program, "mode": mode, **out, "hit_rate": cached / inputs if inputs else 0.0,
            "prefill_tokens": after["prefill_tokens"] - before["prefill_tokens"],
            "decode_tokens": after["decode_tokens"] - before["decode_tokens"]}


def _agreement(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The share of fields the two modes wrote the same. Not 1 in general: a speculated field follows
    the model's own tokens, a called one the server's tokenization of the text so far, and the
    attention over cached and freshly computed positions rounds differently in bfloat16."""
    pairs = [(x, y) for ca, cb in zip(a["cards"], b["cards"], strict=True) for x, y in zip(ca, cb, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs) if pairs else 1.0


def main_openai(ns: argparse.Namespace, args: EngineArgs, sizes: Sizes) -> int:
    rows: list[dict[str, Any]] = []
    wl = make_workload(_tokenizer(args.model), sizes, ns.seed)
    t_all = time.perf_counter()
    with served(args) as url:
        for program, mode in OPENAI_ROWS:
            row = measure_openai(url, program, mode, wl, sizes, ns.seed)
            rows.append(row)
            print(f"{program:16s} {mode:12s} {row['programs_per_s']:8.3f} programs/s  "
                  f"{row['calls_per_program']:5.2f} calls  {row['input_tokens_per_program']:8.1f} input tokens"
                  f"  hit rate {row['hit_rate']:.3f}  ({row['seconds']:.1f} s)", flush=True)
    print(f"all rows in {time.perf_counter() - t_all:.0f} s")
    print_table(["program", "mode", "programs/s", "calls/program", "input tokens/program", "hit rate",
                 "prefill tokens", "wall (s)"],
                [[r["program"], r["mode"], f"{r['programs_per_s']:.3f}", f"{r['calls_per_program']:.2f}",
                  f"{r['input_tokens_per_program']:.1f}", f"{r['hit_rate']:.3f}", str(r["prefill_tokens"]),
                  f"{r['seconds']:.1f}"] for r in rows], width=110)
    by = {(r["program"], r["mode"]): r for r in rows}
    plain, spec = by[("character_card", "openai")], by[("character_card", "openai_spec")]
    hoist, cold = by[("few_shot_qa", "hoist")], by[("few_shot_qa", "no_hoist")]
    print_table(["ratio", "value"], [
        ["character_card calls: openai / openai_spec",
         f"{plain['calls_per_program'] / spec['calls_per_program']:.2f}x"],
        ["character_card input tokens: openai / openai_spec",
         f"{plain['input_tokens_per_program'] / max(spec['input_tokens_per_program'], 1e-9):.2f}x"],
        ["character_card fields equal to openai's (temperature 0)", f"{_agreement(plain, spec):.3f}"],
        ["few_shot_qa programs/s: hoist / no_hoist", f"{hoist['programs_per_s'] / cold['programs_per_s']:.2f}x"],
        ["few_shot_qa prefill tokens: no_hoist / hoist",
         f"{cold['prefill_tokens'] / max(hoist['prefill_tokens'], 1):.2f}x"],
    ], width=110)
    write_json(ns.json, rows)
    return 0


# ---- the same prompts as plain sequential OpenAI-client calls --------------------------------------
def run_plain(url: str, program: str, wl: Workload, sizes: Sizes) -> tuple[float, list[float]]:
    try:
        import openai
    except ImportError as e:
        raise RuntimeError("the plain_client mode needs the `openai` package (pip install openai)") from e
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600,
                           default_headers={"X-Client-Id": CLIENT})
    extra = {"ignore_eos": True}
    model = client.models.list().data[0].id

    def complete(prompt: str, max_tokens: int, temperature: float) -> str:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                                      extra_body=extra)
        return r.choices[0].text

    def tree_of_thought(problem: str) -> None:
        frontier = [wl.tot_header + "Problem: " + problem + "\n"]
        for level in range(1, sizes.tot_levels + 1):
            frontier = [prompt + complete(prompt, sizes.tot_tokens, 0.7)
                        for node in frontier for i in range(sizes.tot_branches)
                        for prompt in [node + f"Thought {level}.{i + 1}:"]]

    def few_shot_qa(question: str) -> None:
        complete(wl.fewshot_prefix + "Question: " + question + "\nAnswer:", sizes.fewshot_tokens, 0.0)

    def llm_judge(document: str) -> None:
        base = "Judge the following document on one criterion at a time.\nDocument: " + document + "\n"
        for c in CRITERIA:
            complete(base + f"Criterion: {c}.\nJudgement:", sizes.judge_tokens, 0.0)

    def multi_turn_chat(turns: list[str]) -> None:
        messages: list[dict[str, str]] = [{"role": "system", "content": wl.chat_system}]
        for message in turns:
            messages.append({"role": "user", "content": message})
            r = client.chat.completions.create(model=model, messages=messages,  # type: ignore[arg-type]
                                               max_tokens=sizes.chat_tokens, temperature=0.0, extra_body=extra)
            messages.append({"role": "assistant", "content": r.choices[0].message.content or ""})

    jobs: dict[str, tuple[Callable[[Any], None], list[Any]]] = {
        "tree_of_thought": (tree_of_thought, wl.tot_problems), "few_shot_qa": (few_shot_qa, wl.fewshot_questions),
        "llm_judge": (llm_judge, wl.judge_documents), "multi_turn_chat": (multi_turn_chat, wl.chat_sessions)}
    fn, items = jobs[program]
    latencies = []
    t0 = time.perf_counter()
    for item in items:
        t = time.perf_counter()
        fn(item)
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    client.close()
    return wall, latencies


# ---- servers ---------------------------------------------------------------------------------------
def serve_command(args: EngineArgs, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "radixfair.cli", "serve", "--port", str(port)]
    for name in ENGINE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    if args.disable_radix_cache:
        cmd.append("--disable-radix-cache")
    return cmd


@contextmanager
def served(args: EngineArgs, timeout: float = 900.0) -> Iterator[str]:
    """A `radixfair serve` subprocess with `args`; yields its URL once it answers /health."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(serve_command(args, port), stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            def server_log() -> str:
                log.seek(0)
                return ":\n" + log.read().decode(errors="replace")[-3000:]

            wait_healthy(url, proc, timeout, "the server", server_log, poll=0.25)
            yield url
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _stats(url: str) -> dict[str, Any]:
    import httpx

    info = httpx.get(url + "/get_server_info", timeout=60).json()
    stats: dict[str, Any] = info["stats"]
    return stats


def _reset(url: str) -> None:
    import httpx

    httpx.post(url + "/generate", timeout=600, json={"text": "warm up", "sampling_params": {"max_new_tokens": 2}})
    r = httpx.post(url + "/flush_cache", timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"cannot flush the server's cache: {r.text}")


def _tokenizer(model: str | None) -> Any:
    """The served model's tokenizer, from the same model argument the servers get (to size prompts)."""
    from radixfair.engine.loaders import inspect_model
    from radixfair.tokenizer import Tokenizer

    files = inspect_model(model)
    return Tokenizer.from_gguf(files.path) if files.format == "gguf" else Tokenizer.from_hf_dir(files.path)


def measure(url: str, mode: str, program: str, wl: Workload, sizes: Sizes) -> dict[str, Any]:
    _reset(url)
    before = _stats(url)
    run = run_plain if mode == "plain_client" else run_language
    wall, latencies = run(url, program, wl, sizes)
    after = _stats(url)
    inputs = after["input_tokens"] - before["input_tokens"]
    cached = after["cached_tokens"] - before["cached_tokens"]
    return {
        "program": program, "mode": mode,
        "programs_per_s": len(latencies) / wall, "latency_p50": float(np.percentile(latencies, 50)),
        "hit_rate": cached / inputs if inputs else 0.0,
        "programs": len(latencies), "seconds": wall, "latency_p99": float(np.percentile(latencies, 99)),
        "input_tokens": inputs, "cached_tokens": cached,
        "prefill_tokens": after["prefill_tokens"] - before["prefill_tokens"],
        "decode_tokens": after["decode_tokens"] - before["decode_tokens"],
    }


def main(ns: argparse.Namespace) -> int:
    sizes = SMOKE if ns.smoke else Sizes()
    modes = [m.strip() for m in ns.modes.split(",") if m.strip()]
    progs = [p.strip() for p in ns.programs.split(",") if p.strip()]
    for m in modes:
        if m not in MODES:
            raise ValueError(f"--modes: unknown mode {m!r}; choose from {', '.join(MODES)}")
    for p in progs:
        if p not in PROGRAMS:
            raise ValueError(f"--programs: unknown program {p!r}; choose from {', '.join(PROGRAMS)}")
    args = EngineArgs(**flag_values(EngineArgs, ns, only=ENGINE_FLAGS))
    if ns.backend == "openai":
        return main_openai(ns, args, sizes)
    rows: list[dict[str, Any]] = []
    wl = make_workload(_tokenizer(args.model), sizes, ns.seed)
    t_all = time.perf_counter()
    for disable, server_modes in ((False, [m for m in modes if m != "no_cache"]),
                                  (True, [m for m in modes if m == "no_cache"])):
        if not server_modes:
            continue
        with served(replace(args, disable_radix_cache=disable)) as url:
            for program in progs:
                for mode in server_modes:
                    row = measure(url, mode, program, wl, sizes)
                    rows.append(row)
                    print(f"{program:16s} {mode:13s} {row['programs_per_s']:8.3f} programs/s  "
                          f"p50 {row['latency_p50']:7.2f} s  hit rate {row['hit_rate']:.3f}  "
                          f"({row['seconds']:.1f} s)", flush=True)
    print(f"all modes in {time.perf_counter() - t_all:.0f} s")
    print_summary(rows)
    write_json(ns.json, rows)
    return 0


def print_summary(rows: list[dict[str, Any]]) -> None:
    print_table(["program", "mode", "programs/s", "latency p50 (s)", "hit rate", "wall (s)"],
                [[r["program"], r["mode"], f"{r['programs_per_s']:.3f}", f"{r['latency_p50']:.2f}",
                  f"{r['hit_rate']:.3f}", f"{r['seconds']:.1f}"] for r in rows], width=100)
    by = {(r["program"], r["mode"]): r["programs_per_s"] for r in rows}
    ratios = []
    for program in PROGRAMS:
        cache = by.get((program, "cache"))
        if cache is None:
            continue
        cells = [f"{cache / by[(program, m)]:.2f}x" if (program, m) in by else "-" for m in ("no_cache", "plain_client")]
        ratios.append([program, *cells])
    if ratios:
        print_table(["program", "cache / no_cache", "cache / plain_client"], ratios, width=100)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("lang", help="frontend-language programs: radix cache on/off and plain client calls")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    p.add_argument("--programs", default=",".join(PROGRAMS), help="comma-separated: " + ", ".join(PROGRAMS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=BACKENDS, default="native",
                   help="native: the modes above; openai: API speculative execution on a character-card "
                        "program (modes openai, openai_spec) and run_batch with and without prefix "
                        "hoisting on few-shot QA (hoist, no_hoist)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, to check the command runs (not the benchmark)")
    p.add_argument("--json", default=None)
    add_flags(p.add_argument_group("engine"), EngineArgs, only=ENGINE_FLAGS,
              defaults={"max_total_tokens": 65536})
    p.set_defaults(func=main)
