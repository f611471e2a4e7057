#!/usr/bin/env bash
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD
PY=${PY:-.venv/bin/python}
B=${OUT:-/tmp/tune-bench}
ENG="--max-total-tokens 1100 --max-running-requests 16 --num-threads 1"
for Q in 1024 4096; do
  echo "== repeat Q=$Q $(date -u +%T)"
  $PY -m radixfair.cli bench fairness --trace $B/rec.jsonl --policies dlpm --dlpm-quantum $Q $ENG --no-progress --json $B/measured_rep_$Q.json | grep "│ dlpm"
done
echo "== done $(date -u +%T)"
