"""Module buffers under DiLoCo: what DDP does every step (its buffer broadcast), done at every
sync, and the check that lets the construction skip a broadcast nobody needs.

Buffers are not parameters: no optimizer updates them, so the pseudo-gradient does not carry
them, and without this each replica's BatchNorm running statistics (and any other floating
buffer) would drift apart for good. At every sync :class:`BufferSync` averages the floating
buffers over the sync's group (an exact fp32 sum in a fixed order, then a division: every rank
ends with the same bytes) and copies the non-floating ones (``num_batches_tracked``, masks)
from the group's first rank; buffers already equal everywhere (found by fingerprint) are left
alone. The bytes are counted apart (``stats["buffer_bytes_sent"]``) and
in ``stats["bytes_sent"]``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .. import backend as _backend
from .collectives import GroupReducer, _all_gather, exact_sum, staged_broadcast


def unique_buffers(module: nn.Module) -> List[torch.Tensor]:
    """The module's buffers, each once (a buffer shared by two submodules is one tensor)."""
    seen, out = set(), []
    for b in module.buffers():
        if b is not None and id(b) not in seen:
            seen.add(id(b))
            out.append(b)
    return out


class BufferSync:
    """At each :meth:`run`, the buffers of ``module`` that differ across ``group`` (None: the
    default group): floating ones averaged, the others copied from the group's first rank.

    Which ones differ is found by one all-gather of their fingerprints (24 bytes a buffer), so
    a constant buffer (a causal mask, as GPT scripts register) costs nothing more, and is never
    rounded by an average of identical values (``(x + x + x) / 3`` need not be ``x`` in fp32)."""

    def __init__(self, module: nn.Module, group):
        self.group = group
        self._reducer = GroupReducer(group)
        self.size = self._reducer.size
        self._src = dist.get_global_rank(group, 0) if group not in (None, dist.group.WORLD) else 0
        self.buffers = unique_buffers(module)

    def __bool__(self) -> bool:
        return bool(self.buffers) and self.size > 1

    @torch.no_grad()
    def run(self) -> int:
        """Average/copy now; returns the bytes this rank sent (the backend's counters where the
        group keeps them, else the algorithms' volumes)."""
        if not self:
            return 0
        before = _backend.bytes_sent_on(self.group)
        p = self.size
        fp = fingerprint(self.buffers)
        every = torch.empty(p * fp.numel(), dtype=fp.dtype, device=fp.device)
        _all_gather(every, fp, group=self.group)
        rows = every.view(p, len(self.buffers), -1)
        differ = (rows != rows[0]).any(dim=2).any(dim=0).tolist()
        estimate = (p - 1) * fp.numel() * fp.element_size()
        by_device: Dict[torch.device, List[torch.Tensor]] = {}
        for b, d in zip(self.buffers, differ):
            if d and b.is_floating_point():
                by_device.setdefault(b.device, []).append(b)
        for dev, bufs in by_device.items():  # one exact fp32 sum per device, in buffer order
            flat = torch.cat([b.reshape(-1).to(torch.float32) for b in bufs])
            exact_sum(self._reducer, flat, async_op=False)
            flat.div_(p)
            off = 0
            for b in bufs:
                b.copy_(flat[off:off + b.numel()].view_as(b))
                off += b.numel()
            n = flat.numel()
            estimate += (2 * (p - 1) * (-(-n // p)) * 4 if self._reducer.composes_sum(dev)
                         else _backend.ddp_bytes_per_rank(n, 1, p))
        for b, d in zip(self.buffers, differ):
            if d and not b.is_floating_point():
                staged_broadcast(b.data, self._src, self.group, None)
                if dist.get_rank() == self._src:
                    estimate += (p - 1) * b.numel() * b.element_size()
        after = _backend.bytes_sent_on(self.group)
        return after - before if before is not None and after is not None else estimate


def fingerprint(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Three float64 numbers per tensor (sum, L2 norm, sum of the odd elements) in one float64
    tensor on the first tensor's device: equal on two ranks when their tensors are bitwise equal
    (same computation on the same bytes), different in practice when they are not."""
    rows: List[torch.Tensor] = []
    for t in tensors:
        x = t.detach().reshape(-1)
        if not x.is_floating_point():
            x = x.to(torch.float64)
        rows.append(torch.stack([x.sum(dtype=torch.float64),
                                 torch.linalg.vector_norm(x, dtype=torch.float64),
                                 x[1::2].sum(dtype=torch.float64)]).to(tensors[0].device))
    return torch.stack(rows).reshape(-1) if rows else torch.zeros(0, dtype=torch.float64)


def replicas_agree(tensors: Sequence[torch.Tensor], group) -> Tuple[bool, int]:
    """Whether ``tensors`` are (by :func:`fingerprint`) the same on every rank of ``group``, and
    the bytes this rank sent to find out (one all-gather of the fingerprints: 24 bytes a tensor)."""
    if not tensors:
        return True, 0
    fp = fingerprint(tensors)
    p = dist.get_world_size(group)
    every = torch.empty(p * fp.numel(), dtype=fp.dtype, device=fp.device)
    _all_gather(every, fp, group=group)
    rows = every.view(p, -1)
    return bool((rows == rows[0]).all()), (p - 1) * fp.numel() * fp.element_size()
