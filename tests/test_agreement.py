"""Members of a sync group constructed with different DiLoCo settings fail at construction, every
one of them, with a message naming each differing setting and its value on each rank (and
ranks that ask new_hierarchical_groups for different clusters, likewise).

Before this check an ``outer_lr`` or ``outer_momentum`` that differed between ranks let the run
finish with replicas that silently differ, and a different ``sync_every`` paired one rank's first
sync with another's second and failed only when a rank exited. Multi-process tests run 2 ranks
on loopback through tests/_dist.py, each with a timeout; one process pair goes through every case
(a construction that raised leaves the group healthy: every member made the same collectives).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from localsgd_comm import DiLoCo
from localsgd_comm.diloco.agreement import mismatch_message

from _dist import run_ranks

TIMEOUT = 120

# (case, settings on rank 0, settings on rank 1, words the message must hold)
CASES = [
    ("outer_lr", {}, {"outer_lr": 0.5}, ["outer_lr: 0.7 on rank 0, 0.5 on rank 1"]),
    ("outer_momentum", {}, {"outer_momentum": 0.0}, ["outer_momentum: 0.9 on rank 0, 0.0 on rank 1"]),
    ("sync_every", {}, {"sync_every": 8}, ["sync_every: 4 on rank 0, 8 on rank 1"]),
    ("compression", {}, {"compression": "int4"}, ["compression: 'int8' on rank 0, 'int4' on rank 1"]),
    ("two at once", {}, {"nesterov": False, "error_feedback": True},
     ["nesterov: True on rank 0, False on rank 1", "error_feedback: False on rank 0, True on rank 1"]),
    ("fragments", {"fragments": 2}, {"fragments": 4}, ["fragments: 2 on rank 0, 4 on rank 1"]),
    ("overlap_steps", {"fragments": 2, "overlap_steps": 1}, {"fragments": 2, "overlap_steps": 2},
     ["overlap_steps: 1 on rank 0, 2 on rank 1"]),
    ("mixing", {"fragments": 2, "overlap_steps": 1}, {"fragments": 2, "overlap_steps": 1, "mixing": 0.25},
     ["mixing: 0.5 on rank 0, 0.25 on rank 1"]),
    ("broadcast_init", {}, {"broadcast_init": False}, ["broadcast_init: True on rank 0, False on rank 1"]),
    ("model", {}, {"width": 48}, ["parameters: '4 tensors, 808 elements", "'4 tensors, 1208 elements"]),
]
# Equal once resolved: no error. The default mixing with overlap_steps > 0 is 0.5.
AGREEING = [
    ("mixing default", {"fragments": 2, "overlap_steps": 1}, {"fragments": 2, "overlap_steps": 1, "mixing": 0.5}),
    ("seeds", {"stochastic_rounding": True, "seed": 1}, {"stochastic_rounding": True, "seed": 2}),
]


def _build(rank, kw):
    kw = dict(kw)
    width = kw.pop("width", 32)
    torch.manual_seed(rank)  # different starts: the construction broadcast runs
    m = nn.Sequential(nn.Linear(16, width), nn.Tanh(), nn.Linear(width, 8))
    opts = dict(sync_every=4, compression="int8")
    opts.update(kw)
    return m, DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), **opts)


def _worker(rank, world):
    out = {}
    for name, kw0, kw1, _ in CASES:
        try:
            _build(rank, kw0 if rank == 0 else kw1)
            out[name] = "no error"
        except ValueError as exc:
            out[name] = str(exc)
    for name, kw0, kw1 in AGREEING:
        m, opt = _build(rank, kw0 if rank == 0 else kw1)
        for s in range(8):  # syncs: the group is still healthy after the failed constructions
            torch.manual_seed(10 * rank + s)
            (m(torch.randn(4, 16)) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
        opt.flush()
        out[name] = [a.clone() for a in opt.anchors()]  # the shared state (mixing > 0 keeps local shares)
    return out


@pytest.mark.parametrize("backend", ["localsgd", "gloo"])
def test_settings_that_differ_raise_on_every_rank(backend):
    res = run_ranks(_worker, 2, backend=backend, timeout=TIMEOUT)
    for name, _, _, words in CASES:
        for rank in range(2):
            msg = res[rank][name]
            assert msg.startswith("DiLoCo: the members of the sync group were constructed with different settings"), \
                (name, rank, msg)
            for w in words:
                assert w in msg, (name, rank, msg)
        assert res[0][name] == res[1][name], name  # the same message on every member
    # only the differing settings are named
    assert "outer_momentum" not in res[0]["outer_lr"] and "sync_every" not in res[0]["outer_lr"]
    for name, _, _ in AGREEING:
        for a, b in zip(res[0][name], res[1][name]):
            assert torch.equal(a, b), name  # constructed, synced, anchors identical


def test_message_groups_ranks_by_value():
    per_rank = [{"sync_every": 50, "outer_lr": 0.7}] * 3 + [{"sync_every": 100, "outer_lr": 0.7}]
    msg = mismatch_message("DiLoCo", per_rank, [0, 1, 2, 3])
    assert "sync_every: 50 on ranks [0, 1, 2], 100 on rank 3" in msg and "outer_lr" not in msg, msg
    assert mismatch_message("DiLoCo", [{"a": 1}, {"a": 1}], [4, 6]) is None
    assert "'<missing>' on rank 0, 2 on rank 1" in mismatch_message("DiLoCo", [{"a": 1}, {"a": 1, "b": 2}], [0, 1])


def _sharded_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    from test_fsdp import make_gpt, shard_model
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))  # 2 replicas of 1 shard
    model = shard_model(make_gpt(seed=rank), mesh)
    msgs = []
    for kw in ({"outer_lr": 0.7 if rank == 0 else 0.5}, {"fragments": 2, "overlap_steps": rank}):
        try:
            DiLoCo(model, torch.optim.AdamW(model.parameters()), sync_every=4, group=mesh.get_group("replicate"),
                   **kw)
            msgs.append("no error")
        except ValueError as exc:
            msgs.append(str(exc))
    return msgs


def test_sharded_replicas_with_different_settings_raise_on_every_rank():
    res = run_ranks(_sharded_worker, 2, backend="localsgd", timeout=TIMEOUT)
    assert res[0] == res[1], res
    lr_msg, tau_msg = res[0]
    assert lr_msg.startswith("ShardedDiLoCo: the members of the sync group were constructed with different "
                             "settings: outer_lr: 0.7 on rank 0, 0.5 on rank 1"), lr_msg
    assert "overlap_steps: 0 on rank 0, 1 on rank 1" in tau_msg and "mixing: 0.0 on rank 0, 0.5 on rank 1" in tau_msg


def _hier_worker(rank, world):
    import localsgd_comm
    try:
        localsgd_comm.new_hierarchical_groups(2 if rank < 2 else 4)
        return "no error"
    except ValueError as exc:
        return str(exc)


def test_hierarchical_groups_with_different_cluster_sizes_raise_on_every_rank():
    # before: ranks asking for other clusters waited in the store until the group timeout
    res = run_ranks(_hier_worker, 4, backend="localsgd", timeout=TIMEOUT)
    assert len(set(res)) == 1, res
    assert res[0].startswith("new_hierarchical_groups: the ranks called it with different arguments: "
                             "cluster_size: 2 on ranks [0, 1], 4 on ranks [2, 3]"), res[0]
