"""`radixfair bench structured`: JSON generation under a schema whose fixed structure dominates the
output (a character profile and an address card: ~10 fixed keys each, values bounded), greedy, with
jump-forward, without it, and unconstrained free text of the same token count; plus the mask's cost
per decode step at batch 32, for the chosen grammar backend and, with `--compare-backends`, others."""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from radixfair.bench.report import print_table, write_json
from radixfair.config_flags import add_flags, flag_values
from radixfair.engine_args import GRAMMAR_BACKENDS, EngineArgs

if TYPE_CHECKING:
    from radixfair.engine.engine import Engine
    from radixfair.sched.batch import ScheduledBatch

ENGINE_FLAGS = ("model", "dtype", "max_total_tokens", "max_running_requests", "num_threads", "grammar_backend")

CHARACTER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "race": {"enum": ["human", "elf", "dwarf", "orc", "halfling"]},
        "character_class": {"enum": ["warrior", "mage", "rogue", "cleric", "ranger", "bard"]},
        "level": {"type": "integer", "minimum": 1, "maximum": 20},
        "strength": {"type": "integer", "minimum": 3, "maximum": 18},
        "alignment": {"enum": ["lawful good", "neutral", "chaotic good", "lawful evil", "chaotic evil"]},
        "primary_weapon": {"enum": ["sword", "bow", "staff", "dagger", "axe"]},
        "is_alive": {"type": "boolean"},
        "hometown": {"type": "string", "maxLength": 12},
        "favorite_season": {"enum": ["spring", "summer", "autumn", "winter"]},
    },
    "additionalProperties": False,
}
ADDRESS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "full_name": {"type": "string", "maxLength": 12},
        "street_name": {"type": "string", "maxLength": 16},
        "house_number": {"type": "integer", "minimum": 1, "maximum": 999},
        "floor": {"type": "integer", "minimum": 0, "maximum": 9},
        "city": {"type": "string", "maxLength": 12},
        "country": {"enum": ["France", "Germany", "Spain", "Italy", "Portugal"]},
        "address_type": {"enum": ["home", "office", "shop"]},
        "postal_code": {"type": "string", "pattern": "^[0-9]{5}$"},
        "is_verified": {"type": "boolean"},
        "is_preferred": {"type": "boolean"},
    },
    "additionalProperties": False,
}
for _schema in (CHARACTER, ADDRESS):
    _schema["required"] = list(_schema["properties"])

NAMES = ["Ada", "Bram", "Cleo", "Dario", "Elin", "Farid", "Greta", "Hugo"]
TOPICS = ["a brave knight", "a clever thief", "a wise healer", "a lost traveller"]


