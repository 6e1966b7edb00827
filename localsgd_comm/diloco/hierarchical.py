"""Hierarchical mode (see the package docstring): its process groups, and what it adds around the
engine: the per-step gradient average inside a cluster, the owned shards the cross-cluster sync
runs on, one decision on a non-finite result per cluster, and the anchor all-gather.

Streaming across clusters (``DiLoCo(hierarchy=..., fragments=P, overlap_steps=TAU)``)
----------------------------------------------------------------------------------
Inside a cluster nothing changes: the fp32 gradient average every inner step (DDP's, or
:meth:`HierarchicalSync.average_gradients`) keeps the members' parameters identical. Across
clusters the sync is streaming mode's (:mod:`.streaming`): the same fragments (cut over the
whole model, the same on every rank), schedule, bound on TAU, mixing, flush and checkpoints.
What changes is who syncs which elements (:class:`HierarchicalStreamingSync`):

* **Pieces.** Every segment of a fragment is cut as hierarchical mode cuts a whole buffer
  (:meth:`HierarchicalSync.owned_piece`): ``c = cluster_size`` block-aligned shards of
  ``L = ceil(ceil(n / c) / block) * block`` elements, member ``j`` owning ``[j L, (j + 1) L)``
  of it (the last shards shorter, or empty). A piece starts on a block boundary, so it
  quantizes as in the whole buffer.
* **Start** (fragment ``f``'s sync step): member ``j`` compresses the pseudo-gradient of its
  pieces of ``f`` (residuals are per element, hence per piece) and starts their all-reduce over
  ``hierarchy.cross`` (member ``j`` of every cluster), in the background for TAU steps. Each
  byte of the fragment crosses the slow link once: a member's peak per sync event is about
  ``1 / (c P)`` of the model.
* **Merge** (TAU steps later): the reduce is awaited; one decision on a non-finite result per
  cluster (:meth:`HierarchicalSync.agree_finite`, 4 bytes over ``hierarchy.intra``: member
  ``j`` of every cluster holds the same reduced bytes, so every cluster reaches the same
  decision); if finite, the outer step on the owned pieces, the fragment's updated anchor
  all-gathered in fp32 inside the cluster (:meth:`HierarchicalSync.gather_segments`: one
  all-gather per state device, each piece padded to its ``L``), then
  ``params_f <- mixing * params_f + (1 - mixing) * anchor_f`` over the whole fragment. If not
  finite, on every rank: anchor and momentum kept, the residuals of the pieces restored, the
  fragment's parameters reset to its anchor, no all-gather.
* ``fragments=1, overlap_steps=0``: the one fragment's pieces are hierarchical mode's owned
  shards, with the same start, decision, outer step and all-gather: hierarchical DiLoCo bit
  for bit (tested). ``overlap=True`` with ``hierarchy`` stays refused;
  ``fragments=1, overlap_steps=H, mixing=0`` is its streaming form.

Anchors are identical on every rank after every merge (so after every cycle of fragments);
live parameters are identical inside a cluster, and across clusters only where a merge with
``mixing = 0`` just replaced them by the anchor.

**Ordering of collectives.** Every collective is issued from ``step()`` (``flush()``,
``state_dict()``), at points that depend only on the step number, H, P and TAU (the same on
every rank) and on a non-finite decision that is agreed before any rank branches on it:

* ``hierarchy.intra`` (blocking): each inner step's gradient all-reduce (before the inner
  step; DDP's in the backward); then, after the inner step, for each fragment merged at that
  step, in the order their syncs started, its decision all-reduce and (when finite) its
  anchor all-gather.
* ``hierarchy.cross``: for each fragment started at that step, after the merges due (streaming
  mode's order), one all-reduce per non-empty piece, in segment order; with fp32 without
  averaging on a "localsgd" group, the all-gather half of the exact sum at the merge.
* the default group: module buffers at the end of each round of fragments, before that step's
  merges and starts.

So c10d, which matches the collectives of a group by their sequence, pairs the same calls on
every rank. Members of one cluster reduce on different cross groups (member ``j``'s), so their
different piece sizes never meet in one collective. No wait cycle: a merge blocks on a cross
reduce that every member of that cross group started at the same earlier step, and the intra
collectives after it are reached by every member of the cluster at the same step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .agreement import agree
from .buffers import FlatBuffer, Segment
from .collectives import carries
from .streaming import StreamingSync



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
    if intra_backend is None:
        intra_backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    # dist.new_group is collective: a rank asking for other clusters (another cluster_size) would
    # wait in the store until the group timeout (30 min by default). One all-gather of a digest first.
    world_group = dist.group.WORLD
    dev = (torch.device("cpu") if carries(world_group, torch.device("cpu"))
           else torch.device("cuda", torch.cuda.current_device()))
    agree({"cluster_size": cluster_size, "intra_backend": intra_backend, "cross_backend": cross_backend},
          None, world_group, dev, who="new_hierarchical_groups",
          wording=("the ranks called it with different arguments",
                   "Every rank must call it with the same arguments; no group was created"))
    # (the arguments are checked after the exchange: a rank that raised alone would leave the others waiting)
    if not isinstance(cluster_size, int) or cluster_size < 1 or world % cluster_size != 0:
        raise ValueError(f"cluster_size must be a positive divisor of the world size {world}, got {cluster_size!r}")
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
        self.h, self.buffers, self.block_size = hierarchy, buffers, block_size
        self.segments: List[Segment] = []
        self.shard_len: List[int] = []
        for f in buffers:
            seg, L = self.owned_piece(f.segment())
            self.segments.append(seg)
            self.shard_len.append(L)

    def owned_piece(self, seg: Segment) -> Tuple[Segment, int]:
        """This rank's shard of ``seg`` and the shard length ``L``: ``seg`` cut into
        ``cluster_size`` block-aligned shards of ``L = ceil(ceil(numel / c) / block) * block``
        elements (the last ones shorter or empty), member ``j`` owning ``[j L, (j + 1) L)``.
        A whole buffer's shard is the owned shard of hierarchical mode."""
        c, j = self.h.cluster_size, self.h.local_index
        per = -(-seg.numel // c)
        L = -(-per // self.block_size) * self.block_size  # block-aligned shards
        lo = min(j * L, seg.numel)
        return seg.buffer.segment(seg.lo + lo, seg.lo + min(lo + L, seg.numel)), L

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

    def gather_segments(self, segments: Sequence[Segment], stats: Dict[str, int]) -> None:
        """The updated anchor of ``segments`` (a fragment, each member holding the outer step of
        its :meth:`owned_piece` of every segment) all-gathered in fp32 inside the cluster: one
        all-gather per state device, of the owned pieces each padded to its shard length, in the
        order of ``segments`` (the same on every member). The parameters are not written."""
        h = self.h
        by_dev: Dict[torch.device, list] = {}
        for seg in segments:
            if seg.numel == 0:
                continue
            f = seg.buffer
            dev = f.state_device if carries(h.intra, f.state_device) else f.device
            piece, L = self.owned_piece(seg)
            by_dev.setdefault(dev, []).append((seg, piece, L))
        for dev, items in by_dev.items():
            total = sum(L for _, _, L in items)
            mine = torch.zeros(total, dtype=torch.float32, device=dev)
            off = 0
            for _, piece, L in items:
                mine[off:off + piece.numel].copy_(piece.anchor)
                off += L
            parts = [torch.empty_like(mine) for _ in range(h.cluster_size)]
            dist.all_gather(parts, mine, group=h.intra)
            off = 0
            for seg, _, L in items:
                seg.anchor.copy_(torch.cat([p[off:off + L] for p in parts])[:seg.numel])
                off += L
            stats["intra_bytes_sent"] += (h.cluster_size - 1) * total * 4


class HierarchicalStreamingSync(StreamingSync):
    """Streaming DiLoCo across clusters (the module docstring): the fragments, schedule, overlap
    and merge of :class:`~.streaming.StreamingSync`, each fragment's sync run on this rank's
    :meth:`~HierarchicalSync.owned_piece` of each of its segments over ``hierarchy.cross``, one
    non-finite decision per cluster, and the fragment's anchor all-gathered inside the cluster
    before the merge."""

    def __init__(self, owner, hier: HierarchicalSync, order, fragments: int, overlap_steps: int,
                 mixing: Optional[float], align: int):
        super().__init__(owner, order, fragments, overlap_steps, mixing, align)
        self.hier = hier
        self.owned = [[hier.owned_piece(seg)[0] for seg in segs] for segs in self.segments]

    def reduced_segments(self, f: int) -> List[Segment]:
        return self.owned[f]

    def agree_finite(self, finite: bool) -> bool:
        return self.hier.agree_finite(finite)

    def _apply(self, item) -> None:
        # outer step of the owned pieces, the fragment's anchor gathered, then the merge of the
        # whole fragment (with mixing = 0: params <- anchor, as hierarchical mode's gather does)
        self.owner._engine.apply(item.red, write_params=False)
        self.hier.gather_segments(self.segments[item.fragment], self.owner.stats)
        self._mix(self.segments[item.fragment])
