"""Module buffers under DiLoCo (BatchNorm statistics, constant masks) and the construction's
identical start: what DDP does with buffers, done at the syncs, and no second copy of a model
DDP already broadcast.

One spawn of 2 ranks runs every case (spawning is the expensive part on 2 cores). Oracles:
the float64 mean of the ranks' buffers just before the last sync (the average in fp32 of 2
values, then a division by 2, is within 1 ulp of it: tolerance 2 ulp relative), and the
backend's byte counters.
"""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from localsgd_comm import DiLoCo, get_backend_stats
from localsgd_comm.diloco.module_buffers import fingerprint

from _mp import run_workers

TIMEOUT = 120


def _bn_model(seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(12, 24), nn.BatchNorm1d(24), nn.Tanh(), nn.Linear(24, 4))
    m.register_buffer("mask", torch.tril(torch.ones(32, 32)))  # constant, as GPT scripts register
    return m


def _train(model, opt, rank, steps, before_last=None):
    for s in range(steps):
        g = torch.Generator().manual_seed(100 * rank + s)
        x = torch.randn(16, 12, generator=g) * (1 + rank)  # the ranks' statistics really differ
        loss = model(x).pow(2).mean()
        loss.backward()
        if s == steps - 1 and before_last is not None:
            before_last()
        opt.step()
        opt.zero_grad()


def _bufs(model):
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def _sent(kind=None):
    st = get_backend_stats()
    return st["bytes_sent"] if kind is None else st["op_bytes_sent"].get(kind, 0)


def _worker(rank, world):
    out = {}
    # 1. buffers averaged at every sync (default), left alone with sync_buffers=False
    for sync_buffers in (True, False):
        model = _bn_model(0)
        opt = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.05), sync_every=5, compression="int8",
                     sync_buffers=sync_buffers)
        pre = {}
        _train(model, opt, rank, 15, before_last=lambda: pre.update(_bufs(model)))
        out[sync_buffers] = {"pre": pre, "post": _bufs(model), "stats": dict(opt.stats),
                             "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()])}
    # 2. construction: a DDP model (DDP broadcast it) is not broadcast again; ranks seeded apart are
    ddp = nn.parallel.DistributedDataParallel(_bn_model(rank))
    b0 = _sent("broadcast")
    opt = DiLoCo(ddp, torch.optim.SGD(ddp.parameters(), lr=0.05), sync_every=5)
    out["ddp_init"] = {"broadcast_bytes": _sent("broadcast") - b0, "init_broadcast": opt.init_broadcast,
                       "init_bytes": opt.stats["init_bytes_sent"]}
    apart = _bn_model(10 + rank)
    b0 = _sent("broadcast")
    opt = DiLoCo(apart, torch.optim.SGD(apart.parameters(), lr=0.05), sync_every=5)
    out["apart_init"] = {"broadcast_bytes": _sent("broadcast") - b0, "init_broadcast": opt.init_broadcast,
                         "fingerprint": fingerprint(list(apart.parameters()) + list(apart.buffers()))}
    # 3. the tripwire sees no foreign traffic: the buffer bytes are DiLoCo's own
    for sync_buffers in (True, False):
        model = _bn_model(0)
        opt = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.05), sync_every=3, compression="none",
                     sync_buffers=sync_buffers)
        _train(model, opt, rank, 12)
        out["tripwire", sync_buffers] = dict(opt.stats)
    return out


@pytest.fixture(scope="module")
def runs():
    return run_workers(_worker, 2, backend="localsgd", timeout=TIMEOUT)


def test_buffers_are_averaged_at_every_sync(runs):
    r0, r1 = runs[0][True], runs[1][True]
    assert torch.equal(r0["params"], r1["params"])
    for k in ("1.running_mean", "1.running_var"):
        assert not torch.equal(r0["pre"][k], r1["pre"][k]), k  # they did differ before the sync
        assert torch.equal(r0["post"][k], r1["post"][k]), k  # bitwise equal after it
        oracle = (r0["pre"][k].double() + r1["pre"][k].double()) / 2
        err = (r0["post"][k].double() - oracle).abs()
        assert torch.all(err <= 2 * torch.finfo(torch.float32).eps * oracle.abs() + 1e-30), k
    assert torch.equal(r0["post"]["1.num_batches_tracked"], r1["post"]["1.num_batches_tracked"])
    assert torch.equal(r0["post"]["mask"], torch.tril(torch.ones(32, 32)))  # untouched


def test_buffer_bytes_are_the_differing_buffers_ring_volume(runs):
    st = runs[0][True]["stats"]
    assert st["syncs"] == 3
    n_bufs = 4  # running_mean, running_var, num_batches_tracked, mask
    gather = 3 * 8 * n_bufs  # one fingerprint row (3 float64) a buffer to the one peer
    ring = 2 * 24 * 4 // 2 + 2 * 24 * 4 // 2  # running_mean + running_var, fp32, p = 2: (p-1)/p x 2 x bytes
    headers = 3 * 64  # the backend's call header (64 B) on each of the 3 collectives: gather, all-to-all, all-gather
    assert st["buffer_bytes_sent"] == st["syncs"] * (gather + ring + headers), st  # the mask never travels


def test_sync_buffers_false_leaves_them_local(runs):
    r0, r1 = runs[0][False], runs[1][False]
    assert torch.equal(r0["params"], r1["params"])
    assert not torch.equal(r0["post"]["1.running_mean"], r1["post"]["1.running_mean"])
    assert r0["stats"]["buffer_bytes_sent"] == 0


def test_a_ddp_model_is_not_broadcast_a_second_time(runs):
    for r in runs:
        assert r["ddp_init"]["init_broadcast"] is False
        assert r["ddp_init"]["broadcast_bytes"] == 0
        assert 0 < r["ddp_init"]["init_bytes"] < 1024  # the fingerprints only


def test_replicas_that_differ_are_broadcast_from_rank_0(runs):
    assert all(r["apart_init"]["init_broadcast"] for r in runs)
    assert runs[0]["apart_init"]["broadcast_bytes"] > 0
    assert torch.equal(runs[0]["apart_init"]["fingerprint"], runs[1]["apart_init"]["fingerprint"])


def test_the_tripwire_counts_buffer_traffic_as_diloco_s_own(runs):
    # (the fp32 sync's own count leaves out the backend's 64-byte call headers: the same few
    # bytes of "foreign" traffic with and without the buffers, far below the tripwire's threshold)
    for r in runs:
        st, without = r["tripwire", True], r["tripwire", False]
        assert st["syncs"] == 4 and st["buffer_bytes_sent"] > 0 and without["buffer_bytes_sent"] == 0
        assert st["foreign_bytes"] == without["foreign_bytes"] < 1024, (st, without)
