"""DiLoCo and a model's buffers and start: module buffers synced at every sync (BatchNorm
statistics averaged, integer buffers from rank 0), the construction broadcast skipped when the
replicas already hold the same bytes, and what plain DDP would send counted at the parameters'
element size.

Multi-process tests run 2 ranks on loopback through tests/_dist.py (each with a timeout).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import localsgd_comm
from localsgd_comm import DiLoCo

from _dist import run_ranks

TIMEOUT = 120


def bn_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 8))


def _bn_worker(rank, world, sync_buffers, ddp, streaming=None):
    m = bn_model(seed=rank)
    model = nn.parallel.DistributedDataParallel(m) if ddp else m
    kw = {} if sync_buffers else {"sync_buffers": False}  # the default is on
    kw.update(streaming or {})
    opt = DiLoCo(model, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=3, **kw)
    bn = m[1]
    before_last = None
    for s in range(6):
        g = torch.Generator().manual_seed(100 * rank + s)
        x = torch.randn(8, 16, generator=g) * (1 + rank)  # other statistics on each rank
        loss = (model(x) ** 2).mean()
        loss.backward()
        if s == 5:  # the forward of the syncing step moved the statistics: what the sync averages
            before_last = [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]
        opt.step()
        opt.zero_grad()
    params = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    after = [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]
    return {"params": params, "before": before_last, "after": after, "stats": dict(opt.stats),
            "counters": localsgd_comm.get_backend_stats()}


@pytest.mark.parametrize("ddp", [False, True])
def test_module_buffers_are_averaged_at_every_sync(ddp):
    """Fails before module_buffers.py: the parameters are equal after the last sync but the
    BatchNorm statistics differ by ~0.1 across the ranks."""
    out = run_ranks(_bn_worker, 2, True, ddp, backend="localsgd", timeout=TIMEOUT)
    assert torch.equal(out[0]["params"], out[1]["params"])
    for k in range(2):  # running_mean, running_var: bitwise equal, and the average of the ranks' own
        a, b = out[0]["after"][k], out[1]["after"][k]
        assert torch.equal(a, b), (k, (a - b).abs().max())
        oracle = (out[0]["before"][k].double() + out[1]["before"][k].double()) / 2
        # fp32 sum of 2 values and a division by 2: one rounding, <= 2^-24 relative
        assert torch.allclose(a.double(), oracle, rtol=2 ** -23, atol=0), (a.double() - oracle).abs().max()
    assert torch.equal(out[0]["after"][2], out[1]["after"][2])  # num_batches_tracked: rank 0's
    for r in out:
        st = r["stats"]
        # two syncs; at least BatchNorm's 2 x 32 fp32 statistics each time, ring share 2 (p-1)/p = 1
        assert st.get("buffer_bytes_sent", 0) >= 2 * 2 * 32 * 4, st
        assert st["bytes_sent"] > st["buffer_bytes_sent"], st  # counted as DiLoCo's own traffic too


def test_streaming_syncs_buffers_once_per_round_of_fragments():
    """Streaming mode (fragments, a reduce in flight): the buffers are averaged at the end of
    each round of fragments like a plain sync's, and their bytes counted."""
    out = run_ranks(_bn_worker, 2, True, False, {"fragments": 2, "overlap_steps": 1}, backend="localsgd",
                    timeout=TIMEOUT)
    for k in range(2):
        a, b = out[0]["after"][k], out[1]["after"][k]
        assert torch.equal(a, b), (k, (a - b).abs().max())
        oracle = (out[0]["before"][k].double() + out[1]["before"][k].double()) / 2
        assert torch.allclose(a.double(), oracle, rtol=2 ** -23, atol=0), (a.double() - oracle).abs().max()
    assert out[0]["stats"]["buffer_bytes_sent"] >= 2 * 2 * 32 * 4


def test_sync_buffers_false_leaves_each_ranks_buffers_its_own():
    out = run_ranks(_bn_worker, 2, False, False, backend="localsgd", timeout=TIMEOUT)
    assert torch.equal(out[0]["params"], out[1]["params"])
    assert not torch.equal(out[0]["after"][0], out[1]["after"][0])
    assert out[0]["stats"]["buffer_bytes_sent"] == 0


