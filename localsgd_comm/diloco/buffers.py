"""Parameter buffers and the outer state kept for them.

A :class:`FlatBuffer` holds every synced parameter of one (device, dtype) in one flat tensor
(each ``p.data`` re-pointed at its slice, each parameter starting on a quantization-block
boundary) together with the fp32 anchor, outer momentum and error-feedback residual, laid out
alike. A :class:`Segment` is a contiguous block-aligned range of a buffer: the unit the
outer-step engine (:mod:`.engine`) syncs. Today a segment is a whole buffer, or the shard a
rank owns in hierarchical mode; the engine touches parameters only through a segment's methods,
so other layouts (a fragment of the model, the local shards of a sharded model) are other
segments, not other engines.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unique_parameters(module: nn.Module) -> List[nn.Parameter]:
    """The module's parameters in order, each once (a tied weight is reachable twice)."""
    seen, out = set(), []
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class FlatBuffer:
    """One flat parameter buffer (one device and dtype) and its outer state."""

    def __init__(self, params: List[nn.Parameter], state_device: Optional[torch.device], momentum: bool,
                 residual: bool, align: int = 1):
        p0 = params[0]
        self.device, self.dtype = p0.device, p0.dtype
        # Every parameter starts on a quantization-block boundary. Packed tightly, a small tensor
        # (a bias, a norm's weight) shares its block with a large neighbour and is quantized with
        # the neighbour's scale: benchmarks/results/block_size_sweep.md measured the worst
        # layer's int8 relative RMSE at 0.63 packed vs 0.019 aligned, for < 1e-5 extra bytes per
        # element at block 128. The padding stays zero in params, anchor and deltas.
        offsets, off = [], 0
        for p in params:
            offsets.append(off)
            off += -(-p.numel() // align) * align
        self.numel = offsets[-1] + params[-1].numel()
        self.flat = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        self.offsets = offsets
        for p, off in zip(params, offsets):
            n = p.numel()
            with torch.no_grad():
                self.flat[off:off + n].copy_(p.data.reshape(-1))
            p.data = self.flat[off:off + n].view_as(p)
        self.params = params
        # where each parameter's data must stay (checked every step: see DiLoCo._check_params)
        self.ptrs = [p.data_ptr() for p in params]
        sd = self.device if state_device is None else torch.device(state_device)
        self.state_device = sd
        self.anchor = self.flat.detach().to(device=sd, dtype=torch.float32, copy=True)
        self.momentum = torch.zeros_like(self.anchor) if momentum else None
        self.residual = torch.zeros_like(self.anchor) if residual else None

    def segment(self, lo: int = 0, hi: Optional[int] = None) -> "Segment":
        return Segment(self, lo, self.numel if hi is None else hi)

    def packed(self, buf: torch.Tensor) -> torch.Tensor:
        """``buf`` (laid out like ``flat``) without the alignment padding: the parameters'
        elements in order, as a new tensor."""
        return torch.cat([buf[o:o + p.numel()] for p, o in zip(self.params, self.offsets)])

    def write_params(self, src: torch.Tensor) -> None:
        """params <- src (fp32 on the state device), rounded to nearest once."""
        with torch.no_grad():
            self.flat.copy_(src.to(self.device) if src.device != self.device else src)


def build_buffers(params: List[nn.Parameter], *, state_device, momentum: bool, residual: bool,
                  align: int) -> List[FlatBuffer]:
    """One :class:`FlatBuffer` per (device, dtype) of ``params``, in order of first appearance."""
    keys: Dict[tuple, List[nn.Parameter]] = {}
    for p in params:
        keys.setdefault((p.device, p.dtype), []).append(p)
    return [FlatBuffer(ps, state_device, momentum, residual, align) for ps in keys.values()]


class Segment:
    """The range ``[lo, hi)`` of a :class:`FlatBuffer` (block-aligned): views of its anchor,
    momentum and residual, and access to its parameters from the state device."""

    def __init__(self, buffer: FlatBuffer, lo: int, hi: int):
        self.buffer, self.lo, self.hi = buffer, lo, hi
        self.numel = hi - lo
        self.state_device = buffer.state_device
        self.anchor = buffer.anchor[lo:hi]
        self.momentum = None if buffer.momentum is None else buffer.momentum[lo:hi]
        self.residual = None if buffer.residual is None else buffer.residual[lo:hi]

    def params_in_place(self) -> Optional[torch.Tensor]:
        """The live parameters of the range when they sit on the state device (the fused outer
        step then writes them in the same pass), else None."""
        b = self.buffer
        return b.flat[self.lo:self.hi] if b.state_device == b.device else None

    def params_on_state_device(self) -> torch.Tensor:
        b = self.buffer
        p = b.flat[self.lo:self.hi]
        return p if b.state_device == b.device else p.to(b.state_device)

    def write_params(self, src: torch.Tensor) -> None:
        """params[lo:hi] <- src (fp32 on the state device), rounded to nearest once."""
        b = self.buffer
        with torch.no_grad():
            b.flat[self.lo:self.hi].copy_(src.to(b.device) if src.device != b.device else src)
