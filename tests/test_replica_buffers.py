"""Module buffers (BatchNorm's running statistics, counters) across replicas in ShardedDiLoCo and
ElasticDiLoCo: after a sync every rank holds the same buffers, the mean of what the ranks held.

ShardedDiLoCo: 4 ranks on a 2-D mesh ("replicate", "shard") = 2 replicas x 2 shards, default
group "localsgd" (gloo inside), every rank fed its own batch, so all 4 ranks' statistics differ.
The oracle is the float64 mean of the 4 ranks' statistics just before the sync. The sync is two
exact fp32 passes (the replica's 2 shard ranks, then the 2 replicas), each an fp32 sum of 2 values
(one rounding, <= 2^-24 of the sum's magnitude) and a division by 2 (exact): the error is below
2 x 2^-24 x max|x|, asserted as 3 x 2^-24 x max|x| per element (x: the 4 ranks' values).

ElasticDiLoCo: 2 workers and a coordinator; the oracle is the float64 mean of the 2 workers'
statistics before the round's sync, one exact fp32 sum of 2 values and a division by 2:
<= 2^-24 relative, as tests/test_module_buffers.py. A failed attempt (a Reducer whose link breaks
between the floating and the integer buffers) must leave the buffers bitwise as before it; the
slow tests run real worker processes (a death mid all-reduce, a worker that is a DDP cluster) and
compare digests of the buffers.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import localsgd_comm

from _dist import run_ranks
from test_elastic import _survivors_identical, job_factory  # noqa: F401  (fixture)

TIMEOUT = 240  # s per multi-process run (4 ranks on 2 shared cores)
EPS32 = 2.0 ** -24


class Counter(nn.Module):
    """A float buffer updated from the batch (an exponential mean, like BatchNorm's) and an
    integer buffer each rank moves by its own amount."""

    def __init__(self, d):
        super().__init__()
        self.register_buffer("ema", torch.zeros(d))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.ema.mul_(0.9).add_(x.detach().mean(0), alpha=0.1)
        return x


def bn_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), Counter(32), nn.Tanh(), nn.Linear(32, 8))


def _buffers(m):
    return {n: b.detach().clone() for n, b in m.named_buffers()}


def batch(rank, step):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(8, 16, generator=g) * (1 + rank)  # other statistics on each rank


# ---- ShardedDiLoCo ---------------------------------------------------------------------------------------------
def _sharded_worker(rank, world, kw, steps, sync_every):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    m = bn_model()
    fully_shard(m, mesh=mesh["shard"])
    opt = localsgd_comm.DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=sync_every,
                               compression="none", **kw)
    before = None
    for s in range(steps):
        (m(batch(rank, s)) ** 2).mean().backward()
        with torch.no_grad():
            m[2].count.add_(rank + 1)  # an integer buffer that differs between all ranks
        if s == steps - 1:  # the last step's forward moved the statistics: what its sync averages
            before = _buffers(m)
        opt.step()
        opt.zero_grad()
    for mod in m.modules():
        if hasattr(mod, "reshard"):
            mod.reshard()
    full = {n: p.full_tensor().detach().clone() for n, p in m.named_parameters()}
    return {"before": before, "after": _buffers(m), "params": full, "stats": dict(opt.stats)}


def _check_synced(out, ranks):
    """Every rank of ``ranks`` holds the same buffers: floating ones the float64 mean of what
    they held before the sync, integer ones rank ranks[0]'s."""
    first = out[ranks[0]]
    for n, a in first["after"].items():
        for r in ranks[1:]:
            assert torch.equal(out[r]["after"][n], a), (n, r)
        if a.is_floating_point():
            xs = torch.stack([out[r]["before"][n].double() for r in ranks])
            oracle = xs.mean(0)
            assert not torch.equal(xs[0], xs[1]), n  # the ranks differed: something to average
            tol = 3 * EPS32 * xs.abs().amax(0)
            err = (a.double() - oracle).abs()
            assert bool((err <= tol).all()), (n, err.max().item())
        else:
            assert torch.equal(a, first["before"][n]), n


@pytest.mark.parametrize("mode", ["plain", "streaming", pytest.param("overlap", marks=pytest.mark.slow)])
def test_sharded_buffers_are_averaged_over_every_rank(mode):
    """Fails before sync_buffers in ShardedDiLoCo: each rank keeps its own BatchNorm statistics
    (the parameters are equal across replicas, the buffers differ on all 4 ranks)."""
    kw = {"plain": {}, "streaming": {"fragments": 2, "overlap_steps": 1}, "overlap": {"overlap": True}}[mode]
    out = run_ranks(_sharded_worker, 4, kw, 6, 3, backend="localsgd", timeout=TIMEOUT)
    _check_synced(out, [0, 1, 2, 3])
    if mode != "streaming":  # the parameters: replicas bitwise equal after the sync
        for n, p in out[0]["params"].items():
            assert torch.equal(out[2]["params"][n], p), n
    float_bytes = 4 * (32 * 2 + 32)  # BatchNorm's running mean and var, the ema: fp32
    for r in out:
        st = r["stats"]
        # two syncs, each pass at least the float buffers' ring volume 2 (p-1)/p = 1 x their bytes
        assert st["intra_bytes_sent"] >= 2 * float_bytes, st
        assert st["buffer_bytes_sent"] >= 2 * 2 * float_bytes, st
        assert st["buffer_bytes_sent"] - st["intra_bytes_sent"] >= 2 * float_bytes, st  # the cross pass
        assert st["bytes_sent"] > st["buffer_bytes_sent"] - st["intra_bytes_sent"], st  # plus the syncs'


def test_sharded_sync_buffers_false_keeps_them_local():
    out = run_ranks(_sharded_worker, 4, {"sync_buffers": False}, 3, 3, backend="localsgd", timeout=TIMEOUT)
    for r in out:
        assert r["stats"]["buffer_bytes_sent"] == 0
        for n, b in r["after"].items():  # nothing touched them after the last forward
            assert torch.equal(b, r["before"][n]), n
    for n in out[0]["after"]:
        if n.endswith("running_mean"):
            for r in range(1, 4):
                assert not torch.equal(out[r]["after"][n], out[0]["after"][n]), (n, r)
    for n, p in out[0]["params"].items():
        assert torch.equal(out[2]["params"][n], p), n


# ---- ElasticDiLoCo ---------------------------------------------------------------------------------------------
def _elastic_worker(rank, world, kw, steps, sync_every):
    import os
    from localsgd_comm.elastic import ElasticDiLoCo
    coord = f"127.0.0.1:{os.environ['MASTER_PORT']}"  # the parent's store serves as the coordinator
    m = bn_model()
    opt = ElasticDiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), coordinator=coord, worker_id=f"w{rank}",
                        sync_every=sync_every, compression="none", min_workers=world, initial_workers=world,
                        run_id="buffers" + "".join(f"{k}{v}" for k, v in sorted(kw.items())), timeout_s=20,
                        dead_after_s=4.0, heartbeat_s=0.5, **kw)
    before = None
    try:
        for s in range(steps):
            (m(batch(rank, s)) ** 2).mean().backward()
            with torch.no_grad():
                m[2].count.add_(rank + 1)
            if s == steps - 1:
                before = _buffers(m)
            opt.step()
            opt.zero_grad()
        stats, rounds = dict(opt.stats), opt.round
        params = [p.detach().clone() for p in m.parameters()]
    finally:
        opt.close()
    return {"before": before, "after": _buffers(m), "params": params, "stats": stats, "rounds": rounds}