def prompts(engine: Engine, n: int) -> list[tuple[str, dict[str, Any]]]:
    """n chat prompts and their schemas, alternating a character profile and an address card."""
    out = []
    for i in range(n):
        name, topic = NAMES[i % len(NAMES)], TOPICS[(i // len(NAMES)) % len(TOPICS)]
        if i % 2 == 0:
            ask, schema = f"Create a role-playing character profile for {name}, {topic}, as JSON.", CHARACTER
        else:
            ask, schema = f"Write the address card of {name}, {topic}, as JSON.", ADDRESS
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": ask}])
        out.append((text, schema))
    return out


def valid(text: str, schema: dict[str, Any]) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


@dataclass
class PassLog:
    """Forward passes of one engine, by mode, with their time and the mask time in them."""

    engine: Engine
    records: list[tuple[str, int, float, float]] = field(default_factory=list)  # mode, reqs, s, mask s
    _mask_seen: float = 0.0

    def __post_init__(self) -> None:
        self.engine.pass_observers.append(self._observe)

    def _observe(self, batch: ScheduledBatch, seconds: float) -> None:
        mask = self.engine.grammar.mask_seconds
        self.records.append((batch.mode.value, len(batch.reqs), seconds, mask - self._mask_seen))
        self._mask_seen = mask

    def reset(self) -> None:
        self.records.clear()
        self._mask_seen = self.engine.grammar.mask_seconds

    def count(self, mode: str) -> int:
        return sum(1 for m, *_ in self.records if m == mode)


def run(engine: Engine, batch: list[tuple[str, dict[str, Any] | None, int]], log: PassLog) -> dict[str, Any]:
    """Generate (prompt, schema or None, max_new_tokens) greedily from an empty cache."""
    engine.flush_cache()
    log.reset()
    params = []
    for _, schema, max_new in batch:
        p: dict[str, Any] = {"temperature": 0.0, "max_new_tokens": max_new}
        if schema is None:
            p["ignore_eos"] = True
        else:
            p["json_schema"] = schema
        params.append(p)
    t0 = time.perf_counter()
    outs = engine.generate([t for t, _, _ in batch], params)
    seconds = time.perf_counter() - t0
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {
        "outputs": outs,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "tokens": tokens,
        "forced_tokens": sum(o["meta_info"].get("jump_forward_tokens", 0) for o in outs),
        "latency_mean": sum(o["meta_info"]["e2e_latency"] for o in outs) / len(outs),
        "decode_steps": log.count("decode"),
        "extend_passes": log.count("prefill"),
        "valid": [valid(o["text"], s) for o, (_, s, _) in zip(outs, batch, strict=True) if s is not None],
    }


def mask_cost_b32(engine: Engine, work: list[tuple[str, dict[str, Any]]], log: PassLog,
                  max_new: int) -> dict[str, float]:
    """32 constrained requests without jump-forward, so every pass after the prefill decodes 32 rows:
    the mean decode pass time and the mean mask time inside it."""
    engine.grammar.jump_forward = False
    try:
        run(engine, [(t, s, max_new) for t, s in work[:32]], log)
    finally:
        engine.grammar.jump_forward = not engine.args.disable_regex_jump_forward
    full = [(s, m) for mode, n, s, m in log.records if mode == "decode" and n == 32]
    if not full:
        return {"mask_ms_per_step_b32": float("nan"), "decode_ms_per_step_b32": float("nan"), "b32_steps": 0}
    return {
        "mask_ms_per_step_b32": 1e3 * sum(m for _, m in full) / len(full),
        "decode_ms_per_step_b32": 1e3 * sum(s for s, _ in full) / len(full),
        "b32_steps": len(full),
    }


def compile_ms(engine: Engine) -> float:
    """Cold compilation of both schemas (cleared cache), ms per schema."""
    from radixfair.sampling_params import SamplingParams

    cache = engine.grammar.cache
    assert cache is not None
    t0 = time.perf_counter()
    for schema in (CHARACTER, ADDRESS):
        schema = {**schema, "description": f"cold {time.perf_counter()}"}  # a new text: not cached
        engine.grammar.check(SamplingParams(json_schema=schema, max_new_tokens=320))
    return 1e3 * (time.perf_counter() - t0) / 2


def main(ns: argparse.Namespace) -> int:
    from radixfair.engine.engine import Engine

    args = flag_values(EngineArgs, ns, only=ENGINE_FLAGS)
    load = os.getloadavg()
    print(f"load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)")
    row: dict[str, Any] = {"num_requests": ns.num_requests, "grammar_backend": args["grammar_backend"]}
    with Engine(**args) as engine:
        work = prompts(engine, ns.num_requests)
        log = PassLog(engine)
        run(engine, [(t, s, ns.max_new_tokens) for t, s in work[:2]], log)  # warm-up: compiles, first-pass costs
        jf = run(engine, [(t, s, ns.max_new_tokens) for t, s in work], log)
        engine.grammar.jump_forward = False
        no_jf = run(engine, [(t, s, ns.max_new_tokens) for t, s in work], log)
        engine.grammar.jump_forward = True
        # unconstrained, each request as many tokens as its constrained output (without jump-forward)
        free = run(engine, [(t, None, o["meta_info"]["completion_tokens"]) for (t, _), o
                            in zip(work, no_jf["outputs"], strict=True)], log)
        b32 = mask_cost_b32(engine, work, log, ns.max_new_tokens)
        row["compile_ms"] = compile_ms(engine)
        # one request at a time: each step is mostly fixed cost (weights read, Python, sampling),
        # the regime a GPU decodes in; at batch 64 a CPU step is mostly per-token compute
        one = {}
        for jump in (True, False):
            engine.grammar.jump_forward = jump
            runs = [run(engine, [(t, s, ns.max_new_tokens)], log) for t, s in work[: ns.sequential]]
            one[jump] = sum(r["latency_mean"] for r in runs) / len(runs)
        engine.grammar.jump_forward = True
    checks = jf["valid"] + no_jf["valid"]
    same = sum(a["text"] == b["text"] for a, b in zip(jf["outputs"], no_jf["outputs"], strict=True))
    row.update({
        "jf_tok_s": jf["tok_s"], "no_jf_tok_s": no_jf["tok_s"], "free_tok_s": free["tok_s"],
        "jf_decode_steps": jf["decode_steps"], "no_jf_decode_steps": no_jf["decode_steps"],
        "free_decode_steps": free["decode_steps"],
        "jf_extend_passes": jf["extend_passes"], "no_jf_extend_passes": no_jf["extend_passes"],
        "jf_latency_mean": jf["latency_mean"], "no_jf_latency_mean": no_jf["latency_mean"],
        "free_latency_mean": free["latency_mean"],
        "jf_speedup": no_jf["latency_mean"] / jf["latency_mean"],
        "jf_latency_b1": one[True], "no_jf_latency_b1": one[False], "jf_speedup_b1": one[False] / one[True],
        "valid_fraction": sum(checks) / len(checks),
        "jf_valid_fraction": sum(jf["valid"]) / len(jf["valid"]),
        "no_jf_valid_fraction": sum(no_jf["valid"]) / len(no_jf["valid"]),
        "jf_tokens": jf["tokens"], "jf_forced_tokens": jf["forced_tokens"], "no_jf_tokens": no_jf["tokens"],
        "same_text_jf_vs_no_jf": same,
        **b32,
        "load_average": load[0],
        "example": jf["outputs"][0]["text"],
    })
    backends = [b for b in ns.compare_backends.split(",") if b] if ns.compare_backends else []
    row["backends"] = {row["grammar_backend"]: {k: row[k] for k in ("mask_ms_per_step_b32",
                                                                    "decode_ms_per_step_b32", "compile_ms")}}
    for name in backends:
        if name in row["backends"]:
            continue
        try:
            with Engine(**{**args, "grammar_backend": name}) as engine:
                work = prompts(engine, 32)
                log = PassLog(engine)
                run(engine, [(t, s, ns.max_new_tokens) for t, s in work[:2]], log)
                res = mask_cost_b32(engine, work, log, ns.max_new_tokens)
                checks = run(engine, [(t, s, ns.max_new_tokens) for t, s in work], log)["valid"]
                res["compile_ms"] = compile_ms(engine)
                res["valid_fraction"] = sum(checks) / len(checks)
                row["backends"][name] = res
        except ValueError as e:  # its library is not installed
            row["backends"][name] = {"error": str(e)}
    rows = [
        ["output tokens/s", f"{row['jf_tok_s']:.1f}", f"{row['no_jf_tok_s']:.1f}", f"{row['free_tok_s']:.1f}"],
        ["mean latency (s)", f"{row['jf_latency_mean']:.2f}", f"{row['no_jf_latency_mean']:.2f}",
         f"{row['free_latency_mean']:.2f}"],
        ["decode steps", str(row["jf_decode_steps"]), str(row["no_jf_decode_steps"]), str(row["free_decode_steps"])],
        ["extend passes", str(row["jf_extend_passes"]), str(row["no_jf_extend_passes"]), ""],
        ["output tokens (forced)", f"{row['jf_tokens']} ({row['jf_forced_tokens']})", str(row["no_jf_tokens"]),
         ""],
        ["valid JSON", f"{row['jf_valid_fraction']:.3f}", f"{row['no_jf_valid_fraction']:.3f}", ""],
    ]
    print_table(["", "jump-forward", "no jump-forward", "free text"], rows,
                title=f"{ns.num_requests} requests, greedy, {row['grammar_backend']}", width=100)
    print(f"one request at a time ({ns.sequential}): mean latency {row['jf_latency_b1']:.2f} s with jump-forward, "
          f"{row['no_jf_latency_b1']:.2f} s without: jf_speedup_b1 {row['jf_speedup_b1']:.2f}x")
    print(f"jf_speedup {row['jf_speedup']:.2f}x; same text with and without jump-forward: "
          f"{same}/{ns.num_requests}; schema compile {row['compile_ms']:.1f} ms")
    print_table(["backend", "mask ms/step (b32)", "decode ms/step (b32)", "compile ms", "valid"],
                [[name, f"{r.get('mask_ms_per_step_b32', float('nan')):.3f}",
                  f"{r.get('decode_ms_per_step_b32', float('nan')):.1f}", f"{r.get('compile_ms', float('nan')):.1f}",
                  f"{r.get('valid_fraction', row['valid_fraction']):.3f}" if "error" not in r else r["error"]]
                 for name, r in row["backends"].items()], width=110)
    write_json(ns.json, row)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("structured", help="JSON-schema decoding with and without jump-forward")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=320)
    p.add_argument("--sequential", type=int, default=4, help="requests also run one at a time, with and without "
                                                             "jump-forward (jf_speedup_b1)")
    p.add_argument("--compare-backends", default="", metavar=",".join(b for b in GRAMMAR_BACKENDS if b != "none"),
                   help="also measure the mask cost at batch 32 with these grammar backends")
    p.add_argument("--json", default=None)
    add_flags(p.add_argument_group("engine"), EngineArgs, only=ENGINE_FLAGS, defaults={"max_total_tokens": 65536})
    p.set_defaults(func=main)