def test_constant_buffers_cost_only_their_marks():
    """A causal mask (16 KiB) never changes: each sync sends only its mark (4 bytes, plus the
    backend's 64-byte header on each of the 2 collectives of the exact sum)."""
    out = run_ranks(_mask_worker, 2, backend="localsgd", timeout=TIMEOUT)
    for st in out:
        assert 0 < st["buffer_bytes_sent"] <= 2 * (8 + 2 * 64), st


def _mask_worker(rank, world):
    torch.manual_seed(0)
    m = nn.Linear(16, 16)
    m.register_buffer("mask", torch.tril(torch.ones(64, 64)))
    opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), sync_every=2)
    for s in range(4):
        (m(torch.randn(4, 16)) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return dict(opt.stats)


# ---- what plain DDP would send -------------------------------------------------------------------
def _ddp_mb(report: str) -> float:
    import re
    m = re.search(r"plain DDP(?:'s| sends) ([0-9.]+) MB", report)
    assert m, report
    return float(m.group(1))


def _traffic_worker(rank, world):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
    torch.manual_seed(0)
    out = {}
    # 1000 x 1000 + 1000 parameters, 10 steps, 2 ranks: 2 (p-1)/p x bytes x numel x steps
    out["fp32"] = localsgd_comm.traffic_report(nn.Linear(1000, 1000), 10)
    out["bf16"] = localsgd_comm.traffic_report(nn.Linear(1000, 1000).to(torch.bfloat16), 10)
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(1000, 1000))
    ddp.register_comm_hook(None, fp16_compress_hook)
    out["fp16_hook"] = localsgd_comm.traffic_report(ddp, 10)
    out["ddp_fp32"] = localsgd_comm.traffic_report(nn.parallel.DistributedDataParallel(nn.Linear(1000, 1000)), 10)
    return out


def test_plain_ddp_bytes_follow_the_gradients_element_size():
    """Fails before: the bf16 model and the fp16 hook were reported at 4 bytes per element (2x)."""
    out = run_ranks(_traffic_worker, 2, backend="gloo", timeout=TIMEOUT)[0]
    n = 1000 * 1000 + 1000
    assert _ddp_mb(out["fp32"]) == pytest.approx(4 * n * 10 / 1e6, abs=0.01)
    assert _ddp_mb(out["ddp_fp32"]) == pytest.approx(4 * n * 10 / 1e6, abs=0.01)
    assert _ddp_mb(out["bf16"]) == pytest.approx(2 * n * 10 / 1e6, abs=0.01)
    assert _ddp_mb(out["fp16_hook"]) == pytest.approx(2 * n * 10 / 1e6, abs=0.01)
    assert localsgd_comm.ddp_bytes_per_rank(n, 10, 2, element_size=2) == 2 * n * 10
    assert localsgd_comm.ddp_bytes_per_rank(n, 10, 2) == 4 * n * 10  # the default stays fp32


# ---- the construction broadcast ------------------------------------------------------------------
def _construction_worker(rank, world, ddp, seed_by_rank):
    m = bn_model(seed=rank if seed_by_rank else 0)
    model = nn.parallel.DistributedDataParallel(m) if ddp else m
    before = localsgd_comm.get_backend_stats()["op_bytes_sent"].get("broadcast", 0)
    DiLoCo(model, torch.optim.SGD(m.parameters(), lr=0.1), sync_every=2)
    after = localsgd_comm.get_backend_stats()["op_bytes_sent"].get("broadcast", 0)
    state = torch.cat([t.detach().reshape(-1).float() for t in list(m.parameters()) + list(m.buffers())])
    return after - before, state


@pytest.mark.parametrize("ddp,seed_by_rank,broadcasts", [(True, True, False), (False, False, False),
                                                         (False, True, True)])
def test_the_construction_broadcast_is_skipped_when_the_replicas_already_agree(ddp, seed_by_rank, broadcasts):
    """Fails before for the first two cases: DiLoCo broadcast the whole model again after DDP had
    (rank 0 sent 4 bytes per parameter and buffer element a second time)."""
    out = run_ranks(_construction_worker, 2, ddp, seed_by_rank, backend="localsgd", timeout=TIMEOUT)
    assert torch.equal(out[0][1], out[1][1])  # the replicas start identical either way
    if broadcasts:  # different initial weights: the broadcast is needed and happens
        assert out[0][0] >= 4 * out[0][1].numel(), out[0][0]
    else:
        assert out[0][0] == 0 and out[1][0] == 0, (out[0][0], out[1][0])
