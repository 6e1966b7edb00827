"""Flat, block-aligned parameter buffers and their DiLoCo state."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Flat:
    """One flat parameter buffer (one device and dtype) and its DiLoCo state."""

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
        # shard owned by this rank in hierarchical mode (whole buffer otherwise)
        self.lo, self.hi = 0, self.numel
        self.shard_len = self.numel

    def packed(self, buf: torch.Tensor) -> torch.Tensor:
        """``buf`` (laid out like ``flat``) without the alignment padding: the parameters'
        elements in order, as a new tensor."""
        return torch.cat([buf[o:o + p.numel()] for p, o in zip(self.params, self.offsets)])

    def params_on_state_device(self) -> torch.Tensor:
        if self.state_device == self.device:
            return self.flat
        return self.flat.to(self.state_device)

    def write_params(self, src: torch.Tensor) -> None:
        """params <- src (fp32 on the state device), rounded to nearest once."""
        with torch.no_grad():
            self.flat.copy_(src.to(self.device) if src.device != self.device else src)
