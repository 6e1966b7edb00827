"""Hierarchical mode's process groups (see the package docstring)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.distributed as dist



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
