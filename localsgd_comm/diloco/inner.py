"""The optimizer-facing side shared by DiLoCo and ElasticDiLoCo: argument checks, and an
optimizer whose param groups and state are the inner optimizer's, stepping it as GradScaler
would."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import torch

from .. import _ops


def check_outer_args(inner_optimizer, sync_every, outer_lr, outer_momentum, compression, error_feedback) -> None:
    """The arguments DiLoCo and ElasticDiLoCo share, each with a message naming the problem."""
    if not isinstance(inner_optimizer, torch.optim.Optimizer):
        raise TypeError(f"inner_optimizer: expected a torch.optim.Optimizer, got {type(inner_optimizer).__name__}")
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every: expected an integer >= 1, got {sync_every!r}")
    if not (isinstance(outer_lr, (int, float)) and math.isfinite(outer_lr) and outer_lr > 0):
        raise ValueError(f"outer_lr: expected a finite number > 0, got {outer_lr!r}")
    if not (isinstance(outer_momentum, (int, float)) and 0.0 <= outer_momentum < 1.0):
        raise ValueError(f"outer_momentum: expected a number in [0, 1), got {outer_momentum!r}")
    if compression not in _ops.FORMATS:
        raise ValueError(f"compression: expected one of {_ops.FORMATS}, got {compression!r}")
    if error_feedback and compression == "none":
        raise ValueError("error_feedback: expected a quantizing compression (int8/int4/fp8), got compression='none'"
                         " (fp32 has no quantization error to feed back)")


def resolve_block_size(block_size: Optional[int]) -> int:
    block_size = _ops.DEFAULT_BLOCK_SIZE if block_size is None else block_size
    _ops.check_block_size(block_size)
    return block_size


class InnerWrapper(torch.optim.Optimizer):
    """An optimizer that wraps an inner one: its param groups and state are the inner's, so lr
    schedulers and scripts that write ``param_groups[i]["lr"]`` reach the inner optimizer.
    torch.optim.Optimizer's __init__ would build param groups of its own: subclasses call
    ``_wrap(inner)`` instead, which sets up the bookkeeping lr schedulers and hooks expect."""

    def _wrap(self, inner_optimizer: torch.optim.Optimizer) -> None:
        self.inner_optimizer = inner_optimizer
        self.defaults = inner_optimizer.defaults
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                     "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            setattr(self, name, OrderedDict())

    @property
    def param_groups(self):
        return self.inner_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.inner_optimizer.param_groups = value

    @property
    def state(self):
        return self.inner_optimizer.state

    @state.setter
    def state(self, value):
        self.inner_optimizer.state = value

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        raise RuntimeError(f"{type(self).__name__}.add_param_group: parameters are fixed at construction (they live "
                           "in flat buffers); build the inner optimizer with every parameter group first")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner_optimizer.zero_grad(set_to_none=set_to_none)

    def _inner_step(self, closure):
        """The inner optimizer's step; under ``GradScaler.step`` (which set ``grad_scale`` and
        ``found_inf`` on this object) it unscales and skips exactly as GradScaler would have."""
        inner = self.inner_optimizer
        found_inf = self.__dict__.get("found_inf")
        if found_inf is None:
            return inner.step(closure) if closure is not None else inner.step()
        grad_scale = self.__dict__.get("grad_scale")  # None: the script already called scaler.unscale_(opt)
        if getattr(inner, "_step_supports_amp_scaling", False):  # e.g. fused Adam: it unscales and skips itself
            inner.grad_scale, inner.found_inf = grad_scale, found_inf
            try:
                return inner.step()
            finally:
                del inner.grad_scale, inner.found_inf
        if float(found_inf.sum().item()) != 0.0:
            return None  # inf/NaN in this rank's gradients: no inner update (the step still counts)
        if grad_scale is not None:
            # GradScaler.unscale_'s arithmetic (fp64 reciprocal rounded to fp32, one fused pass).
            inv = grad_scale.double().reciprocal().float()
            by_device: Dict[torch.device, List[torch.Tensor]] = {}
            for g in inner.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        by_device.setdefault(p.grad.device, []).append(p.grad)
            for dev, grads in by_device.items():
                dummy = torch.zeros(1, dtype=torch.float32, device=dev)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, dummy, inv.to(dev))
        return inner.step()


def check_common_args(inner_optimizer, sync_every, outer_lr, outer_momentum, compression, error_feedback,
                      block_size, on_nonfinite, stochastic_rounding) -> int:
    """The argument checks every DiLoCo constructor shares; returns the block size to use."""
    check_outer_args(inner_optimizer, sync_every, outer_lr, outer_momentum, compression, error_feedback)
    block_size = resolve_block_size(block_size)
    if on_nonfinite not in ("skip", "raise"):
        raise ValueError(f"on_nonfinite: expected 'skip' or 'raise', got {on_nonfinite!r}")
    if stochastic_rounding and compression == "none":
        raise ValueError("stochastic_rounding: expected a quantizing compression (int8/int4/fp8), got 'none'")
    return block_size
