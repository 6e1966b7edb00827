"""The pieces :class:`~localsgd_comm.diloco.sharded.ShardedDiLoCo` syncs: a replica's local
shards as flat fp32 outer state (:class:`ShardedBuffer`), the segments and streaming fragments
over them (:class:`ShardSegment`, :func:`plan_sharded_fragments`, :class:`ShardedStreamingSync`),
the module-buffer sync over both mesh dimensions (:class:`ShardedBufferSync`) and the mesh
helpers. What they do and why is in :mod:`localsgd_comm.diloco.sharded`'s docstring.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from .engine import Reduction
from .module_buffers import BufferSync
from .streaming import StreamingSync, _min_max_cuts

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch: no FSDP2 either
    DTensor = None


def _is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def holds_dtensors(model, inner_optimizer) -> bool:
    """Whether the model's or the inner optimizer's parameters include DTensors (an FSDP2 model)."""
    if isinstance(model, nn.Module):
        if any(_is_dtensor(p) for p in model.parameters()):
            return True
    groups = getattr(inner_optimizer, "param_groups", None)
    if isinstance(groups, list):
        return any(_is_dtensor(p) for g in groups if isinstance(g, dict) for p in g.get("params", ()))
    return False


def _fsdp_modules(module: nn.Module) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def _local(p: torch.Tensor) -> torch.Tensor:
    """The rank's shard of a DTensor parameter: FSDP's own storage (writes go through)."""
    return p._local_tensor if _is_dtensor(p) else p.data


class ShardedBuffer:
    """The local shards of one (device, dtype) and their outer state: flat fp32 anchor, momentum
    and residual, each shard starting on a quantization-block boundary. The shards stay in
    FSDP's storage; :meth:`gather` packs them into a transient flat buffer, :meth:`write_params`
    writes one back."""

    def __init__(self, params: List[nn.Parameter], state_device, momentum: bool, residual: bool, align: int):
        locals_ = [_local(p) for p in params]
        self.device, self.dtype = locals_[0].device, locals_[0].dtype
        offsets, off = [], 0
        for t in locals_:
            offsets.append(off)
            off += -(-t.numel() // align) * align
        self.offsets = offsets
        self.numel = offsets[-1] + locals_[-1].numel()
        self.params = params
        self.shapes = [t.shape for t in locals_]
        sd = self.device if state_device is None else torch.device(state_device)
        self.state_device = sd
        pin = sd.type == "cpu" and self.device.type == "cuda"
        self.anchor = torch.empty(self.numel, dtype=torch.float32, device=sd, pin_memory=pin)
        self.anchor.copy_(self.gather())
        self.momentum = torch.zeros_like(self.anchor) if momentum else None
        self.residual = torch.zeros_like(self.anchor) if residual else None
        if pin:
            self.momentum = None if self.momentum is None else self.momentum.pin_memory()
            self.residual = None if self.residual is None else self.residual.pin_memory()

    def locals(self) -> List[torch.Tensor]:
        return [_local(p) for p in self.params]

    def span(self, j0: int = 0, j1: Optional[int] = None) -> "tuple[int, int]":
        """The range ``[lo, hi)`` of the flat layout holding parameters ``j0 .. j1 - 1`` (with
        their block padding; the last parameter's range ends at ``numel``)."""
        j1 = len(self.params) if j1 is None else j1
        lo = self.offsets[j0] if j0 < len(self.params) else self.numel
        hi = self.offsets[j1] if j1 < len(self.params) else self.numel
        return lo, hi

    def gather(self, j0: int = 0, j1: Optional[int] = None) -> torch.Tensor:
        """The local shards of parameters ``j0 .. j1 - 1`` (default: all) packed into a new flat
        tensor laid out like ``anchor[lo:hi]`` (parameter dtype and device, zero padding)."""
        lo, hi = self.span(j0, j1)
        flat = torch.zeros(hi - lo, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for t, off in zip(self.locals()[j0:j1], self.offsets[j0:j1]):
                flat[off - lo:off - lo + t.numel()].copy_(t.reshape(-1))
        return flat

    @property
    def flat(self) -> torch.Tensor:
        return self.gather()

    def write_params(self, src: torch.Tensor, j0: int = 0, j1: Optional[int] = None) -> None:
        """local shards of parameters ``j0 .. j1 - 1`` (default: all) <- src (laid out like
        ``anchor[lo:hi]``), rounded to nearest once."""
        lo, _ = self.span(j0, j1)
        with torch.no_grad():
            for t, off in zip(self.locals()[j0:j1], self.offsets[j0:j1]):
                n = t.numel()
                if n:
                    t.copy_(src[off - lo:off - lo + n].view(t.shape))

    def packed(self, buf: torch.Tensor) -> torch.Tensor:
        return torch.cat([buf[o:o + s.numel()] for s, o in zip(self.shapes, self.offsets)])

    def segment(self, j0: int = 0, j1: Optional[int] = None) -> "ShardSegment":
        return ShardSegment(self, j0, j1)


class ShardSegment:
    """The local shards of parameters ``j0 .. j1 - 1`` of a :class:`ShardedBuffer` (default: all of
    them) as the engine sees a segment (see ``buffers.Segment``): the parameters are never in place
    (they live in FSDP's storage), so the engine writes them back through :meth:`write_params`
    after the outer step. A streaming fragment is one such segment per buffer."""

    def __init__(self, buffer: ShardedBuffer, j0: int = 0, j1: Optional[int] = None):
        self.buffer = buffer
        self.j0, self.j1 = j0, len(buffer.params) if j1 is None else j1
        self.lo, self.hi = buffer.span(self.j0, self.j1)
        self.numel = self.hi - self.lo
        self.state_device = buffer.state_device
        lo, hi = self.lo, self.hi
        self.anchor = buffer.anchor[lo:hi]
        self.momentum = None if buffer.momentum is None else buffer.momentum[lo:hi]
        self.residual = None if buffer.residual is None else buffer.residual[lo:hi]

    def params_in_place(self) -> Optional[torch.Tensor]:
        return None

    def params_on_state_device(self) -> torch.Tensor:
        flat = self.buffer.gather(self.j0, self.j1)
        return flat if flat.device == self.state_device else flat.to(self.state_device)

    def write_params(self, src: torch.Tensor) -> None:
        self.buffer.write_params(src, self.j0, self.j1)


def plan_sharded_fragments(flats: List[ShardedBuffer], order: List[nn.Parameter], fragments: int,
                           align: int) -> "tuple[List[List[ShardSegment]], List[int]]":
    """The fragments of a sharded model (see "Streaming" in the module docstring): cut over the
    whole (unsharded) parameters in model order, each parameter's size its full ``numel`` rounded
    up to ``align`` (the last of each buffer unrounded: the sizes the unsharded plan weighs), by the
    unsharded plan's min-max cut; never inside a parameter. Fragment f is, on every rank, this
    rank's local shards of the same parameters: one :class:`ShardSegment` per buffer.

    Returns the fragments' segments and each fragment's full size (the balanced quantity)."""
    if isinstance(fragments, bool) or not isinstance(fragments, int) or fragments < 1:
        raise ValueError(f"fragments: expected an integer >= 1, got {fragments!r}")
    if fragments > len(order):
        raise ValueError(f"fragments: expected at most the number of synced parameters ({len(order)}), "
                         f"got {fragments}")
    where = {}
    for fi, fb in enumerate(flats):
        for j, p in enumerate(fb.params):
            where[id(p)] = (fi, j)
    sizes = []
    for p in order:
        fi, j = where[id(p)]
        n = p.numel()  # a DTensor's numel is the full parameter's
        last = j == len(flats[fi].params) - 1
        sizes.append(n if last else -(-n // align) * align)
    bounds = _min_max_cuts(sizes, fragments)
    full = [sum(sizes[bounds[k]:bounds[k + 1]]) for k in range(fragments)]
    out = []
    for k in range(fragments):
        runs: Dict[int, List[int]] = {}
        for p in order[bounds[k]:bounds[k + 1]]:
            fi, j = where[id(p)]
            runs.setdefault(fi, []).append(j)
        segs = []
        for fi in sorted(runs):
            js = runs[fi]
            # a contiguous run of the model order is a contiguous run of each buffer's (ordered) parameters
            assert js == list(range(js[0], js[-1] + 1)), js
            segs.append(flats[fi].segment(js[0], js[-1] + 1))
        out.append(segs)
    return out, full


class ShardedStreamingSync(StreamingSync):
    """Streaming over sharded replicas: the fragments of :func:`plan_sharded_fragments`; a fragment's
    finiteness agreed over the shard group at its merge (the whole fragment, every shard, skips
    together); the schedule, reduces in flight and merge are :class:`~.streaming.StreamingSync`'s."""

    def _plan(self, flats, order, fragments: int, align: int):
        segments, self._full_numels = plan_sharded_fragments(flats, order, fragments, align)
        return segments

    def _finite(self, red: Reduction) -> bool:
        o = self.owner
        flag = torch.tensor([1 if o._engine.is_finite(red) else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=o.mesh.get_group())
        return bool(flag.item())

    def fragment_full_numels(self) -> List[int]:
        """Each fragment's full (unsharded) element count, block padding included: the sizes the
        cut balances, the same on every rank."""
        return list(self._full_numels)


def _mesh_desc(mesh) -> str:
    return f"DeviceMesh({mesh.device_type!r}, {mesh.mesh.tolist()}, mesh_dim_names={mesh.mesh_dim_names})"


def _root_mesh(mesh):
    get = getattr(mesh, "_get_root_mesh", None)
    root = get() if get is not None else None
    return root if root is not None else mesh


def _replicate_ranks(mesh, rank: int) -> Optional[List[int]]:
    """The ranks of ``mesh``'s root mesh that hold the same shard as ``rank`` (same coordinates on
    the dimensions ``mesh`` spans), or None when ``mesh`` is not a proper sub-mesh of a root."""
    root = _root_mesh(mesh)
    if root is mesh or root.ndim == mesh.ndim:
        return None
    grid = root.mesh
    sub = set(mesh.mesh.flatten().tolist())
    mine = (grid == rank).nonzero()[0].tolist()
    # the root dims mesh spans: those along which rank's neighbours are in mesh
    spanned = []
    for d in range(root.ndim):
        idx = list(mine)
        line = []
        for i in range(grid.shape[d]):
            idx[d] = i
            line.append(int(grid[tuple(idx)]))
        if len(grid.shape) and set(line) <= sub and grid.shape[d] > 1:
            spanned.append(d)
    out = []
    for coord in (grid >= 0).nonzero().tolist():
        if all(coord[d] == mine[d] for d in spanned):
            out.append(int(grid[tuple(coord)]))
    return sorted(out)


class ShardedBufferSync:
    """Module buffers over sharded replicas (see "Module buffers" in the module docstring): a
    :class:`~.module_buffers.BufferSync` over the shard group (the ranks of this replica), then
    one over the replicate group (this shard rank's counterparts in the other replicas). Its
    ``sync(stats, measure)`` is ``BufferSync.sync``'s: the shard group's bytes go to
    ``stats["intra_bytes_sent"]``, the replicate group's to ``stats["bytes_sent"]``, both to
    ``stats["buffer_bytes_sent"]``."""

    def __init__(self, module: nn.Module, shard_group, replicate_group):
        dt = [n for n, b in module.named_buffers() if _is_dtensor(b)]
        if dt:
            raise ValueError(f"sync_buffers: expected plain tensor buffers (fully_shard leaves buffers unsharded), "
                             f"got DTensor buffers {dt[:3]}; pass sync_buffers=False and sync them yourself")
        self.intra = BufferSync(module, shard_group)
        self.cross = BufferSync(module, replicate_group)

    def sync(self, stats: Dict[str, int], measure: bool = True) -> None:
        # measured on the shard group: FSDP's collectives there have all finished when step() runs
        local = {"bytes_sent": 0, "buffer_bytes_sent": 0}
        self.intra.sync(local)
        stats["intra_bytes_sent"] += local["bytes_sent"]
        stats["buffer_bytes_sent"] = stats.get("buffer_bytes_sent", 0) + local["buffer_bytes_sent"]
        self.cross.sync(stats, measure=measure)


def _flat_of(ts: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts]) if ts else torch.empty(0)


def _unflat_into(flat: torch.Tensor, ts: List[torch.Tensor]) -> None:
    off = 0
    for t in ts:
        n = t.numel()
        t.copy_(flat[off:off + n].view(t.shape))
        off += n
