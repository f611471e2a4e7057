"""Where a model argument points: a local file or folder, or a repo id already in the local Hugging
Face cache (`org/name`, `org/name:Q4_K_M` for one quantization of a GGUF repo).

Nothing is ever downloaded: the cache is read through `huggingface_hub`'s offline lookup
(`local_files_only`), and a model that is not there is an error saying where we looked and how to
fetch it. A repo with several GGUF files needs a quantization tag or `--gguf-file`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from radixfair.engine.loaders.errors import ModelLoadError

# org/name with an optional :TAG (a GGUF quantization such as Q4_K_M); Hugging Face's own rules
# for the two names are checked by huggingface_hub
_REPO_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?::(?P<tag>[\w.-]+))?$")
# llama.cpp's split files (name-00001-of-00003.gguf): one model in several files
_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class ModelLocation:
    path: str  # absolute path of a .gguf file or a model folder
    repo_id: str | None = None  # the cached repo it came from, if it was named by repo id


def locate_model(spec: str, *, gguf_file: str | None = None, revision: str | None = None,
                 cache_dir: str | None = None) -> ModelLocation:
    """The file or folder `spec` names: a local path, or a repo id in the local Hugging Face cache."""
    full = os.path.abspath(os.path.expanduser(spec))
    if os.path.exists(full):
        if os.path.isdir(full):
            return ModelLocation(_pick_in_folder(full, spec, None, gguf_file))
        if gguf_file is not None:
            raise ModelLoadError(f"--gguf-file {gguf_file!r} picks a file in a folder or repo, but {spec!r} is a file")
        return ModelLocation(full)
    m = _REPO_SPEC.match(spec)
    if m is None or spec.lower().endswith(".gguf"):  # models/x.gguf is a path with a typo, not a repo
        raise ModelLoadError(
            f"model path {spec!r} does not exist: expected a .gguf file, a Hugging Face model folder, or a repo id "
            "(org/name) in the local Hugging Face cache"
        )
    repo, tag = m.group("repo"), m.group("tag")
    snapshot = cached_snapshot(repo, revision=revision, cache_dir=cache_dir, fetch_hint=_fetch_hint(repo, tag))
    return ModelLocation(_pick_in_folder(snapshot, repo, tag, gguf_file), repo_id=repo)


def hub_cache_dir(cache_dir: str | None = None) -> str:
    """The Hugging Face cache folder looked in: `cache_dir`, else huggingface_hub's (HF_HUB_CACHE,
    HF_HOME/hub, ~/.cache/huggingface/hub)."""
    if cache_dir is not None:
        return os.path.abspath(os.path.expanduser(cache_dir))
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def cached_snapshot(repo: str, *, revision: str | None, cache_dir: str | None, fetch_hint: str) -> str:
    """The folder of `repo`'s snapshot in the local cache; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    where = hub_cache_dir(cache_dir)
    try:
        path = snapshot_download(repo, revision=revision, cache_dir=where, local_files_only=True)
    except HFValidationError as e:
        raise ModelLoadError(f"model {repo!r} is neither a local path nor a valid repo id ({e})") from e
    except LocalEntryNotFoundError as e:
        folder = os.path.join(where, "models--" + repo.replace("/", "--"))
        what = "is not" if not os.path.isdir(folder) else f"has no snapshot of revision {revision or 'main'!r}"
        raise ModelLoadError(
            f"model {repo!r} is no local path, and {what} in the local Hugging Face cache (looked in {folder}); "
            "radixfair never "
            f"downloads: fetch it first with `{fetch_hint}` (the cache is HF_HUB_CACHE, or HF_HOME/hub, or "
            "--download-dir), or pass a local path"
        ) from e
    return str(path)


def _fetch_hint(repo: str, tag: str | None) -> str:
    if tag is None:
        return f"hf download {repo}"
    return f"hf download {repo} --include '*{tag}*.gguf'"


def _pick_in_folder(folder: str, shown: str, tag: str | None, gguf_file: str | None) -> str:
    """A model folder stays a folder (Hugging Face weights); in a folder of GGUF files, the one the tag
    or `--gguf-file` names, or the only one."""
    if gguf_file is not None:
        path = os.path.join(folder, gguf_file)
        if not os.path.isfile(path):
            raise ModelLoadError(
                f"--gguf-file {gguf_file!r} is not in {shown!r}; it holds {_listing(_gguf_files(folder), folder)}"
            )
        return _checked_gguf(path, shown)
    ggufs = _gguf_files(folder)
    if tag is None:
        if os.path.isfile(os.path.join(folder, "config.json")) or not ggufs:
            return folder  # a Hugging Face folder (or nothing usable: the HF loader says what is missing)
        if len(ggufs) == 1:
            return _checked_gguf(ggufs[0], shown)
        raise ModelLoadError(
            f"{shown!r} holds several GGUF files ({_listing(ggufs, folder)}): pick one with {shown}:QUANT "
            f"(e.g. {shown}:{_quant_of(ggufs[0]) or 'Q4_K_M'}) or --gguf-file NAME"
        )
    token = re.compile(rf"(^|[-._]){re.escape(tag)}($|[-._])", re.IGNORECASE)
    matches = [p for p in ggufs if token.search(Path(p).name[: -len(".gguf")])]
    if len(matches) != 1:
        how = "no GGUF file" if not matches else "several GGUF files"
        raise ModelLoadError(
            f"{shown!r} has {how} for quantization {tag!r}; it holds {_listing(ggufs, folder)}"
            + ("" if not matches else ": pick one with --gguf-file NAME")
        )
    return _checked_gguf(matches[0], shown)


def _gguf_files(folder: str) -> list[str]:
    # multimodal projectors (mmproj-*.gguf) sit beside the language model in many repos: not a model
    return sorted(str(p) for p in Path(folder).rglob("*.gguf")
                  if p.is_file() and not p.name.lower().startswith("mmproj"))


def _checked_gguf(path: str, shown: str) -> str:
    if _SPLIT_GGUF.search(path):
        raise ModelLoadError(
            f"{shown!r}: {os.path.basename(path)} is one part of a split GGUF model, which radixfair cannot load; "
            "merge the parts into one file with llama.cpp's `llama-gguf-split --merge`"
        )
    return os.path.abspath(path)


def _listing(paths: list[str], folder: str) -> str:
    if not paths:
        return "no .gguf file"
    return ", ".join(os.path.relpath(p, folder) for p in paths)


_QUANT = re.compile(r"[-._]((?:I?Q\d+(?:_[A-Z0-9]+)*)|BF16|F16|F32|FP16|FP32)$", re.IGNORECASE)


def _quant_of(path: str) -> str | None:
    m = _QUANT.search(Path(path).name[: -len(".gguf")])
    return m.group(1) if m else None


def clean_model_name(path: str) -> str:
    """A model's name from its file or folder name, never a path: the `.gguf` suffix, the shard
    suffix and the quantization are dropped (`SmolLM2-135M-Instruct.Q4_1.gguf` ->
    `SmolLM2-135M-Instruct`); a snapshot folder of the Hugging Face cache gives its repo id."""
    p = Path(path)
    for part in reversed(p.parts):  # .../models--org--name/snapshots/<commit>[/file]
        if part.startswith("models--") and p.is_dir():
            return part[len("models--"):].replace("--", "/")
    name = p.name
    if name.lower().endswith(".gguf"):
        name = name[: -len(".gguf")]
        name = re.sub(r"-\d{5}-of-\d{5}$", "", name)
        name = _QUANT.sub("", name) or name
    return name
