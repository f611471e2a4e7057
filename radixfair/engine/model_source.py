"""What an engine serves, from its arguments: the model's files, its tokenizer (the model's own, or
`--tokenizer-path`'s, with `--chat-template`'s template) and the names it answers to."""

from __future__ import annotations

import os
from dataclasses import dataclass

from radixfair.engine.loaders import ModelFiles, ModelLoadError, inspect_model, open_gguf
from radixfair.engine.loaders.hub import locate_model
from radixfair.engine_args import EngineArgs
from radixfair.tokenizer import Tokenizer
from radixfair.tokenizer.named_templates import load_chat_template


@dataclass(frozen=True)
class ModelNames:
    """The served model's names; none is ever a filesystem path."""

    served: str  # the id /v1/models lists: --served-model-name, else `source`
    source: str  # the weights' name: the repo id given, else the clean file or folder name
    accepted: frozenset[str]  # OpenAI `model` values served: `served`, and the repo id given (as typed too)


def find_model(args: EngineArgs) -> ModelFiles:
    return inspect_model(args.model, gguf_file=args.gguf_file, revision=args.revision, cache_dir=args.download_dir)


def model_names(args: EngineArgs, files: ModelFiles) -> ModelNames:
    served = args.served_model_name or files.name
    accepted = {served}
    if files.repo_id is not None and args.model is not None:
        accepted |= {files.repo_id, args.model}  # `org/name` and `org/name:Q4_K_M` alike
    return ModelNames(served, files.name, frozenset(accepted))


def open_tokenizer(args: EngineArgs, files: ModelFiles) -> Tokenizer:
    """The model's tokenizer, or `--tokenizer-path`'s (a .gguf file, a folder with tokenizer.json,
    or a cached repo id), with `--chat-template` in place of its chat template."""
    path = files.path
    if args.tokenizer_path is not None:
        path = locate_model(args.tokenizer_path, revision=args.revision, cache_dir=args.download_dir).path
    try:
        if path.lower().endswith(".gguf"):
            tokenizer = Tokenizer.from_gguf(open_gguf(path))
        else:
            tokenizer = Tokenizer.from_hf_dir(path)
    except (OSError, ValueError) as e:
        if args.tokenizer_path is None:
            raise
        raise ModelLoadError(f"--tokenizer-path {args.tokenizer_path!r}: {e}") from e
    vocab = files.config.vocab_size
    if args.tokenizer_path is not None and tokenizer.vocab_size > vocab:
        raise ModelLoadError(f"--tokenizer-path {args.tokenizer_path!r} has {tokenizer.vocab_size} tokens, more than "
                             f"the model's vocabulary of {vocab} ({os.path.basename(files.path)})")
    if args.chat_template is not None:
        tokenizer.set_chat_template(load_chat_template(args.chat_template))
    return tokenizer
