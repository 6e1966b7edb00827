"""GPU op benchmarks: every fused op, CUDA C++ ("native") and Triton, as a percentage of a
device-to-device copy of the same bytes measured in the same run, next to two baselines a user
could write: the eager PyTorch composition, and hand-written CuPy kernels (a fused RawKernel
for the block-wise int8 quantize / compress_delta, ElementwiseKernels for the rest) for the
int8 cases. CuPy is a benchmark baseline only, never a dependency of the package.

The cases, their byte counts (bytes read + bytes written) and the eager compositions are those
of the CPU benchmark (``localsgd_comm/bench/ops.py``); inputs are made on the GPU. A time is the
median over 7 repeats of (10 back-to-back calls between two CUDA events) / 10, after 3 warm-up
calls (the first calls of a Triton kernel compile it). Run by ``tools/gpu_check.sh``::

    python benchmarks/bench_ops_gpu.py --out gpu_ops.json [--sizes 67108864,268435456]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

import localsgd_comm  # noqa: E402
from localsgd_comm.bench import ops as bench_ops  # noqa: E402  (cases, inputs, byte counts, eager compositions)
from localsgd_comm.kernels import cuda as cuda_impl  # noqa: E402

B = bench_ops.B


def cuda_time(fn, args, repeats: int = 7, inner: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


# ---- CuPy baselines (int8, block B): what a user would write by hand ------------------------------
_CUPY_SRC = r"""
extern "C" __global__ void quant_int8(const float* __restrict__ a, const float* __restrict__ p,
                                      signed char* __restrict__ q, float* __restrict__ scale,
                                      long long nblocks, int delta) {
  // one warp per block of 128 elements: 4 per lane, float4 loads, a shuffle max
  long long blk = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x & 31;
  if (blk >= nblocks) return;
  long long i = blk * 128 + lane * 4;
  float4 v = *reinterpret_cast<const float4*>(a + i);
  if (delta) {
    float4 w = *reinterpret_cast<const float4*>(p + i);
    v.x -= w.x; v.y -= w.y; v.z -= w.z; v.w -= w.w;
  }
  float m = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
  float s = m / 127.0f;
  float inv = s > 0.f ? 1.0f / s : 0.f;
  char4 c;
  c.x = (signed char)rintf(v.x * inv); c.y = (signed char)rintf(v.y * inv);
  c.z = (signed char)rintf(v.z * inv); c.w = (signed char)rintf(v.w * inv);
  *reinterpret_cast<char4*>(q + i) = c;
  if (lane == 0) scale[blk] = s;
}
"""


def cupy_cases(n: int):
    """-> {case name: (fn, args)} with the same inputs and bytes as bench_ops' cases, or {} when
    CuPy is missing (the reason is printed)."""
    try:
        import cupy as cp
    except ImportError as exc:
        print(f"cupy baseline: skipped ({exc})", flush=True)
        return {}
    quant = cp.RawKernel(_CUPY_SRC, "quant_int8")
    deq = cp.ElementwiseKernel("raw T q, raw float32 s", "float32 y", "y = (float)q[i] * s[i / 128]", "deq_int8")
    red = cp.ElementwiseKernel(
        "raw T q, raw float32 s, int64 chunk, int32 p, float32 f", "float32 y",
        "float acc = 0.f; for (int r = 0; r < p; ++r) acc += (float)q[r * chunk + i] * s[(r * chunk + i) / 128];"
        " y = acc * f;", "deq_reduce_int8")
    outer = cp.ElementwiseKernel(
        "float32 g, float32 lr, float32 mu", "float32 a, float32 m, float32 prm",
        "m = mu * m + g; a = a - lr * (g + mu * m); prm = a;", "outer_nesterov")
    nb = n // B
    threads = 256

    def quantize(x):
        xc = cp.from_dlpack(x)
        q = cp.empty(n, dtype=cp.int8)
        s = cp.empty(nb, dtype=cp.float32)
        quant(((nb + threads // 32 - 1) // (threads // 32),), (threads,), (xc, xc, q, s, cp.int64(nb), cp.int32(0)))
        return q, s

    def compress_delta(a, p):
        ac, pc = cp.from_dlpack(a), cp.from_dlpack(p)
        q = cp.empty(n, dtype=cp.int8)
        s = cp.empty(nb, dtype=cp.float32)
        quant(((nb + threads // 32 - 1) // (threads // 32),), (threads,), (ac, pc, q, s, cp.int64(nb), cp.int32(1)))
        return q, s

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, generator=g, device="cuda")
    params = x + 1e-3 * torch.randn(n, generator=g, device="cuda")
    q, s = quantize(x)
    chunk = n // bench_ops.P_REDUCE
    qs = cp.from_dlpack(torch.randint(-127, 128, (bench_ops.P_REDUCE * chunk,), dtype=torch.int8, device="cuda"))
    ss = cp.from_dlpack(torch.rand(bench_ops.P_REDUCE * chunk // B, device="cuda"))
    a, m, prm = (cp.from_dlpack(torch.randn(n, generator=g, device="cuda")), cp.zeros(n, dtype=cp.float32),
                 cp.empty(n, dtype=cp.float32))
    grad = cp.from_dlpack(1e-3 * torch.randn(n, generator=g, device="cuda"))
    return {
        "quantize[int8]": (quantize, (x,)),
        "compress_delta[int8]": (compress_delta, (x, params)),
        "dequantize[int8]": (lambda q, s: deq(q, s, size=n), (q, s)),
        "dequantize_reduce[int8]": (lambda q, s: red(q, s, chunk, bench_ops.P_REDUCE, 1.0 / bench_ops.P_REDUCE,
                                                     size=chunk), (qs, ss)),
        "outer_nesterov_step": (lambda g_, a_, m_, p_: outer(g_, bench_ops.LR, bench_ops.MU, a_, m_, p_),
                                (grad, a, m, prm)),
    }


def cupy_agreement(n: int = 1 << 22) -> dict:
    """The CuPy int8 quantize against ours on the same input: scales' max relative difference and
    the largest payload difference (a baseline that computed something else would be no baseline)."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        return {}
    fn, (x,) = cupy_cases(n)["quantize[int8]"]
    q, s = fn(x)
    ps, ss = localsgd_comm.functional.quantize(x, "int8", B)
    qt = torch.from_dlpack(q).to(torch.int16)
    return {"scale_max_rel_diff": float(((torch.from_dlpack(s) - ss).abs() / ss.abs().clamp_min(1e-30)).max()),
            "payload_max_abs_diff": int((qt - ps.view(torch.int8).to(torch.int16)).abs().max())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=f"{64 << 20},{256 << 20}", help="comma-separated element counts")
    ap.add_argument("--impls", default="native,native:cap8,triton",
                    help="comma-separated: native, triton; native:capK = native with grids capped at K CTAs per SM")
    ap.add_argument("--out", required=True, help="JSON result file")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ops_gpu: no CUDA device visible", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    dev = "cuda"
    impls = []
    for impl in a.impls.split(","):
        _select(impl)
        got = cuda_impl.active_implementation()
        if got != impl.split(":")[0]:
            print(f"bench_ops_gpu: {impl} is not available here ({got}); skipped", flush=True)
            continue
        impls.append(impl)
    rows = []
    meta = {"benchmark": "gpu_ops", "impls": impls, "gpu": torch.cuda.get_device_name(0),
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                         "triton": _version("triton"), "cupy": _version("cupy")},
            "bandwidth": "(bytes read + bytes written) / median time; the D2D copy moves the same bytes",
            "timing": "median of 7 x (10 calls between CUDA events), after 3 warm-up calls"}
    for n in (int(s) for s in a.sizes.split(",")):
        # the copy ceiling at this size: a D2D copy of 4n bytes (8n bytes moved)
        src = torch.empty(4 * n, dtype=torch.uint8, device=dev).random_(0, 256)
        dst = torch.empty_like(src)
        t_big = cuda_time(lambda d, s_: d.copy_(s_), (dst, src))
        del src, dst
        print(f"n={n}: D2D copy of {4 * n / 1e9:.2f} GB: {8 * n / t_big / 1e9:.0f} GB/s (read + write)", flush=True)
        cupy = cupy_cases(n)
        for case in bench_ops.CASES:
            half = None
            row = {"case": case.name, "numel": n}
            for impl in impls:
                _select(impl)
                args, ours, eager, nbytes = bench_ops.setup_case(case, n, dev)
                if half is None:
                    half = max(nbytes // 2, 1)
                    src = torch.empty(half, dtype=torch.uint8, device=dev).random_(0, 256)
                    dst = torch.empty_like(src)
                    row.update(bytes=nbytes, copy_s=cuda_time(lambda d, s_: d.copy_(s_), (dst, src)))
                    del src, dst
                    row["eager_s"] = cuda_time(eager, bench_ops.setup_case(case, n, dev)[0])
                t = cuda_time(ours, args)
                row[f"{impl}_s"] = t
                row[f"{impl}_pct_of_copy"] = 100.0 * row["copy_s"] / t
                del args
            if case.name in cupy:
                fn, cargs = cupy[case.name]
                row["cupy_s"] = cuda_time(fn, cargs)
                row["cupy_pct_of_copy"] = 100.0 * row["copy_s"] / row["cupy_s"]
            if "bytes" not in row:
                continue
            row["eager_pct_of_copy"] = 100.0 * row["copy_s"] / row["eager_s"]
            rows.append(row)
            _write(a.out, meta, rows)  # after every row: a step killed at its limit keeps what it measured
            cells = "  ".join(f"{k[:-12]} {row[k]:5.1f}%" for k in row if k.endswith("_pct_of_copy"))
            cells = cells.replace("native:cap8", "cap8")
            print(f"{case.name:<38} n={n:>10} copy {row['bytes'] / row['copy_s'] / 1e9:6.0f} GB/s  {cells}", flush=True)
        torch.cuda.empty_cache()
    meta.update(cupy_agreement=cupy_agreement(), seconds=time.perf_counter() - t0, complete=True)
    _write(a.out, meta, rows)
    return 0


def _select(impl: str) -> None:
    """Make ``impl`` ("native", "triton", "native:capK") serve the CUDA ops."""
    name, _, cap = impl.partition(":")
    os.environ[cuda_impl.ENV_VAR] = name
    cuda_impl._reset_for_tests()
    if getattr(localsgd_comm._C, "cuda_set_grid_cap", None) is not None:
        localsgd_comm._C.cuda_set_grid_cap(int(cap[3:]) if cap.startswith("cap") else 0)


def _write(path: str, meta: dict, rows: list) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)
    os.replace(path + ".tmp", path)


def _version(mod: str):
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001 - a missing optional module is just "None"
        return None


if __name__ == "__main__":
    sys.exit(main())
