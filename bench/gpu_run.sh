#!/usr/bin/env bash
# Everything that needs a GPU, in one call (the device machine's time is scarce):
# build hessfast._C for this card, CUDA op tests + op benchmark (gpu_check.sh), the
# pipeline on CUDA against the CPU float64 reference, the Triton kernel tests on CUDA, the CE
# curvature kernel benchmark, the Triton basis ops (with the issue-10 target shape), the fused loss head and
# linear-head CE benchmarks,
# HVP and SLQ benchmarks on the GPU. Results land in $OUT (JSON lines and logs).
# Usage: bash bench/gpu_run.sh
#
# Every step has a timeout; they sum to 470 s so the whole run stays under 8 minutes on an
# H200. A step that times out is reported (rc 124) and the next one runs. The machine has no
# network: when Triton does not import there, the Triton steps are skipped and say so.
set -uo pipefail
OUT=${OUT:-/tmp/hessfast_gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
start=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - start )) s)"; }
# step SECONDS LOG CMD...: run CMD under a timeout, its stdout+stderr to $OUT/LOG, show the tail
step() {
  local secs=$1 log=$2; shift 2
  timeout -k 5 "$secs" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  tail -12 "$OUT/$log"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "!! timed out after $secs s: $*"
  elif [ "$rc" != 0 ]; then echo "!! exit $rc: $*"; fi
}

stamp "build + CUDA op tests + op benchmark"                                            # 100 s
timeout -k 5 100 bash bench/gpu_check.sh > "$OUT/gpu_check.log" 2>&1 \
  || echo "!! gpu_check.sh: exit $?"
tail -25 "$OUT/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if triton_version=$($PY -c "import triton; print(triton.__version__)" 2>&1); then
  HAVE_TRITON=1; echo "triton $triton_version"
else
  HAVE_TRITON=0
  echo "!! Triton does not import here (no network to install it): Triton steps skipped"
  echo "$triton_version" | tail -2
fi
echo "triton: ${triton_version##*$'\n'}" > "$OUT/triton.txt"

stamp "pipeline on CUDA vs CPU float64 reference"                                        # 45 s
step 45 pytest_pipeline_cuda.txt $PY -m pytest -q -p no:cacheprovider tests/kernels/test_cuda.py -m cuda

if [ "$HAVE_TRITON" = 1 ]; then
  stamp "Triton kernels on CUDA: CE curvature product"                                    # 75 s
  step 75 pytest_gpu_kernels.txt \
    $PY -m pytest -q -p no:cacheprovider tests/kernels/test_gpu_kernels.py -m cuda
  if [ -f tests/kernels/test_triton_basis.py ]; then
    stamp "Triton kernels on CUDA: basis ops"                                              # 30 s
    step 30 pytest_triton_basis.txt \
      $PY -m pytest -q -p no:cacheprovider tests/kernels/test_triton_basis.py -m cuda
  else
    echo "tests/kernels/test_triton_basis.py absent: skipped"
  fi
  stamp "CE curvature kernel benchmark (Triton vs eager vs autograd, vs the byte floor)"    # 45 s
  rm -f "$OUT/bench_ce.jsonl"
  step 45 bench_ce.txt $PY bench/bench_ce.py --device cuda --repeats 3 --out "$OUT/bench_ce.jsonl"
  if $PY bench/bench_ops.py --help 2>/dev/null | grep -q triton; then
    stamp "basis ops benchmark, Triton backend"                                            # 30 s
    step 30 bench_ops_triton.txt \
      $PY bench/bench_ops.py --device cuda --quick --backend triton --modes fma,dot --target
  else
    echo "bench/bench_ops.py has no Triton backend: skipped"
  fi
else
  echo "skipped (no Triton): tests/kernels/test_gpu_kernels.py, tests/kernels/test_triton_basis.py," \
    "bench/bench_ce.py, bench/bench_ops.py --backend triton"
fi

if [ -f bench/bench_linear_ce.py ]; then
  stamp "linear-head CE GGN benchmark"                                                     # 25 s
  rm -f "$OUT/bench_linear_ce.jsonl"
  step 25 bench_linear_ce.txt \
    $PY bench/bench_linear_ce.py --device cuda --out "$OUT/bench_linear_ce.jsonl"
else
  echo "bench/bench_linear_ce.py absent: skipped"
fi

stamp "fused cross-entropy loss head vs autograd in ggn/hessian products"              # 30 s
rm -f "$OUT/bench_fused_loss.jsonl"  # --out appends (bench/_harness.py)
step 30 bench_fused_loss.txt \
  $PY bench/bench_fused_loss.py --device cuda --repeats 3 --out "$OUT/bench_fused_loss.jsonl"

stamp "HVP benchmark on the GPU"                                                            # 55 s
rm -f "$OUT/bench_hvp_cuda.jsonl"
timeout -k 5 55 $PY bench/bench_hvp.py --device cuda --quick --out "$OUT/bench_hvp_cuda.jsonl" \
  > /dev/null 2> "$OUT/bench_hvp_cuda.txt" || echo "!! bench_hvp: exit $?"
cat "$OUT/bench_hvp_cuda.txt"
stamp "SLQ block vs one probe at a time on the GPU"                                         # 30 s
timeout -k 5 30 $PY bench/bench_spectrum.py --only slq --device cuda \
  > "$OUT/bench_slq_cuda.jsonl" 2> "$OUT/bench_slq_cuda.txt" || echo "!! bench_slq: exit $?"
cat "$OUT/bench_slq_cuda.txt"
stamp "done"
