"""`bench engine --llama-cpp-python`: the probe runs in another interpreter and its figures come back.
A stand-in `llama_cpp` module (a fixed sleep per eval) takes llama-cpp-python's place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from radixfair.bench.engine_bench import llama_cpp_b1

FAKE = '''
import time

class Llama:
    def __init__(self, model_path, n_ctx, n_threads, n_batch, verbose):
        assert model_path.endswith(".gguf") and n_threads >= 1
        self.calls = []

    def n_vocab(self):
        return 1000

    def reset(self):
        self.calls.clear()

    def eval(self, tokens):
        assert all(0 <= t < 1000 for t in tokens)
        time.sleep(0.002 * (1 if len(tokens) == 1 else 5))
'''


def test_probe_reports_llama_cpp_speed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    (tmp_path / "llama_cpp.py").write_text(FAKE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    got = llama_cpp_b1(sys.executable, "model.gguf", 32, 8)
    assert 2.0 <= got["decode_ms_per_token_b1"] < 50.0  # one 2 ms eval per token
    assert 32 / 0.05 < got["prefill_tok_s"] <= 32 / 0.010  # one 10 ms eval for the prompt
    assert got["threads"] == torch.get_num_threads()


def test_probe_failure_names_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    (tmp_path / "llama_cpp.py").write_text('raise ImportError("llama_cpp stand-in: not built")\n')
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="llama_cpp stand-in: not built"):
        llama_cpp_b1(sys.executable, "model.gguf", 8, 2)
