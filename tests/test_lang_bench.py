"""`radixfair bench lang --smoke` on the tiny model: the command, its modes and its JSON rows."""

from __future__ import annotations

import json
from pathlib import Path

from radixfair.bench.lang_bench import serve_command
from radixfair.cli import main
from radixfair.engine_args import EngineArgs


def test_bench_lang_smoke(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "lang.json"
    rc = main(["bench", "lang", "--smoke", "--model", str(tiny_llama), "--dtype", "float32",
               "--max-total-tokens", "4096", "--programs", "tree_of_thought,multi_turn_chat", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [(r["program"], r["mode"]) for r in rows] == [
        ("tree_of_thought", "cache"), ("tree_of_thought", "plain_client"),
        ("multi_turn_chat", "cache"), ("multi_turn_chat", "plain_client"),
        ("tree_of_thought", "no_cache"), ("multi_turn_chat", "no_cache")]
    for r in rows:
        assert {"program", "mode", "programs_per_s", "latency_p50", "hit_rate"} <= set(r)
        assert r["programs_per_s"] > 0 and r["latency_p50"] > 0
    by = {(r["program"], r["mode"]): r for r in rows}
    for program in ("tree_of_thought", "multi_turn_chat"):
        cache, no_cache, plain = (by[(program, m)] for m in ("cache", "no_cache", "plain_client"))
        # the same programs: the same tokens generated in every mode (EOS is ignored)
        assert cache["decode_tokens"] == no_cache["decode_tokens"] == plain["decode_tokens"] > 0
        assert no_cache["hit_rate"] == 0 and cache["hit_rate"] > 0.3 and plain["hit_rate"] > 0.3
        assert no_cache["prefill_tokens"] > cache["prefill_tokens"]


def test_bench_lang_openai_backend_smoke(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "lang_openai.json"
    rc = main(["bench", "lang", "--smoke", "--backend", "openai", "--model", str(tiny_llama), "--dtype", "float32",
               "--max-total-tokens", "4096", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [(r["program"], r["mode"]) for r in rows] == [
        ("character_card", "openai"), ("character_card", "openai_spec"), ("few_shot_qa", "hoist"),
        ("few_shot_qa", "no_hoist")]
    for r in rows:
        assert {"calls_per_program", "input_tokens_per_program", "programs_per_s", "hit_rate"} <= set(r)
        assert r["programs_per_s"] > 0 and r["input_tokens_per_program"] > 0
    by = {r["mode"]: r for r in rows}
    assert by["openai"]["calls_per_program"] == 6 and by["openai"]["spec_hits"] == 0  # a call per field
    assert by["openai_spec"]["calls_per_program"] >= 1
    assert by["hoist"]["calls_per_program"] == by["no_hoist"]["calls_per_program"] == 1


def test_serve_command_passes_the_engine_flags() -> None:
    cmd = serve_command(EngineArgs(model="m.gguf", max_total_tokens=1024, disable_radix_cache=True), 4321)
    assert cmd[cmd.index("--max-total-tokens") + 1] == "1024" and cmd[-1] == "--disable-radix-cache"
    assert cmd[cmd.index("--model") + 1] == "m.gguf" and cmd[cmd.index("--port") + 1] == "4321"
