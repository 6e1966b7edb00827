#!/usr/bin/env bash
# The GPU check: one prepared script for a machine with one CUDA GPU and its own torch (no
# network). It builds the package against that torch and runs, each step under a time limit
# (480 s in all, so the whole run stays under 8 minutes):
#   1. machine facts (GPU, driver, torch, CUDA, triton);
#   2. build: pip install --no-build-isolation --no-deps -e . (CUDA C++ for this GPU's arch);
#   3. GPU op tests: CUDA C++ and Triton byte for byte against the CPU kernels, every format,
#      dtype and odd size (tests/test_cuda.py, marker gpu);
#   4. the backend with CUDA tensors: world size 1 over NCCL, 2 ranks on one GPU over gloo, a
#      device other than cuda:0 where there are two GPUs, and a DiLoCo sync of a CUDA model with
#      bitwise-identical replicas (tests/test_gpu_backend.py);
#   5. the kernel benchmark as % of a device-to-device copy, CUDA C++ then Triton
#      (benchmarks/bench_ops_gpu.py).
# Raw logs go to $OUT (the device tool's output folder) or benchmarks/results/gpu/; commit them.
#
# Usage: tools/gpu_check.sh            run every step
#        tools/gpu_check.sh --dry-run  print every step it would run, run nothing
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT_DIR=${OUT:-benchmarks/results/gpu}
[ "$DRY" = 1 ] && OUT_DIR=$(mktemp -d)  # a dry run leaves the checkout untouched
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR" 2>/dev/null || true
LOG="$OUT_DIR/gpu_check.log"
FAILED=0

step() {  # step NAME LIMIT_S CMD...: run CMD with a time limit, its output to the log and NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  if [ "$DRY" = 1 ]; then
    return 0
  fi
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT_DIR/$name.log" | tee -a "$LOG"
  echo "-- $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
  return 0
}

: > "$LOG"
echo "tools/gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" | tee -a "$LOG"
step facts 20 sh -c "nvidia-smi; $PY -c 'import torch, sys; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.get_device_name(0), \"capability\", torch.cuda.get_device_capability(0)); import triton; print(\"triton\", triton.__version__)'"
# Code for this GPU only (a full arch list doubles the nvcc time); MAX_JOBS: the machine's cores.
ARCH=$($PY -c 'import torch; c = torch.cuda.get_device_capability(0); print(f"{c[0]}.{c[1]}+PTX")' 2>/dev/null || echo "9.0+PTX")
step build 170 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" LOCALSGD_COMM_CUDA=1 \
  $PY -m pip install --no-build-isolation --no-deps -v -e .
step gpu_op_tests 110 $PY -m pytest tests/test_cuda.py -m gpu -q -p no:cacheprovider
step gpu_backend_tests 80 $PY -m pytest tests/test_gpu_backend.py -q -p no:cacheprovider
step bench_native 40 env LOCALSGD_COMM_CUDA_IMPL=native $PY benchmarks/bench_ops_gpu.py --out "$OUT_DIR/bench_ops_native.json"
step bench_triton 60 env LOCALSGD_COMM_CUDA_IMPL=triton $PY benchmarks/bench_ops_gpu.py --out "$OUT_DIR/bench_ops_triton.json"
echo "gpu_check: $FAILED step(s) failed; logs in $OUT_DIR" | tee -a "$LOG"
[ "$DRY" = 1 ] && exit 0
[ "$FAILED" = 0 ]
