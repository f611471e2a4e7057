#!/usr/bin/env bash
# the tune benchmark (scaled to this loaded 2-core machine): record bench fairness's workload through
# serve --record-trace, tune on it, measure the recommended and the default quantum with bench fairness --trace
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD
PY=${PY:-.venv/bin/python}
B=${OUT:-/tmp/tune-bench}
mkdir -p $B
rm -f $B/rec.jsonl*
ENG="--max-total-tokens 1100 --max-running-requests 16 --num-threads 1"
$PY -m radixfair.cli serve --port 30718 --schedule-policy dlpm $ENG --record-trace $B/rec.jsonl > $B/serve.log 2>&1 &
SPID=$!
for i in $(seq 120); do curl -sf http://127.0.0.1:30718/health && break; sleep 1; done
echo "== record $(date -u +%T)"
$PY benchmarks/replay_http.py --url http://127.0.0.1:30718 --duration 60 --clients 4 --rate 0.2 --doc-len 128,192
curl -s http://127.0.0.1:30718/fairness > $B/fairness_live.json
kill $SPID; wait $SPID
wc -l $B/rec.jsonl
echo "== tune $(date -u +%T)"
$PY -m radixfair.cli tune --trace $B/rec.jsonl --profile benchmarks/tune/cpu-loaded.json --max-total-tokens 1100 \
    --max-running-requests 16 --jain-target 0.9 --policies dlpm --quanta 256,512,1024,2048,4096 \
    --json $B/tune.json --plot $B/tune.png
$PY -m radixfair.cli tune --trace $B/rec.jsonl --profile benchmarks/tune/cpu-loaded.json --max-total-tokens 1100 \
    --max-running-requests 16 --jain-target 0.9 --quanta 256,512,1024,2048,4096 --json $B/tune_all.json
Q=$($PY -c "import json; print(int([r for r in json.load(open('$B/tune.json')) if r['recommended']][0]['quantum']))")
echo "recommended quantum: $Q"
echo "== measure recommended $(date -u +%T)"
$PY -m radixfair.cli bench fairness --trace $B/rec.jsonl --policies dlpm --dlpm-quantum $Q $ENG \
    --no-progress --json $B/measured_rec.json
echo "== measure default $(date -u +%T)"
$PY -m radixfair.cli bench fairness --trace $B/rec.jsonl --policies dlpm --dlpm-quantum 4096 $ENG \
    --no-progress --json $B/measured_default.json
echo "== done $(date -u +%T)"
