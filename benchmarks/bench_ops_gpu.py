"""GPU op benchmarks: each op's CUDA implementation (CUDA C++ or Triton, chosen by
``LOCALSGD_COMM_CUDA_IMPL``) as a percentage of a device-to-device copy of the same bytes,
measured in the same run, and against the eager PyTorch composition on the GPU.

The cases, their inputs and their byte counts (bytes read + bytes written) are those of the CPU
benchmark (``benchmarks/bench_ops.py``); inputs are made on the CPU and moved to the GPU. Times
are CUDA-event medians of 20 calls after 3 warm-up calls. Run by ``tools/gpu_check.sh``::

    LOCALSGD_COMM_CUDA_IMPL=native python benchmarks/bench_ops_gpu.py --out results/gpu/ops_native.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_ops  # noqa: E402  (cases, inputs, byte counts, eager compositions)

import localsgd_comm  # noqa: E402


def _to(args, dev):
    return tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)


def cuda_time(fn, args, rounds: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=f"{16 << 20},{64 << 20}", help="comma-separated element counts")
    ap.add_argument("--out", required=True, help="JSON result file")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ops_gpu: no CUDA device visible", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    impl = localsgd_comm.kernels.cuda.active_implementation()
    rows = []
    for n in (int(s) for s in a.sizes.split(",")):
        copy_src = None
        for case in bench_ops.CASES:
            args, ours, eager, nbytes = bench_ops.setup_case(case, n)
            args = _to(args, dev)
            half = max(nbytes // 2, 1)
            if copy_src is None or copy_src.numel() != half:
                copy_src = torch.empty(half, dtype=torch.uint8, device=dev).random_(0, 256)
            dst = torch.empty_like(copy_src)
            t_copy = cuda_time(lambda d, s: d.copy_(s), (dst, copy_src))
            t_ours = cuda_time(ours, args)
            t_eager = cuda_time(eager, _to(bench_ops.setup_case(case, n)[0], dev))
            row = {"case": case.name, "numel": n, "impl": impl, "bytes": nbytes, "ours_s": t_ours, "eager_s": t_eager,
                   "copy_s": t_copy, "ours_gbps": nbytes / t_ours / 1e9, "copy_gbps": nbytes / t_copy / 1e9,
                   "pct_of_copy": 100.0 * t_copy / t_ours, "speedup_vs_eager": t_eager / t_ours}
            rows.append(row)
            print(f"{impl:>6} {case.name:<38} n={n:>9} {1e3 * t_ours:8.3f} ms {row['ours_gbps']:8.1f} GB/s "
                  f"{row['pct_of_copy']:6.1f}% of a D2D copy  x{row['speedup_vs_eager']:5.2f} vs eager", flush=True)
    out = {"benchmark": "gpu_ops", "impl": impl, "gpu": torch.cuda.get_device_name(0),
           "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
           "bandwidth": "(bytes read + bytes written) / median time; the D2D copy moves the same bytes",
           "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
