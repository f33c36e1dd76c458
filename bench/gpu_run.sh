#!/usr/bin/env bash
# Everything that needs a GPU, in one call (the device machine's time is scarce):
# build hessfast._C for this card, CUDA op tests + op benchmark (gpu_check.sh), the
# pipeline on CUDA against the CPU float64 reference, HVP and SLQ benchmarks on the GPU.
# Results land in $OUT (JSON lines and logs). Usage: bash bench/gpu_run.sh
set -uo pipefail
OUT=${OUT:-/tmp/hessfast_gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
start=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - start )) s)"; }
stamp "build + CUDA op tests + op benchmark"
bash bench/gpu_check.sh > "$OUT/gpu_check.log" 2>&1; tail -25 "$OUT/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stamp "pipeline on CUDA vs CPU float64 reference"
$PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -m cuda 2>&1 | tee "$OUT/pytest_pipeline_cuda.txt" | tail -8
stamp "HVP benchmark on the GPU"
timeout 150 $PY bench/bench_hvp.py --device cuda --repeats 5 --out "$OUT/bench_hvp_cuda.jsonl" \
  > /dev/null 2> "$OUT/bench_hvp_cuda.txt"; cat "$OUT/bench_hvp_cuda.txt"
stamp "SLQ block vs one probe at a time on the GPU"
timeout 120 $PY bench/bench_spectrum.py --only slq --device cuda \
  > "$OUT/bench_slq_cuda.jsonl" 2> "$OUT/bench_slq_cuda.txt"; cat "$OUT/bench_slq_cuda.txt"
stamp "done"
