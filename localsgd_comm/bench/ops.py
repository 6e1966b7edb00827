"""CPU op benchmarks: the C++ op vs the eager PyTorch composition a user would write vs
torch.compile of that composition, with a memcpy baseline of the same bytes, in one run.

Bandwidth is (bytes read + bytes written) / median time; the memcpy baseline copies half
that many bytes (``dst.copy_(src)`` reads and writes each byte once), so "% of memcpy" compares
like with like. Issue targets (reported, never asserted): fused ``compress_delta`` at 16M
elements >= 4x the eager composition and >= 70% of memcpy bandwidth.

Two entry points:

* pytest-benchmark: ``pytest localsgd_comm/bench/ops.py`` in a checkout (``LOCALSGD_BENCH_QUICK=1``
  limits the sizes to 1M-4M elements; ``LOCALSGD_BENCH_THREADS`` sets intra-op threads, default 1).
* script: ``python -m localsgd_comm.bench.ops [--quick] [--threads 1,2] [--out FILE]`` writes a
  JSON record (machine, versions, commit, every case, ratios, targets) and prints a table;
  ``localsgd-bench kernels`` runs it in a child process, from a checkout or an installed package.
  ``run()`` is the same as a function.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch

import localsgd_comm
from localsgd_comm.bench import report

OPS = torch.ops.localsgd_comm
B = localsgd_comm.DEFAULT_BLOCK_SIZE
QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}
M = 1 << 20
FULL_SIZES = (1 * M, 4 * M, 16 * M, 64 * M)
QUICK_SIZES = (1 * M, 4 * M)
P_REDUCE = 4  # chunks in dequantize_reduce: a 4-rank all-reduce, each chunk numel / 4 elements
LR, MU = 0.7, 0.9
IMPLS = ("ours", "eager", "compile", "memcpy")


# ---- the compositions a user would write (no tail handling: sizes are multiples of B) -----------
def eager_quantize(x: torch.Tensor, fmt: str):
    xb = x.float().view(-1, B)
    scale = xb.abs().amax(dim=1, keepdim=True) / QMAX[fmt]
    v = xb / scale.clamp_min(1e-30)  # guard all-zero blocks
    if fmt == "fp8":
        payload = v.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        q = torch.round(v).clamp_(-QMAX[fmt], QMAX[fmt]).to(torch.int8)
        if fmt == "int4":
            q = q.view(-1, 2)
            q = (q[:, 0] & 0xF) | (q[:, 1] << 4)
        payload = q.view(torch.uint8)
    return payload.reshape(-1), scale.view(-1)


def eager_decode(payload: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "int8":
        return payload.view(torch.int8).float()
    if fmt == "int4":
        b = payload.view(torch.int8)
        return torch.stack([(b << 4) >> 4, b >> 4], dim=-1).reshape(*payload.shape[:-1], -1).float()
    return payload.view(torch.float8_e4m3fn).float()


def eager_dequantize(payload, scales, fmt):
    return (eager_decode(payload, fmt).view(-1, B) * scales[:, None]).view(-1)


def eager_compress_delta(anchor, params, residual, fmt):
    v = anchor - params.float()
    if residual is not None:
        v = v + residual
    payload, scales = eager_quantize(v, fmt)
    if residual is not None:
        residual.copy_(v - eager_dequantize(payload, scales, fmt))
    return payload, scales


def eager_dequantize_reduce(payloads, scales, fmt, factor):
    p = payloads.shape[0]
    vals = eager_decode(payloads, fmt).view(p, -1, B) * scales.view(p, -1, 1)
    return vals.sum(dim=0).view(-1) * factor


def eager_outer_step(anchor, momentum, params, grad, lr, mu):
    # torch.optim.SGD(nesterov=True) written out, in place
    momentum.mul_(mu).add_(grad)
    anchor.sub_(grad.add(momentum, alpha=mu), alpha=lr)
    params.copy_(anchor)


# ---- cases --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    fmt: Optional[str] = None
    residual: bool = False

    @property
    def name(self) -> str:
        return self.op + (f"[{self.fmt}]" if self.fmt else "") + ("+residual" if self.residual else "")


CASES = (
    Case("quantize", "int8"), Case("quantize", "int4"), Case("quantize", "fp8"),
    Case("dequantize", "int8"),
    Case("compress_delta", "int8"), Case("compress_delta", "int4"), Case("compress_delta", "fp8"),
    Case("compress_delta", "int8", residual=True),
    Case("dequantize_reduce", "int8"), Case("dequantize_reduce_requantize", "int8"),
    Case("outer_nesterov_step"), Case("outer_nesterov_step_compressed", "int8"),
)


def _enc_bytes(fmt: str, n: int) -> int:
    return localsgd_comm.functional.compressed_nbytes(fmt, n, B)


def setup_case(case: Case, n: int, device: str = "cpu"):
    """-> (args, ours, eager, bytes read + written). ours/eager take *args; the inputs are made
    on ``device`` (the GPU benchmark makes them there: no host round trip of gigabytes)."""
    g = torch.Generator(device=device).manual_seed(0)
    fmt = case.fmt
    randn = functools.partial(torch.randn, device=device)
    zeros = functools.partial(torch.zeros, device=device)
    if case.op == "quantize":
        x = randn(n, generator=g)
        return ((x,), lambda x: OPS.quantize(x, fmt, B, None, 0), lambda x: eager_quantize(x, fmt),
                4 * n + _enc_bytes(fmt, n))
    if case.op == "dequantize":
        p, s = OPS.quantize(randn(n, generator=g), fmt, B, None, 0)
        return ((p, s), lambda p, s: OPS.dequantize(p, s, fmt, n, B, torch.float32),
                lambda p, s: eager_dequantize(p, s, fmt), _enc_bytes(fmt, n) + 4 * n)
    if case.op == "compress_delta":
        anchor = randn(n, generator=g)
        params = anchor + 1e-3 * randn(n, generator=g)
        res = zeros(n) if case.residual else None
        nbytes = 8 * n + _enc_bytes(fmt, n) + (8 * n if case.residual else 0)
        return ((anchor, params, res), lambda a, p, r: OPS.compress_delta(a, p, r, fmt, B, None),
                lambda a, p, r: eager_compress_delta(a, p, r, fmt), nbytes)
    if case.op in ("dequantize_reduce", "dequantize_reduce_requantize"):
        chunk = n // P_REDUCE
        encs = [OPS.quantize(randn(chunk, generator=g), fmt, B, None, 0) for _ in range(P_REDUCE)]
        ps, ss = torch.stack([e[0] for e in encs]), torch.stack([e[1] for e in encs])
        factor = 1.0 / P_REDUCE
        if case.op == "dequantize_reduce":
            return ((ps, ss), lambda ps, ss: OPS.dequantize_reduce(ps, ss, fmt, chunk, B, factor),
                    lambda ps, ss: eager_dequantize_reduce(ps, ss, fmt, factor),
                    P_REDUCE * _enc_bytes(fmt, chunk) + 4 * chunk)
        return ((ps, ss), lambda ps, ss: OPS.dequantize_reduce_requantize(ps, ss, fmt, chunk, B, factor, None, 0),
                lambda ps, ss: eager_quantize(eager_dequantize_reduce(ps, ss, fmt, factor), fmt),
                (P_REDUCE + 1) * _enc_bytes(fmt, chunk))
    anchor, momentum, params = randn(n, generator=g), zeros(n), torch.empty(n, device=device)
    state_bytes = 4 * n * 2 * 2 + 4 * n  # anchor, momentum read + written; params written
    if case.op == "outer_nesterov_step":
        grad = 1e-3 * randn(n, generator=g)
        return ((anchor, momentum, params, grad),
                lambda a, m, p, gr: OPS.outer_nesterov_step(a, m, p, gr, LR, MU, True),
                lambda a, m, p, gr: eager_outer_step(a, m, p, gr, LR, MU), state_bytes + 4 * n)
    pay, sc = OPS.quantize(1e-3 * randn(n, generator=g), fmt, B, None, 0)
    return ((anchor, momentum, params, pay, sc),
            lambda a, m, p, q, s: OPS.outer_nesterov_step_compressed(a, m, p, q, s, fmt, B, 1.0, LR, MU, True),
            lambda a, m, p, q, s: eager_outer_step(a, m, p, eager_dequantize(q, s, fmt), LR, MU),
            state_bytes + _enc_bytes(fmt, n))


_COMPILED: dict = {}


def compiled(case: Case, eager: Callable) -> Callable:
    # One dynamic-shape compile per case, reused across sizes: a CPU inductor compile costs
    # ~20-60 s on the 2-core machine, a recompile per size would dominate the run.
    if case not in _COMPILED:
        _COMPILED[case] = torch.compile(eager, dynamic=True)
    return _COMPILED[case]


def memcpy_args(nbytes: int):
    half = max(nbytes // 2, 1)
    src = torch.empty(half, dtype=torch.uint8).random_(0, 256)
    return (torch.empty_like(src), src), lambda dst, src: dst.copy_(src)


def time_fn(fn: Callable, args: tuple, min_time: float = 0.4, min_rounds: int = 3,
            max_rounds: int = 30) -> tuple[list[float], list[float]]:
    """-> (wall seconds, process CPU seconds) per round. CPU time is reported next to wall
    time because the 2-core machine is shared: when other processes run, wall time grows
    but the CPU time of a single-threaded call does not."""
    fn(*args)  # warm-up (first-touch page faults, compile)
    times: list[float] = []
    cpu: list[float] = []
    while len(times) < min_rounds or (sum(times) < min_time and len(times) < max_rounds):
        c0, t0 = time.process_time(), time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu


def measure(case: Case, n: int, impls=IMPLS) -> list[dict]:
    args, ours, eager, nbytes = setup_case(case, n)
    rows = []
    for impl in impls:
        if impl == "memcpy":
            a, fn = memcpy_args(nbytes)
        else:
            a, fn = args, {"ours": ours, "eager": eager}.get(impl) or compiled(case, eager)
        times, cpu = time_fn(fn, a)
        med = statistics.median(times)
        rows.append(dict(op=case.op, fmt=case.fmt, residual=case.residual, case=case.name, numel=n,
                         impl=impl, bytes=nbytes, median_s=med, min_s=min(times), rounds=len(times),
                         cpu_median_s=statistics.median(cpu), gbps=nbytes / med / 1e9,
                         gbps_cpu=nbytes / max(statistics.median(cpu), 1e-9) / 1e9,
                         loadavg_1min=os.getloadavg()[0]))
        del a
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["threads"], r["case"], r["numel"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    for threads, name, n in keys:
        by = {r["impl"]: r for r in rows if (r["threads"], r["case"], r["numel"]) == (threads, name, n)}
        t = {k: v["median_s"] for k, v in by.items()}
        s = dict(threads=threads, case=name, numel=n, **{f"{k}_gbps": v["gbps"] for k, v in by.items()})
        if "ours" in t:
            if "eager" in t:
                s["speedup_vs_eager"] = t["eager"] / t["ours"]
            if "compile" in t:
                s["speedup_vs_compile"] = t["compile"] / t["ours"]
            if "memcpy" in t:
                s["pct_of_memcpy"] = 100.0 * by["ours"]["gbps"] / by["memcpy"]["gbps"]
            # best-of-rounds ratios: the least disturbed round of each, for a busy machine
            b = {k: v["min_s"] for k, v in by.items()}
            if "eager" in b:
                s["speedup_vs_eager_best"] = b["eager"] / b["ours"]
            if "memcpy" in b:
                s["pct_of_memcpy_best"] = 100.0 * b["memcpy"] / b["ours"]
            if threads == 1:
                # CPU-time ratios: robust to other processes on the shared machine (one thread
                # only: with several, process CPU time sums the threads)
                c = {k: v["cpu_median_s"] for k, v in by.items()}
                if "eager" in c:
                    s["speedup_vs_eager_cpu"] = c["eager"] / c["ours"]
                if "compile" in c:
                    s["speedup_vs_compile_cpu"] = c["compile"] / c["ours"]
                if "memcpy" in c:
                    s["pct_of_memcpy_cpu"] = 100.0 * by["ours"]["gbps_cpu"] / by["memcpy"]["gbps_cpu"]
        out.append(s)
    return out


def _git_commit() -> str:
    root = report.repo_checkout()  # None from an installed package: no commit to name
    if root is None:
        return "unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "") if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError):
        pass
    return dict(cpu=cpu, logical_cpus=os.cpu_count(), mem_gib=mem, platform=platform.platform())


def run(quick: bool = False, threads=(1,), out: Optional[str] = None, sizes=None, cases=CASES,
        with_compile: bool = True, log=print) -> dict:
    """Measure every case; returns the record and writes it as JSON to ``out`` if given."""
    sizes = tuple(sizes or (QUICK_SIZES if quick else FULL_SIZES))
    impls = tuple(i for i in IMPLS if with_compile or i != "compile")
    rows = []
    for nt in threads:
        torch.set_num_threads(nt)  # also sets the OpenMP team size the C++ kernels use
        for case in cases:
            for n in sizes:
                for r in measure(case, n, impls):
                    r["threads"] = nt
                    rows.append(r)
                    log(f"threads={nt} {r['case']:<36} n={n:>9} {r['impl']:<8} "
                        f"{r['median_s'] * 1e3:9.3f} ms  {r['gbps']:7.2f} GB/s  ({r['rounds']} rounds, "
                        f"cpu {r['cpu_median_s'] * 1e3:.3f} ms, load {r['loadavg_1min']:.1f})")
    summary = summarize(rows)
    targets = []
    for s in summary:
        if s["case"] == "compress_delta[int8]" and s["numel"] == 16 * M:
            targets.append(dict(threads=s["threads"], case=s["case"], numel=s["numel"],
                                speedup_vs_eager=s.get("speedup_vs_eager"), required_speedup=4.0,
                                pct_of_memcpy=s.get("pct_of_memcpy"), required_pct=70.0,
                                speedup_vs_eager_best=s.get("speedup_vs_eager_best"),
                                pct_of_memcpy_best=s.get("pct_of_memcpy_best"),
                                speedup_vs_eager_cpu=s.get("speedup_vs_eager_cpu"),
                                pct_of_memcpy_cpu=s.get("pct_of_memcpy_cpu"),
                                met=bool(s.get("speedup_vs_eager", 0) >= 4.0 and s.get("pct_of_memcpy", 0) >= 70.0)))
    record = dict(
        schema="localsgd-bench-ops/1",
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=machine_info(),
        versions=dict(python=platform.python_version(), torch=torch.__version__,
                      localsgd_comm=getattr(localsgd_comm, "__version__", "unknown")),
        commit=_git_commit(),
        loadavg_at_end=list(os.getloadavg()),
        config=dict(quick=quick, sizes=list(sizes), threads=list(threads), block_size=B, p_reduce=P_REDUCE,
                    impls=list(impls), timing="median of >= 3 rounds (>= 0.4 s total) after one warm-up",
                    bandwidth="(bytes read + bytes written) / median time; memcpy copies half that many bytes"),
        results=rows, summary=summary, targets=targets,
    )
    log("")
    for s in summary:
        log(f"threads={s['threads']} {s['case']:<36} n={s['numel']:>9}  ours {s.get('ours_gbps', 0):6.2f} GB/s  "
            f"x{s.get('speedup_vs_eager', float('nan')):5.2f} vs eager  x{s.get('speedup_vs_compile', float('nan')):5.2f} "
            f"vs compile  {s.get('pct_of_memcpy', float('nan')):5.1f}% of memcpy"
            + (f"   [cpu time: x{s['speedup_vs_eager_cpu']:5.2f} vs eager, {s.get('pct_of_memcpy_cpu', float('nan')):5.1f}% "
               "of memcpy]" if "speedup_vs_eager_cpu" in s else ""))
    for t in targets:
        log(f"TARGET threads={t['threads']} compress_delta[int8] 16M: x{t['speedup_vs_eager']:.2f} vs eager (>= 4), "
            f"{t['pct_of_memcpy']:.1f}% of memcpy (>= 70): {'met' if t['met'] else 'NOT met'}"
            + f"; best rounds x{t['speedup_vs_eager_best']:.2f}, {t['pct_of_memcpy_best']:.1f}%"
            + (f"; by CPU time x{t['speedup_vs_eager_cpu']:.2f}, {t['pct_of_memcpy_cpu']:.1f}%"
               if t.get("speedup_vs_eager_cpu") is not None else ""))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(record, f, indent=1)
        log(f"wrote {out}")
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="sizes 1M and 4M only")
    ap.add_argument("--threads", default="1", help="comma-separated intra-op thread counts, e.g. 1,2")
    ap.add_argument("--out", default=None, help="write the JSON record here")
    ap.add_argument("--sizes", default=None, help="comma-separated element counts (overrides --quick)")
    ap.add_argument("--cases", default=None, help="comma-separated case names or op names to run")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves ~1 min per case)")
    a = ap.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else None
    cases = CASES
    if a.cases:
        want = set(a.cases.split(","))
        cases = tuple(c for c in CASES if c.name in want or c.op in want)
        if not cases:
            ap.error(f"no case matches {a.cases!r}; known: {', '.join(c.name for c in CASES)}")
    run(quick=a.quick, threads=[int(t) for t in a.threads.split(",")], out=a.out, sizes=sizes, cases=cases,
        with_compile=not a.no_compile, log=lambda s: print(s, flush=True))
    return 0


# ---- pytest-benchmark ---------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # script use without pytest installed
    pytest = None

if pytest is not None:
    _SIZES = QUICK_SIZES if os.environ.get("LOCALSGD_BENCH_QUICK") == "1" else FULL_SIZES

    @pytest.fixture(scope="module", autouse=True)
    def _threads():
        old = torch.get_num_threads()
        torch.set_num_threads(int(os.environ.get("LOCALSGD_BENCH_THREADS", "1")))
        yield
        torch.set_num_threads(old)

    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize("n", _SIZES, ids=lambda n: f"{n // M}M")
    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_op(benchmark, case, n, impl):
        args, ours, eager, nbytes = setup_case(case, n)
        if impl == "memcpy":
            args, fn = memcpy_args(nbytes)
        else:
            fn = {"ours": ours, "eager": eager}.get(impl) or compiled(case, eager)
        benchmark.group = f"{case.name} n={n // M}M"
        benchmark.extra_info.update(bytes=nbytes, impl=impl)
        benchmark.pedantic(fn, args=args, rounds=5, warmup_rounds=1)
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9


if __name__ == "__main__":
    sys.exit(main())