def _check_elastic_synced(out):
    for n, a in out[0]["after"].items():
        assert torch.equal(out[1]["after"][n], a), n
        if a.is_floating_point():
            x0, x1 = out[0]["before"][n].double(), out[1]["before"][n].double()
            assert not torch.equal(x0, x1), n
            oracle = (x0 + x1) / 2
            # fp32 sum of 2 values and a division by 2: one rounding, <= 2^-24 relative
            assert torch.allclose(a.double(), oracle, rtol=2 ** -23, atol=0), (n, (a.double() - oracle).abs().max())
        else:  # the first trainer's
            assert any(torch.equal(a, o["before"][n]) for o in out), n
    assert not torch.equal(out[0]["before"]["2.count"], out[1]["before"]["2.count"])


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kw", [{}, {"fragments": 2}, {"fragments": 2, "overlap_steps": 1}])
def test_elastic_buffers_are_averaged_every_round(kw):
    """2 workers, no failure: after the last round (streaming: the last fragment's round, at the end
    of the cycle) both workers hold the same buffers, the mean of theirs. Fails before sync_buffers
    in ElasticDiLoCo (each worker kept its own statistics)."""
    out = run_ranks(_elastic_worker, 2, kw, 6, 3, backend=None, timeout=120)
    _check_elastic_synced(out)
    if not kw:  # whole-model rounds: the parameters too (streaming: only the last fragment's)
        for a, b in zip(out[0]["params"], out[1]["params"]):
            assert torch.equal(a, b)
    float_bytes = 4 * (32 * 2 + 32)
    for r in out:
        assert r["stats"]["buffer_bytes_sent"] >= 2 * float_bytes, r["stats"]  # 2 cycles, ring share 1
        assert r["stats"]["bytes_sent"] > r["stats"]["buffer_bytes_sent"]


@pytest.mark.timeout(150)
def test_elastic_sync_buffers_false_keeps_them_local():
    out = run_ranks(_elastic_worker, 2, {"sync_buffers": False}, 3, 3, backend=None, timeout=120)
    for r in out:
        assert r["stats"]["buffer_bytes_sent"] == 0
        for n, b in r["after"].items():
            assert torch.equal(b, r["before"][n]), n
    assert not torch.equal(out[0]["after"]["1.running_mean"], out[1]["after"]["1.running_mean"])


