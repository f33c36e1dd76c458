#!/usr/bin/env bash
# One-shot GPU check for the lead (and the device machine): build with CUDA for this card,
# run the CUDA tests, then the quick CUDA benchmark. Usage: bash bench/gpu_check.sh [--full|--no-bench]
set -uo pipefail
OUT=${OUT:-/tmp/hessfast_gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
PY=${PYTHON:-python3}
ARCH=${CUDA_ARCH:-$($PY -c "import torch;c=torch.cuda.get_device_capability();print(f'{c[0]}{c[1]}')")}
cmake -S . -B build/gpu -DHESSFAST_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
  -DPython_EXECUTABLE="$(command -v $PY)" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" \
  > "$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
cmake --build build/gpu -j "$(nproc)" > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
cp build/gpu/_C*.so hessfast/
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "from hessfast import _native; print(_native.build_info())"
if [ "${1:-}" = "--no-bench" ]; then exit 0; fi  # build only (bench/gpu_compare.sh)
$PY -m pytest -q -x -p no:cacheprovider tests/kernels/test_ops.py -m cuda 2>&1 | tee "$OUT/pytest_cuda.txt" | tail -15
if [ "${1:-}" = "--full" ]; then Q=""; else Q="--quick"; fi
$PY bench/bench_ops.py --device cuda $Q 2>&1 | tee "$OUT/bench_cuda.jsonl"
