"""The localsgd backend and DiLoCo with CUDA tensors (marker ``gpu``: skipped without a GPU).

Run by ``tools/gpu_check.sh`` on a GPU machine. The CUDA results must equal the CPU path's byte
for byte: both run the same wire format and reduction order (format.h), and the CPU path is
the one the rest of the suite checks against the float64 oracle.

* world size 1 over NCCL (NCCL refuses two ranks on one GPU);
* 2 ranks sharing one GPU over the gloo inner backend (``BackendOptions(cuda_inner="gloo")``);
* a tensor on a device other than the current one, where more than one GPU exists;
* a DiLoCo sync of a CUDA model: replicas bitwise identical.
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist

import localsgd_comm
from localsgd_comm import BackendOptions

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dist import run_ranks  # noqa: E402

pytestmark = pytest.mark.gpu
FORMATS = ("int8", "int4", "fp8")


def _inputs(rank, n, dtype):
    g = torch.Generator().manual_seed(1000 + rank)
    return (torch.randn(n, generator=g) * (1 + rank)).to(dtype)


def _w_all_reduce(rank, p, fmt, n, dtype, device):
    out = {}
    x = _inputs(rank, n, dtype)
    for where in ("cpu", device):
        t = x.to(where).clone()
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
        if where != "cpu":
            torch.cuda.synchronize()
        out[where] = t.cpu()
    return out["cpu"], out[device]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_rank_over_nccl_equals_the_cpu_path(fmt, dtype):
    if not dist.is_nccl_available():
        pytest.skip("no NCCL in this torch")
    dist.init_process_group("localsgd", store=dist.HashStore(), rank=0, world_size=1,
                            pg_options=BackendOptions(format=fmt, threshold_bytes=0, cuda_inner="nccl"))
    try:
        for n in (1, 127, 128, 1000, 65537):
            cpu, gpu = _w_all_reduce(0, 1, fmt, n, dtype, "cuda:0")
            assert torch.equal(cpu, gpu), (fmt, n)
        st = localsgd_comm.get_backend_stats()
        assert st["failed"] is None
    finally:
        dist.destroy_process_group()


def _w_two_ranks(rank, p, fmt):
    res = []
    for n, dtype in ((1000, torch.float32), (65537, torch.float32), (4099, torch.bfloat16)):
        cpu, gpu = _w_all_reduce(rank, p, fmt, n, dtype, "cuda:0")
        res.append(bool(torch.equal(cpu.float(), gpu.float())))
    return res


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_ranks_on_one_gpu_over_gloo_equal_the_cpu_path(fmt):
    res = run_ranks(_w_two_ranks, 2, fmt, backend="localsgd", timeout=240,
                    pg_options=BackendOptions(format=fmt, threshold_bytes=0, cuda_inner="gloo"))
    assert all(all(r) for r in res), res


def test_a_tensor_on_another_device_than_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: the device must come from the tensor, not the current device")
    if not dist.is_nccl_available():
        pytest.skip("no NCCL in this torch")
    dist.init_process_group("localsgd", store=dist.HashStore(), rank=0, world_size=1,
                            pg_options=BackendOptions(threshold_bytes=0))
    try:
        torch.cuda.set_device(0)
        x = _inputs(0, 70000, torch.float32)
        ref = x.clone()
        dist.all_reduce(ref, op=dist.ReduceOp.AVG)  # CPU path
        t = x.to("cuda:1")
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
        torch.cuda.synchronize(1)
        assert torch.equal(t.cpu(), ref)
    finally:
        dist.destroy_process_group()


def _w_diloco(rank, p):
    from localsgd_comm.model import GPT, config_for
    torch.manual_seed(0)
    dev = torch.device("cuda:0")
    model = GPT(config_for("tiny", 64)).to(dev)
    opt = localsgd_comm.DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=1e-3), sync_every=4)
    g = torch.Generator().manual_seed(rank)
    for _ in range(8):
        x = torch.randint(0, 256, (4, 64), generator=g).to(dev)
        loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    return torch.cat([q.detach().reshape(-1).float().cpu() for q in model.parameters()]), float(loss)


def test_diloco_sync_of_a_cuda_model_leaves_replicas_bitwise_identical():
    (a, la), (b, lb) = run_ranks(_w_diloco, 2, backend="localsgd", timeout=240,
                                 pg_options=BackendOptions(cuda_inner="gloo"))
    assert torch.equal(a, b)
    assert torch.isfinite(torch.tensor([la, lb])).all()


def test_a_wait_from_another_stream_is_ordered_after_the_collective():
    """FSDP2's pattern: the collective is issued on one stream and waited for on another;
    work.wait() must make the *waiting* stream wait (no host sync needed by the caller)."""
    if not dist.is_nccl_available():
        pytest.skip("no NCCL in this torch")
    dist.init_process_group("localsgd", store=dist.HashStore(), rank=0, world_size=1,
                            pg_options=BackendOptions(threshold_bytes=0))
    try:
        x = _inputs(0, 1 << 22, torch.float32)
        ref = x.clone()
        dist.all_reduce(ref, op=dist.ReduceOp.AVG)  # CPU path
        comm, compute = torch.cuda.Stream(), torch.cuda.Stream()
        with torch.cuda.stream(comm):
            t = x.cuda()
            work = dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True)
        with torch.cuda.stream(compute):
            work.wait()
            y = t * 1.0  # runs on `compute`: must see the reduced values
        torch.cuda.synchronize()
        assert torch.equal(y.cpu(), ref)
    finally:
        dist.destroy_process_group()


def test_diloco_with_outer_state_on_the_cpu_over_an_nccl_group():
    """state_device="cpu" keeps anchor, momentum and residual in host memory; an NCCL group cannot
    carry CPU tensors, so the sync's collectives travel through the parameters' device."""
    if not dist.is_nccl_available():
        pytest.skip("no NCCL in this torch")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        from localsgd_comm.model import GPT, config_for
        for compression in ("int8", "none"):
            torch.manual_seed(0)
            model = GPT(config_for("tiny", 64)).cuda()
            opt = localsgd_comm.DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=1e-3), sync_every=2,
                                       compression=compression, error_feedback=compression != "none",
                                       state_device="cpu")
            x = torch.randint(0, 256, (4, 64), device="cuda")
            for _ in range(4):
                model(x, x).backward()
                opt.step()
                opt.zero_grad()
            assert opt.stats["syncs"] == 2
            anchors = opt.anchors()
            assert all(a.device.type == "cpu" for a in anchors)
            flat = torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])
            assert torch.equal(flat, torch.cat(anchors).to(flat.dtype)), compression  # params = anchor after a sync
    finally:
        dist.destroy_process_group()
