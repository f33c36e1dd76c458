#!/usr/bin/env bash
# The peer comparison on a GPU machine (the device machine has no network: the peers travel as
# wheels in .whl/, see the device README). Builds hessfast._C for the card first.
# Usage: bash bench/gpu_compare.sh [compare.py args...]
set -uo pipefail
OUT=${OUT:-/tmp/hessfast_gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
bash bench/gpu_check.sh --no-bench > "$OUT/gpu_build.log" 2>&1 || { tail -30 "$OUT/gpu_build.log"; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 bench/compare.py --device cuda "$@" 2>&1 | tee "$OUT/compare_cuda.log" | tail -60
cp bench/results/compare_cuda* "$OUT/" 2>/dev/null  # compare_cuda-<date>-<commit7>.*