class _FailingReducer:
    """A Reducer of 2 ranks whose peer holds 3x every buffer x, and whose link breaks at its
    ``fail_at``-th collective (1: the marks, 2: the floating buffers' sum, 3: the integer
    buffers' all-gather, when the floating ones are written already)."""

    size = 2

    def __init__(self, fail_at):
        self.calls, self.fail_at = 0, fail_at

    def _call(self):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise RuntimeError("link down")

    def composes_sum(self, device):
        return False

    def all_reduce_sum(self, buf):
        from localsgd_comm.diloco.collectives import Deferred
        self._call()
        buf.add_(buf * 3)  # mine + the peer's
        return Deferred(lambda: None)

    def all_gather(self, out, inp):
        self._call()
        out[:inp.numel()].copy_(inp)
        out[inp.numel():].copy_(inp)


def _redo_worker(rank, world):
    import os
    from localsgd_comm.elastic import ElasticDiLoCo
    coord = f"127.0.0.1:{os.environ['MASTER_PORT']}"
    m = bn_model()
    opt = ElasticDiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), coordinator=coord, worker_id="w0",
                        sync_every=1000, compression="none", run_id="redo", timeout_s=20)
    try:
        m(batch(0, 0))
        with torch.no_grad():
            m[2].count.add_(5)
        before = _buffers(m)
        out = {}
        for fail_at in (2, 3):
            opt._buffers_due = True
            with pytest.raises(RuntimeError, match="link down"):
                opt._attempt(_FailingReducer(fail_at))
            half = _buffers(m)
            opt._abandon(None)  # the redo
            out[fail_at] = (half, _buffers(m))
            opt._buffers_due = False
        # the redo's sync: every buffer changed since the construction, so all of them are averaged
        opt._buffers_due = True
        opt._buffer_sync.sync(opt.stats, measure=False, reducer=_FailingReducer(99))
        opt._buffers_due = False
        redone = _buffers(m)
    finally:
        opt.close()
    return before, out, redone


@pytest.mark.timeout(120)
def test_a_failed_round_leaves_the_buffers_as_before_it():
    """The redo semantics: an attempt that fails after some buffers were averaged (the link breaks
    at the integer buffers' exchange) leaves them half written; abandoning it restores the buffers
    and the snapshots the next sync compares with, so the redo averages them again from the
    values before the failed attempt."""
    before, out, redone = run_ranks(_redo_worker, 1, backend=None, timeout=100)[0]
    half3, after3 = out[3]
    assert not torch.equal(half3["1.running_mean"], before["1.running_mean"])  # half written
    for fail_at in (2, 3):
        for n, b in out[fail_at][1].items():
            assert torch.equal(b, before[n]), (fail_at, n)
    for n, b in redone.items():
        if b.is_floating_point() and not torch.equal(before[n], torch.zeros_like(before[n])):
            # the peer holds 3x: (x + 3x) / 2 in fp32 as exact_sum computes it, from the values before
            # the failed attempts (bitwise)
            assert torch.equal(b, (before[n] + before[n] * 3) / 2), n


# ---- ElasticDiLoCo end to end: a death mid-round, a worker that is a DDP cluster ---------------------------------
# tests/test_elastic.py's Job: a real coordinator and worker processes (tests/scripts/elastic_worker.py
# --batchnorm: a BatchNorm1d in the model; "buffers" is a digest of its buffers after the last round)
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_elastic_buffers_identical_after_a_death_mid_allreduce(job_factory):
    """w1 dies in round 2's pseudo-gradient all-reduce, after that attempt averaged the buffers
    with it: the survivors restore them, redo the round without w1 and end with identical
    buffers (and parameters, anchor, momentum)."""
    job = job_factory(**{"initial-workers": 3, "batchnorm": True})
    for w in ("w0", "w1", "w2"):
        job.start(w, kill="w1:2:allreduce")
    codes = job.wait()
    assert codes["w1"] == -9 and codes["w0"] == 0 and codes["w2"] == 0, codes
    res = _survivors_identical(job, ["w0", "w2"], 6)
    assert res["w0"]["buffers"] == res["w2"]["buffers"]
    assert res["w0"]["stats"]["redone_rounds"] == 1 and res["w0"]["stats"]["buffer_bytes_sent"] > 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_elastic_buffers_identical_on_every_process_of_a_ddp_cluster(job_factory):
    """Worker B is 2 processes with DDP inside: its leader syncs the buffers in the round and hands
    them to its rank 1 with the round's outcome; A, B0 and B1 end with the same buffers."""
    from localsgd_comm.bench.launch import free_port
    job = job_factory(**{"initial-workers": 2, "rounds": 4, "batchnorm": True})
    job.start("A")
    port = free_port()
    for r in (0, 1):
        job.start("B", name=f"B{r}", **{"replica-size": 2, "replica-rank": r, "replica-port": port})
    codes = job.wait()
    assert all(c == 0 for c in codes.values()), codes
    res = _survivors_identical(job, ["A", "B0", "B1"], 4)
    assert res["A"]["buffers"] == res["B0"]["buffers"] == res["B1"]["buffers"], \
        {w: r["buffers"] for w, r in res.items()}
