#!/usr/bin/env bash
# The GPU check: one prepared script for a machine with one CUDA GPU and its own torch (no
# network). Most valuable first; every step has its own time limit, the whole run a budget
# (--budget, default 480 s: a step gets what is left when it starts), and a step runs whatever
# failed before it unless it cannot (say so in one line):
#   facts      GPU, driver, python, torch, CUDA, triton, cupy, nvcc, capability (into gpu_check.log)
#   preflight  5 s: what the build needs (CUDA_HOME with include/cuda_runtime.h, nvcc, ninja,
#              a CUDA torch that sees the GPU, pytest, pytest-xdist)
#   build      pip install --no-build-isolation --no-deps -e . with the CUDA kernels for this
#              GPU's architecture only, all cores; if it fails, a CPU-only build follows, so the
#              Triton steps still run (the native ones then report "not built")
#   errors     a C++ error of each build's ops reaches Python as an exception (never a crash; a
#              crash is re-run under cuda-gdb for its native stack)
#   ops        CUDA C++ and Triton ops byte for byte against the CPU kernels (tests/test_cuda.py,
#              the representative matrix; xdist workers share the Triton compiles)
#   backend    the backend with CUDA tensors: world size 1 over NCCL, 2 ranks on one GPU over
#              gloo (staged path), a wait from another stream (tests/test_gpu_backend.py)
#   streams    the backend's own CUDA stream, ordered by events (tests/test_gpu_streams.py): a
#              tensor produced late on the caller's stream is reduced byte-equal to the CPU path
#              (gloo staged, NCCL compressed and passed through), and an async all-reduce over
#              gloo completes while the caller's stream still runs a matmul loop queued after it
#              (no host sync of the caller's stream); timings printed into backend.log
#   train      DiLoCo on the GPU: 2 ranks on one GPU over gloo train the small GPT, replicas
#              bitwise identical; the staged all-reduce timed against gloo fp32
#              (python -m localsgd_comm.bench.gpu_train)
#   bench      every fused op as % of a measured D2D copy: native, Triton, CuPy, eager PyTorch
#              (benchmarks/bench_ops_gpu.py)
#   triton_only  rebuilt without the CUDA kernels (a machine without nvcc): the backend with CUDA
#              tensors and DiLoCo on the GPU through the Triton ops
# Output (at most 8 files): gpu_check.log (the summary: every step's command, tail, exit and
# time), build.log, ops.log, backend.log, train.log, bench.log, gpu_train.json, gpu_ops.json, in
# $OUT (the device tool's output folder) or --out DIR, else benchmarks/results/gpu/. Logs are
# written as the steps run (tee), so a step killed at its limit still leaves its log.
#
# Usage: tools/gpu_check.sh [--budget S] [--out DIR] [--only STEP,STEP]
#        tools/gpu_check.sh --dry-run      print every step it would run, run nothing
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
BUDGET=480
ONLY=""
OUT_DIR=${OUT:-benchmarks/results/gpu}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    --out) OUT_DIR=$2; shift ;;
    --only) ONLY=",$2," ; shift ;;
    *) echo "gpu_check: unknown argument $1 (expected --dry-run, --budget S, --out DIR, --only STEPS)" >&2; exit 2 ;;
  esac
  shift
done
[ "$DRY" = 1 ] && OUT_DIR=$(mktemp -d)  # a dry run leaves the checkout untouched
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR" 2>/dev/null || true
LOG="$OUT_DIR/gpu_check.log"
FAILED=""
START=$SECONDS
export PYTHONUNBUFFERED=1 PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S LOGFILE CMD...: run CMD under min(LIMIT_S, budget left), tee'd to LOGFILE
step() {
  local name=$1 limit=$2 logf=$3
  shift 3
  if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then
    return 0
  fi
  local left=$((BUDGET - (SECONDS - START)))
  [ "$limit" -gt "$left" ] && limit=$left
  say "== $name (limit ${limit}s): $*"
  if [ "$DRY" = 1 ]; then
    return 0
  fi
  if [ "$limit" -lt 5 ]; then
    say "-- $name: SKIPPED: the budget of ${BUDGET}s is spent"
    FAILED="$FAILED $name"
    return 1
  fi
  local t0=$SECONDS rc
  if [ "$logf" = "-" ]; then
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=$?
  else
    echo "== $name: $*" >> "$OUT_DIR/$logf"
    timeout --signal=INT --kill-after=10 "$limit" "$@" >> "$OUT_DIR/$logf" 2>&1
    rc=$?
    tail -n 25 "$OUT_DIR/$logf" | tee -a "$LOG"
  fi
  local why=""
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && why=" (timed out)"
  say "-- $name: exit $rc$why after $((SECONDS - t0)) s; $((SECONDS - START)) s of ${BUDGET}s used"
  [ "$rc" = 0 ] || FAILED="$FAILED $name"
  return "$rc"
}

