"""Hierarchical mode (see the package docstring): its process groups, and what it adds around the
engine: the per-step gradient average inside a cluster, the owned shards the cross-cluster sync
runs on, one decision on a non-finite result per cluster, and the anchor all-gather."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from .buffers import FlatBuffer, Segment
from .collectives import carries



@dataclasses.dataclass
class HierarchicalGroups:
    """Process groups of hierarchical mode, as seen by the calling rank.

    ``intra``: this rank's cluster (fast link; per-step gradient all-reduce, anchor all-gather).
    ``cross``: member ``local_index`` of every cluster (slow link; the DiLoCo sync of one shard).
    """

    intra: Any
    cross: Any
    cluster_size: int
    num_clusters: int
    cluster_index: int
    local_index: int


def new_hierarchical_groups(cluster_size: int, *, intra_backend: Optional[str] = None,
                            cross_backend: Optional[str] = None) -> HierarchicalGroups:
    """Split the default group into clusters of ``cluster_size`` consecutive ranks.

    Every rank must call this (``dist.new_group`` is collective). ``intra_backend`` defaults
    to ``"gloo"`` on CPU-only setups and ``"nccl"`` when CUDA is available, so the per-step
    gradient all-reduce inside a cluster stays full precision; ``cross_backend`` defaults to
    the default group's backend (e.g. ``"localsgd"``).
    """
    if not dist.is_initialized():
        raise RuntimeError("new_hierarchical_groups: expected an initialized default process group, got none")
    world, rank = dist.get_world_size(), dist.get_rank()
    if not isinstance(cluster_size, int) or cluster_size < 1 or world % cluster_size != 0:
        raise ValueError(f"cluster_size must be a positive divisor of the world size {world}, got {cluster_size!r}")
    if intra_backend is None:
        intra_backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    num_clusters = world // cluster_size
    intra = cross = None
    for c in range(num_clusters):  # every rank creates every group, in the same order
        ranks = [c * cluster_size + j for j in range(cluster_size)]
        g = dist.new_group(ranks, backend=intra_backend)
        if rank in ranks:
            intra = g
    for j in range(cluster_size):
        ranks = [c * cluster_size + j for c in range(num_clusters)]
        g = dist.new_group(ranks, backend=cross_backend)
        if rank in ranks:
            cross = g
    return HierarchicalGroups(intra=intra, cross=cross, cluster_size=cluster_size, num_clusters=num_clusters,
                              cluster_index=rank // cluster_size, local_index=rank % cluster_size)


class HierarchicalSync:
    """Hierarchical mode around the engine, for the calling rank: member ``j`` of a cluster owns
    the ``j``-th block-aligned shard of every buffer (:attr:`segments`), which the engine syncs
    over ``hierarchy.cross``."""

    def __init__(self, hierarchy: HierarchicalGroups, buffers: List[FlatBuffer], block_size: int):
        self.h, self.buffers = hierarchy, buffers
        self.segments: List[Segment] = []
        self.shard_len: List[int] = []
        for f in buffers:
            per = -(-f.numel // hierarchy.cluster_size)
            L = -(-per // block_size) * block_size  # block-aligned shards
            lo = min(hierarchy.local_index * L, f.numel)
            self.segments.append(f.segment(lo, min(lo + L, f.numel)))
            self.shard_len.append(L)

    def average_gradients(self, stats: Dict[str, int]) -> None:
        """fp32 gradient all-reduce (AVG) inside the cluster over one flat buffer per dtype."""
        h = self.h
        for f in self.buffers:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in f.params]
            # One "has a gradient" flag per parameter rides along: a parameter that got a gradient
            # on some members of the cluster only (data-dependent branch) must get the averaged
            # gradient on all of them, or the inner step moves it on some members only and the
            # cluster's replicas diverge (as DDP, which assigns the reduced bucket everywhere).
            has = torch.tensor([0.0 if p.grad is None else 1.0 for p in f.params], device=f.device)
            flat = torch.cat([g.reshape(-1).float() for g in grads] + [has])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=h.intra)
            flags = flat[flat.numel() - len(f.params):].tolist()
            flat.div_(h.cluster_size)
            stats["intra_bytes_sent"] += int(2 * (h.cluster_size - 1) * flat.numel() * 4 / h.cluster_size)
            off = 0
            for p, flag in zip(f.params, flags):
                n = p.numel()
                if flag > 0:
                    g = flat[off:off + n].view_as(p)
                    if p.grad is None:
                        p.grad = g.to(p.dtype, copy=True)
                    else:
                        p.grad.copy_(g)
                off += n

    def agree_finite(self, finite: bool) -> bool:
        """Members of a cluster hold different shards: one decision for all (4 bytes, fast link)."""
        f = self.buffers[0]
        dev = f.state_device if carries(self.h.intra, f.state_device) else f.device
        bad = torch.tensor([0.0 if finite else 1.0], device=dev)
        dist.all_reduce(bad, op=dist.ReduceOp.SUM, group=self.h.intra)
        return bool(bad.item() == 0.0)

    def gather_anchors(self, stats: Dict[str, int]) -> None:
        """The updated anchor shards all-gathered in fp32 inside the cluster; params <- anchor."""
        h = self.h
        for f, seg, L in zip(self.buffers, self.segments, self.shard_len):
            # on the state device, or on the parameters' when the intra group cannot carry it
            # (CPU state with an NCCL cluster)
            dev = f.state_device if carries(h.intra, f.state_device) else f.device
            mine = torch.zeros(L, dtype=torch.float32, device=dev)
            mine[:seg.numel].copy_(seg.anchor)
            parts = [torch.empty_like(mine) for _ in range(h.cluster_size)]
            dist.all_gather(parts, mine, group=h.intra)
            f.anchor.copy_(torch.cat(parts)[:f.numel])
            stats["intra_bytes_sent"] += (h.cluster_size - 1) * L * 4
            f.write_params(f.anchor)
