"""The localsgd backend as a drop-in: DDP training, and every way of creating the group."""
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import localsgd_comm
from localsgd_comm import BackendOptions

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _dist import connect_store, run_ranks  # noqa: E402


def _train(group, rank, steps=25):
    torch.manual_seed(0)  # same init on every rank and for both backends
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.Tanh(), torch.nn.Linear(512, 1))
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=group, bucket_cap_mb=1)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)
    w_true = torch.randn(64, 1, generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 64, generator=g)
        y = x @ w_true
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        # the mean loss over ranks, through the gloo group (exact)
        l = loss.detach().clone()
        dist.all_reduce(l, group=_train.gloo)
        losses.append(float(l) / dist.get_world_size())
    # DDP keeps replicas identical: compressed gradients are bitwise identical on every rank.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return losses, flat


def _w_ddp(rank, p):
    dist.init_process_group("localsgd", pg_options=BackendOptions(format="int8"), timeout=timedelta(seconds=30))
    _train.gloo = dist.new_group(backend="gloo")
    localsgd_comm.get_backend_stats(reset=True)
    lsg_losses, lsg_params = _train(None, rank)
    st = localsgd_comm.get_backend_stats()
    gloo_losses, _ = _train(_train.gloo, rank)
    dist.destroy_process_group()
    return lsg_losses, gloo_losses, lsg_params, st


def test_ddp_with_localsgd_tracks_gloo():
    res = run_ranks(_w_ddp, 2, timeout=120)
    lsg, gl, params, st = res[0]
    assert torch.equal(params, res[1][2]), "DDP replicas diverged"
    # Gradient buckets went compressed (33.8k params = 135 KB: above the 64 KiB threshold).
    assert st["compressed_calls"] >= 25, repr(st)
    # int8 gradients: each element has two roundings of <= 1/254 of its block max, a noise
    # far below SGD's own; the loss must fall like the fp32 baseline's. Tolerance: 10% of
    # the baseline's loss at every step after the first few (measured: 0.2% max gap, 25 steps, 2 ranks).
    assert lsg[-1] < 0.5 * lsg[0], lsg
    for a, b in zip(lsg[3:], gl[3:]):
        assert abs(a - b) <= 0.10 * b + 1e-4, (lsg, gl)


def _w_init(rank, p, how):
    if how == "env":  # what torchrun gives: env://, nothing else
        dist.init_process_group("localsgd")
    elif how == "store":
        dist.init_process_group("localsgd", store=connect_store(), rank=rank, world_size=p)
    elif how == "mixed":
        cuda = "nccl" if dist.is_nccl_available() and torch.cuda.is_available() else "gloo"
        dist.init_process_group(f"cpu:localsgd,cuda:{cuda}", pg_options=BackendOptions(threshold_bytes=0))
    x = torch.randn(1 << 15, generator=torch.Generator().manual_seed(rank))
    dist.all_reduce(x)
    st = localsgd_comm.get_backend_stats()
    backend = str(dist.get_backend())
    dist.destroy_process_group()
    return backend, st["compressed_calls"], x


@pytest.mark.parametrize("how", ["env", "store", "mixed"])
def test_init_forms(how):
    res = run_ranks(_w_init, 2, how, timeout=60)
    for backend, calls, x in res:
        assert "localsgd" in backend
        assert calls == 1  # 128 KiB of fp32 >= the 64 KiB default threshold
        assert torch.equal(x, res[0][2])
