"""glibc malloc tuning for CPU inference: applied by a CPU engine, off by environment, idempotent."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from radixfair.engine import cpu_malloc


def test_tuning_is_applied_once_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_malloc, "_done", False)
    monkeypatch.setenv(cpu_malloc.ENV_OFF, "1")
    assert cpu_malloc.tune_malloc_for_cpu_inference() is False
    monkeypatch.delenv(cpu_malloc.ENV_OFF)
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert cpu_malloc.tune_malloc_for_cpu_inference() is True
    assert cpu_malloc._done and cpu_malloc.tune_malloc_for_cpu_inference() is True


def test_a_cpu_engine_applies_it(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from radixfair.engine.engine import Engine

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    monkeypatch.delenv(cpu_malloc.ENV_OFF, raising=False)
    monkeypatch.setattr(cpu_malloc, "_done", False)
    with Engine(model=str(tiny_llama), device="cpu", max_total_tokens=512) as engine:
        assert engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2})["output_ids"]
    assert cpu_malloc._done
