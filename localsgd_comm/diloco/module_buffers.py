"""Module buffers (BatchNorm's running statistics and the like) under DiLoCo.

DDP broadcasts buffers from rank 0 before every forward; under DiLoCo nothing else touches them,
so each rank's running statistics drift apart (measured before this module: up to 0.08 in
``running_mean`` and 0.18 in ``running_var`` of a 2-rank MLP after the last sync, with the
parameters bitwise equal). :class:`BufferSync` runs at every sync:

1. each rank marks the buffers it changed since the previous sync (``torch.equal`` against a
   copy taken then): a constant buffer such as a causal mask costs nothing after this step;
2. the marks are summed across the group (one float per buffer, through :func:`exact_sum`, so
   a "localsgd" group passes it through instead of quantizing it), so every rank agrees on which
   buffers to sync whatever it changed itself;
3. floating buffers changed anywhere are averaged in fp32 (exact fp32 sum, divided by p: the
   same bytes on every rank), other ones (``num_batches_tracked``) are broadcast from rank 0.

Whether the replicas start identical (so that DiLoCo can skip its construction broadcast) is
checked with the settings, in :mod:`.agreement`.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import backend as _backend
from .collectives import GroupReducer, exact_sum, staged_broadcast


def _src(group) -> int:
    return dist.get_global_rank(group, 0) if group not in (None, dist.group.WORLD) else 0


def _group_bytes(group) -> Optional[int]:
    g = group if group is not None else dist.group.WORLD
    return _backend.bytes_sent_on(g)


class BufferSync:
    """Averages a module's floating buffers (and broadcasts its other ones from rank 0) across
    ``group`` at every call; see the module docstring.

    ``group=None``: no group of its own; every :meth:`sync` passes the
    :class:`~.collectives.Reducer` to sync over (elastic DiLoCo: the group of the round's
    attempt, which changes with the members)."""

    def __init__(self, module: nn.Module, group, stage_device: Optional[torch.device] = None):
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else None
        self.buffers = [b for b in module.buffers()]
        self._snap = [b.detach().clone() for b in self.buffers]
        self._reducer = GroupReducer(group, stage_device) if group is not None else None
        self._stage = stage_device

    def backup(self) -> List[torch.Tensor]:
        """Copies of the buffers and of the snapshots the next sync compares them with."""
        return [b.detach().clone() for b in self.buffers + self._snap]

    def restore(self, saved: List[torch.Tensor]) -> None:
        """Buffers and snapshots as :meth:`backup` saved them (a sync that must not count)."""
        with torch.no_grad():
            for t, s in zip(self.buffers + self._snap, saved):
                t.copy_(s)

    def sync(self, stats: Dict[str, int], measure: bool = True, reducer=None) -> None:
        """Average/broadcast the buffers changed on any rank; their bytes go to
        ``stats["buffer_bytes_sent"]`` and ``stats["bytes_sent"]``. ``measure=False`` (another
        collective of the group may be in flight, whose bytes the counters would mix in): the
        algorithms' volumes instead of the group's counters. ``reducer`` (a
        :class:`~.collectives.Reducer`): sync over it instead of ``group`` (volumes counted,
        non-floating buffers all-gathered and rank 0's kept)."""
        own = reducer is None
        if own:
            if self._reducer is None:
                raise ValueError("BufferSync.sync: built without a group (group=None): expected a reducer, got none")
            reducer = self._reducer
        size = reducer.size
        if not self.buffers or size == 1:
            return
        before = _group_bytes(self.group) if measure and own else None
        with torch.no_grad():
            changed = torch.tensor([0.0 if torch.equal(b, s) else 1.0 for b, s in zip(self.buffers, self._snap)],
                                   dtype=torch.float32)
            dev = self.buffers[0].device
            marks = changed.to(dev)
            exact_sum(reducer, marks, async_op=False)
            todo = [i for i, m in enumerate(marks.cpu().tolist()) if m > 0]
            floats = [i for i in todo if self.buffers[i].is_floating_point()]
            others = [i for i in todo if not self.buffers[i].is_floating_point()]
            estimate = 4 * len(self.buffers) * 2 * (size - 1) // size
            if floats:
                by_device: Dict[torch.device, List[int]] = {}
                for i in floats:
                    by_device.setdefault(self.buffers[i].device, []).append(i)
                for device, idx in by_device.items():
                    flat = torch.cat([self.buffers[i].reshape(-1).to(torch.float32) for i in idx])
                    exact_sum(reducer, flat, async_op=False)
                    flat.div_(size)
                    estimate += 4 * flat.numel() * 2 * (size - 1) // size
                    off = 0
                    for i in idx:
                        b = self.buffers[i]
                        b.copy_(flat[off:off + b.numel()].view_as(b))
                        off += b.numel()
            for i in others:
                b = self.buffers[i]
                if own:
                    src = _src(self.group)
                    staged_broadcast(b, src, self.group, self._stage)
                    if dist.get_rank() == src:
                        estimate += b.numel() * b.element_size() * (size - 1)
                else:  # a Reducer has no broadcast: every rank's bytes gathered, rank 0's kept
                    raw = b.detach().contiguous().reshape(-1).view(torch.uint8)
                    out = torch.empty(size * raw.numel(), dtype=torch.uint8, device=raw.device)
                    reducer.all_gather(out, raw)
                    b.copy_(out[:raw.numel()].view(b.dtype).view_as(b))
                    estimate += raw.numel() * (size - 1)
            for i in todo:
                self._snap[i].copy_(self.buffers[i])
        after = _group_bytes(self.group) if own else None
        sent = after - before if before is not None and after is not None else estimate
        stats["buffer_bytes_sent"] = stats.get("buffer_bytes_sent", 0) + sent
        stats["bytes_sent"] += sent
