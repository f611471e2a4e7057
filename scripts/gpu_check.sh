#!/usr/bin/env bash
# The CUDA check run on a lent GPU machine (no registry there: gguf travels as a wheel in .whl/).
# Runs the executor's tests on CUDA, then the engine benchmark on a random SmolLM2-shaped model.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
RADIXFAIR_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_model.py tests/test_prefix_cache.py ${EXTRA_TESTS:-} 2>&1 | tee "$OUT/tests.log" | tail -25
PYTHONPATH="$PYTHONPATH:$PWD/tests" python3 -m fixtures.make_random_model /tmp/smol-random >/dev/null 2>&1
timeout 240 python3 -m radixfair.cli bench engine --model /tmp/smol-random --num-requests 64 --max-batch 32 \
  --json "$OUT/bench_engine_cuda.json" 2>&1 | grep -v Warning | tail -12
