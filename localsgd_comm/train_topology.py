"""Where a ``localsgd-train`` run's replicas live on this rank: flat (one worker per replica),
hierarchical (``--clusters``: DDP inside a cluster, DiLoCo across) or sharded (``--fsdp``: FSDP2
inside a cluster, DiLoCo across), how the model is built and wrapped for it, and where its bytes
are counted (see :mod:`localsgd_comm.train`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

import torch

if TYPE_CHECKING:
    from .train import TrainConfig


def _comm_bytes(mode, opt, group, nparams, world, step_count):
    """Bytes this rank has sent: the backend's counters on a "localsgd" group (measured), else
    the ring volume 2 (p-1)/p x 4 bytes x params per DDP step (gloo keeps no counters)."""
    from .backend import get_backend_stats
    st = get_backend_stats(group)
    if st["format"] is not None or st["python_calls"]:
        return int(st["bytes_sent"]), "backend counters"
    if mode == "diloco":
        return int(opt.stats["bytes_sent"]), "estimate: ring volume"
    return int(2 * (world - 1) * 4 * nparams * step_count / world), "estimate: ring volume"


class _Topology:
    """The DiLoCo run's layout on this rank: how the model is built and wrapped, and where its
    bytes go. ``flat``: one worker per replica (plain DiLoCo, and the ddp modes); ``hierarchical``:
    DDP over the cluster's fp32 group, DiLoCo over ``hierarchy.cross``; ``fsdp``: fully_shard over
    the mesh's "shard" dimension, DiLoCo over its "replicate" group."""

    def __init__(self, cfg: TrainConfig, world: int, device: torch.device):
        self.kind, self.world, self.k = cfg.topology, world, cfg.cluster_size
        self.hierarchy = self.mesh = self.cross = self.intra = None
        if self.kind == "hierarchical":
            from .diloco import new_hierarchical_groups
            # fp32 inside a cluster (DDP's gradient all-reduce, the anchor all-gather); the cross
            # groups take the default group's backend (the compressed sync)
            self.hierarchy = new_hierarchical_groups(self.k, intra_backend="gloo" if device.type == "cpu" else "nccl")
            self.cross, self.intra = self.hierarchy.cross, self.hierarchy.intra
        elif self.kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            self.mesh = init_device_mesh(device.type, (cfg.clusters, self.k), mesh_dim_names=("replicate", "shard"))
            # the groups are passed on explicitly (not inferred from the mesh: torch caches meshes
            # by their layout, and an equal mesh built earlier in the process could come back)
            self.cross, self.intra = self.mesh.get_group("replicate"), self.mesh.get_group("shard")

    def wrap(self, model):
        """The module the training loop calls (DDP inside a cluster, or the sharded model)."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        if self.kind == "hierarchical":
            return DDP(model, process_group=self.intra)
        if self.kind == "fsdp":
            from torch.distributed.fsdp import fully_shard
            for blk in model.blocks:
                fully_shard(blk, mesh=self.mesh["shard"])
            fully_shard(model, mesh=self.mesh["shard"])
        return model

    def diloco_kwargs(self) -> dict:
        if self.kind == "hierarchical":
            return {"hierarchy": self.hierarchy}
        if self.kind == "fsdp":
            return {"group": self.cross}
        return {}

    def reset(self) -> None:
        from .backend import reset_backend_stats
        for g in (self.cross, self.intra):
            if g is not None:
                reset_backend_stats(g)

    def intra_counter(self) -> Optional[int]:
        from .backend import bytes_sent_on
        return bytes_sent_on(self.intra) if self.kind == "fsdp" else None

    def bytes(self, cfg: TrainConfig, opt, group, nparams: int, step_count: int, intra_not_training: int):
        """-> (cross-cluster bytes, their source, intra-cluster bytes or None, their source) this
        rank sent so far. Flat runs: every byte crosses (no cluster has two workers)."""
        from .backend import bytes_sent_on, ddp_bytes_per_rank
        if self.kind == "flat":
            b, src = _comm_bytes(cfg.mode, opt, group, nparams, self.world, step_count)
            return b, src, 0, "none (one worker per cluster)"
        measured = bytes_sent_on(self.cross)
        cross, csrc = ((measured, "backend counters") if measured is not None
                       else (int(opt.stats["bytes_sent"]), "estimate: ring volume"))
        if self.kind == "hierarchical":
            # DDP's fp32 gradient all-reduce over the cluster every step (gloo keeps no counters)
            # plus the anchor all-gathers after each sync (the volume DiLoCo counts)
            intra = ddp_bytes_per_rank(nparams, step_count, self.k) + int(opt.stats["intra_bytes_sent"])
            return cross, csrc, intra, "estimate: ring volume"
        intra = self.intra_counter()
        if intra is None:
            return cross, csrc, None, "not counted (the shard group keeps no counters on this backend)"
        # FSDP's all-gathers and reduce-scatters in training (not those of the evaluations)
        return cross, csrc, intra - intra_not_training, "backend counters"

    def replica_tensors(self, model) -> List[torch.Tensor]:
        """Every worker's full parameters (collective with fsdp: all-gathers over the shard group)."""
        ps = list({id(p): p for p in model.parameters()}.values())
        if self.kind == "fsdp":
            self.reshard(model)
            return [p.full_tensor() for p in ps]
        return [p.detach() for p in ps]

    def reshard(self, model) -> None:
        if self.kind == "fsdp":
            # a no-grad forward leaves the root unsharded; the next forward gathers the shards again
            from torch.distributed.fsdp import FSDPModule
            for m in model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()
