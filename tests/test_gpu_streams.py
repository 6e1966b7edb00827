"""The backend's CUDA stream discipline (marker ``gpu``: skipped without a GPU; run by
``tools/gpu_check.sh``, step ``streams``).

A CUDA call runs on the backend's own stream of the device, ordered after the caller's current
stream by an event recorded when the call is made; the Work's completion event is recorded on
the backend stream and ``wait()`` makes the waiting stream wait for it ("Streams" in
csrc/c10d/worker.cpp). So:

* a tensor produced at the tail of a long queue on the caller's stream is reduced only once it
  is produced: the result equals the CPU path's byte for byte (2 ranks on one GPU over gloo, the
  staged path; world size 1 over NCCL, compressed and passed through);
* an asynchronous compressed all-reduce over gloo completes while the caller's stream is still
  busy with a matmul loop queued *after* it: the staged transport's host waits block only the
  backend stream, never the caller's. (Before, the worker synchronized the caller's stream, so
  the Work could only complete after the whole loop.) The timings are printed, not asserted.
"""
import json
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist

from localsgd_comm import BackendOptions

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dist import run_ranks  # noqa: E402

pytestmark = pytest.mark.gpu
# ~0.2 s of a spin kernel on the caller's stream (at ~2 GHz): the tensor is produced behind it
SPIN_CYCLES = 400_000_000


def _inputs(rank, n, dtype):
    g = torch.Generator().manual_seed(2000 + rank)
    return (torch.randn(n, generator=g) * (1 + rank)).to(dtype)


def _late_tensor(x_cpu, dev):
    """A CUDA copy of x_cpu written by a kernel queued behind a spin kernel on the current stream:
    a collective that does not wait for the caller's stream reads zeros."""
    src = x_cpu.to(dev)
    t = torch.zeros_like(src)
    torch.cuda.synchronize()
    torch.cuda._sleep(SPIN_CYCLES)
    t.copy_(src)
    return t


def _w_ordered_after_caller(rank, p, cases):
    dev = torch.device("cuda:0")
    out = []
    for n, dtype, asyn in cases:
        x = _inputs(rank, n, dtype)
        ref = x.clone()
        dist.all_reduce(ref, op=dist.ReduceOp.AVG)  # the CPU path
        t = _late_tensor(x, dev)
        work = dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=asyn)
        if asyn:
            work.wait()
        got = (t * 1).cpu()  # a kernel on the caller's stream after wait(): must see the result
        out.append(bool(torch.equal(got.float(), ref.float())))
    return out


@pytest.mark.parametrize("fmt", ("int8", "int4", "fp8"))
def test_staged_path_waits_for_the_callers_stream_and_equals_the_cpu_path(fmt):
    cases = [(65537, torch.float32, False), (1 << 20, torch.float32, True), (4099, torch.bfloat16, True)]
    res = run_ranks(_w_ordered_after_caller, 2, cases, backend="localsgd", timeout=240,
                    pg_options=BackendOptions(format=fmt, threshold_bytes=0, cuda_inner="gloo"))
    assert all(all(r) for r in res), res


def test_one_rank_over_nccl_compressed_and_passed_through_are_ordered_after_the_caller():
    if not dist.is_nccl_available():
        pytest.skip("no NCCL in this torch")
    dist.init_process_group("localsgd", store=dist.HashStore(), rank=0, world_size=1,
                            pg_options=BackendOptions(format="int8", threshold_bytes=4096, cuda_inner="nccl"))
    try:
        dev = torch.device("cuda:0")
        assert _w_ordered_after_caller(0, 1, [(70001, torch.float32, False), (70001, torch.float32, True),
                                             (100, torch.float32, True)]) == [True] * 3  # the last one passes through
        # other collectives pass through, issued with the backend stream current
        x = torch.arange(5000, dtype=torch.int64)
        t = _late_tensor(x, dev)
        dist.broadcast(t, src=0, async_op=True).wait()
        assert torch.equal((t + 0).cpu(), x)
        t = _late_tensor(x, dev)
        dist.all_reduce(t, async_op=True).wait()  # int64: passes through (dtype)
        assert torch.equal((t + 0).cpu(), x)
    finally:
        dist.destroy_process_group()


def _matmul_loop(a, b, count):
    for _ in range(count):
        torch.mm(a, b)


def _w_overlap(rank, p, n):
    dev = torch.device("cuda:0")
    torch.cuda.set_device(dev)
    x = _inputs(rank, n, torch.float32)
    ref = x.clone()
    dist.all_reduce(ref, op=dist.ReduceOp.AVG)  # the CPU path
    a = torch.randn(12288, 12288, device=dev, dtype=torch.bfloat16)
    b = torch.randn(12288, 12288, device=dev, dtype=torch.bfloat16)
    # warm-up: cuBLAS, the backend stream, the workspace, the pinned mirror, gloo's pairs
    warm = x.to(dev)
    dist.all_reduce(warm, op=dist.ReduceOp.AVG)
    _matmul_loop(a, b, 3)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    _matmul_loop(a, b, 10)
    e.record()
    e.synchronize()
    one_ms = s.elapsed_time(e) / 10
    count = max(20, min(400, int(1500 / max(one_ms, 1e-3))))  # ~1.5 s of the caller's compute
    t = x.to(dev)
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    work = dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True)
    t_issue = time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    _matmul_loop(a, b, count)  # queued on the caller's stream after the all-reduce was issued
    end.record()
    t_launch = time.perf_counter() - t0
    while not work.is_completed() and time.perf_counter() - t0 < 120:
        time.sleep(0.0005)
    t_done = time.perf_counter() - t0
    caller_busy_at_done = not end.query()  # the loop was still running when the all-reduce ended
    work.wait()
    got = (t * 1).cpu()
    end.synchronize()
    t_loop = time.perf_counter() - t0
    rec = {"rank": rank, "elements": n, "matmuls": count, "matmul_ms": round(one_ms, 3),
           "issue_ms": round(1e3 * t_issue, 3), "launch_ms": round(1e3 * t_launch, 1),
           "allreduce_done_ms": round(1e3 * t_done, 1), "caller_loop_done_ms": round(1e3 * t_loop, 1),
           "caller_loop_gpu_ms": round(start.elapsed_time(end), 1), "caller_busy_at_done": caller_busy_at_done,
           "equal_to_cpu": bool(torch.equal(got, ref))}
    print("overlap", json.dumps(rec), flush=True)
    return rec


def test_an_async_all_reduce_over_gloo_completes_while_the_callers_stream_computes():
    res = run_ranks(_w_overlap, 2, 1 << 18, backend="localsgd", timeout=240,
                    pg_options=BackendOptions(format="int8", threshold_bytes=0, cuda_inner="gloo"))
    for r in res:
        print("overlap", json.dumps(r))
    assert all(r["equal_to_cpu"] for r in res), res
    assert all(r["caller_busy_at_done"] for r in res), res