: > "$LOG"
say "tools/gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)') budget ${BUDGET}s"

step facts 25 - sh -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv; nproc; \
$PY -c 'import sys, torch; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"nccl\", torch.cuda.nccl.version() if torch.cuda.is_available() else None); print(\"gpu\", torch.cuda.get_device_name(0), \"capability\", torch.cuda.get_device_capability(0), \"SMs\", torch.cuda.get_device_properties(0).multi_processor_count)'; \
$PY -c 'import triton; print(\"triton\", triton.__version__)'; $PY -c 'import cupy; print(\"cupy\", cupy.__version__)'; \
$PY -c 'from torch.utils.cpp_extension import CUDA_HOME; print(\"CUDA_HOME\", CUDA_HOME)'; nvcc --version | tail -n 2; echo CC=\${CC:-} CXX=\${CXX:-}; g++ --version | head -n 1"

# Code for this GPU only (a full arch list doubles the nvcc time).
ARCH=$($PY -c 'import torch; c = torch.cuda.get_device_capability(0); print(f"{c[0]}.{c[1]}")' 2>/dev/null || echo "9.0")
step preflight 10 - $PY tools/gpu_preflight.py

# The system compilers when they exist: the GPU image's CC/CXX point at a toolchain that links
# libstdc++ statically, which setup.py refuses (two C++ runtimes in one process crash on errors).
COMPILERS=""
[ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ] && COMPILERS="CC=/usr/bin/gcc CXX=/usr/bin/g++"
if step build 200 build.log env $COMPILERS TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" LOCALSGD_COMM_CUDA=1 \
    $PY -m pip install --no-build-isolation --no-deps -v -e .; then
  :
elif [ "$DRY" = 0 ] && { [ -z "$ONLY" ] || [[ "$ONLY" == *",build,"* ]]; }; then
  say "-- build: the CUDA build failed (build.log); building without the CUDA kernels so the Triton steps run"
  step build_cpu 150 build.log env $COMPILERS LOCALSGD_COMM_CUDA=0 MAX_JOBS="$(nproc)" \
    $PY -m pip install --no-build-isolation --no-deps -e .
fi

step errors 60 - $PY tools/gpu_error_check.py

XDIST=""
$PY -c 'import xdist' 2>/dev/null && XDIST="-n 8"
step ops 150 ops.log $PY -m pytest tests/test_cuda.py -m gpu -q -p no:cacheprovider $XDIST
step backend 130 backend.log $PY -m pytest tests/test_gpu_backend.py tests/test_elastic.py -m gpu -q -p no:cacheprovider
step streams 90 backend.log $PY -m pytest tests/test_gpu_streams.py -m gpu -q -s -p no:cacheprovider
step train 100 train.log $PY -m localsgd_comm.bench.gpu_train --out "$OUT_DIR/gpu_train.json"
step bench 130 bench.log $PY benchmarks/bench_ops_gpu.py --out "$OUT_DIR/gpu_ops.json"

# Last, since it replaces the build: a Triton-only install (the extension without CUDA kernels,
# as a machine without nvcc gets) must still serve CUDA tensors: the backend with CUDA tensors and
# DiLoCo on the GPU, the ops through Triton.
step build_triton_only 120 build.log env $COMPILERS LOCALSGD_COMM_CUDA=0 MAX_JOBS="$(nproc)" \
  $PY -m pip install --no-build-isolation --no-deps -e .
step triton_only 120 backend.log env LOCALSGD_COMM_CUDA_IMPL=triton $PY -m pytest tests/test_gpu_backend.py -q \
  -p no:cacheprovider -k "two_ranks or diloco or cpu_over_an_nccl"

if [ "$DRY" = 1 ]; then
  say "gpu_check: dry run, nothing ran"
  exit 0
fi
if [ -z "$FAILED" ]; then
  say "gpu_check: every step passed in $((SECONDS - START)) s; logs in $OUT_DIR"
  exit 0
fi
say "gpu_check: failed:$FAILED ($((SECONDS - START)) s); logs in $OUT_DIR"
exit 1
