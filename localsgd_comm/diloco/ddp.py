"""DDP under DiLoCo (see "DDP under DiLoCo" in the package docstring): gradients local for good
(the class swap and the local communication hook) and the tripwire that reports traffic
DiLoCo did not send."""
from __future__ import annotations

import warnings
from typing import Dict

import torch
from torch import nn

from .. import backend as _backend


def unwrap_compiled(m: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` wrappers (OptimizedModule keeps it as ``_orig_mod``)."""
    while isinstance(m, nn.Module) and "_orig_mod" in m._modules and type(m).__name__ == "OptimizedModule":
        m = m._modules["_orig_mod"]
    return m


def find_ddp(model: nn.Module):
    """``model`` itself, or the DDP module inside ``torch.compile(DDP(...))``; None otherwise."""
    m = unwrap_compiled(model)
    return m if isinstance(m, nn.parallel.DistributedDataParallel) else None


def _local_gradient_hook(state: Dict[str, int], bucket):
    """DDP communication hook of DiLoCo: the bucket's gradient stays local (nothing is sent).

    DDP hands custom hooks the local gradient sum undivided, so returning the bucket unchanged
    leaves every parameter's own gradient in place."""
    state["calls"] += 1
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _refuse_comm_hook(self, *args, **kwargs):
    raise RuntimeError(
        "register_comm_hook: this DistributedDataParallel model is wrapped by localsgd_comm.DiLoCo, which keeps "
        "gradients local between syncs (DDP sends nothing), so a communication hook would never run; "
        "compression of the outer step is DiLoCo's compression= argument")


_LOCAL_DDP_CLASSES: Dict[type, type] = {}


def _local_ddp_class(cls: type) -> type:
    """A subclass of ``cls`` (a DDP class) whose ``require_backward_grad_sync`` always reads False.

    Scripts set the flag on every micro-step for gradient accumulation; as a class property it
    cannot be overridden by them. What they write is kept in ``_localsgd_requested_sync``."""
    if getattr(cls, "_localsgd_local_grads", False):
        return cls
    if cls not in _LOCAL_DDP_CLASSES:
        def _get(self):
            return False

        def _set(self, value):
            self.__dict__["_localsgd_requested_sync"] = bool(value)

        ns = {
            "require_backward_grad_sync": property(
                _get, _set, doc="Always False under localsgd_comm.DiLoCo: gradients stay local between syncs."),
            "register_comm_hook": _refuse_comm_hook,
            "_register_builtin_comm_hook": _refuse_comm_hook,
            "_localsgd_local_grads": True,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        }
        _LOCAL_DDP_CLASSES[cls] = type(cls.__name__, (cls,), ns)
    return _LOCAL_DDP_CLASSES[cls]


def make_ddp_local(ddp, hook_state: Dict[str, int]) -> None:
    """Make a DDP module's gradients local for good (see "DDP under DiLoCo")."""
    if getattr(type(ddp), "_localsgd_local_grads", False):
        raise ValueError("model: this DistributedDataParallel model is already wrapped by another DiLoCo")
    user_hooks = [getattr(h, "__qualname__", repr(h)) for h, _ in getattr(ddp, "_comm_hooks", [])]
    if user_hooks:
        warnings.warn(
            f"DiLoCo: the DDP communication hook(s) {user_hooks} registered on this model will not run: DiLoCo keeps "
            "gradients local between syncs (its outer step is compressed by compression=)", UserWarning, stacklevel=3)
    else:
        type(ddp).register_comm_hook(ddp, hook_state, _local_gradient_hook)
    ddp.__dict__.pop("require_backward_grad_sync", None)
    ddp.__class__ = _local_ddp_class(type(ddp))
    ddp.require_forward_param_sync = False  # no per-forward buffer broadcast
    if getattr(ddp, "static_graph", False):
        # static_graph's first backward queues an all-reduce of every gradient (DDPSink), flag or not
        ddp._static_graph_delay_allreduce_enqueued = True


class Tripwire:
    """Traffic on the watched groups between two syncs that the sync itself did not send, and
    the local hook's call count: reported once (``RuntimeWarning``), counted always."""

    def __init__(self, groups, hook_state: Dict[str, int], fp32_ring_bytes: int, sync_every: int,
                 own_bytes: int = 0):
        self._watched = [g for g in groups if _backend.bytes_sent_on(g) is not None]
        self._hook_state = hook_state
        self._fp32_ring_bytes = fp32_ring_bytes  # one fp32 all-reduce of the synced parameters
        self._sync_every = sync_every
        self._own_bytes_mark = own_bytes
        self._traffic_mark = self._watched_bytes()
        self._fired = False

    @property
    def watching(self) -> bool:
        """Whether any group keeps byte counters (only "localsgd" groups do)."""
        return bool(self._watched)

    def _watched_bytes(self) -> int:
        return sum(_backend.bytes_sent_on(g) or 0 for g in self._watched)

    def check(self, stats: Dict[str, int], next_sync: int) -> None:
        """At the start of sync ``next_sync``: the traffic since the previous one, against
        ``stats["bytes_sent"]`` (the syncs' own); updates ``ddp_hook_calls``/``foreign_bytes``."""
        calls = self._hook_state["calls"]
        if calls:
            stats["ddp_hook_calls"] += calls
            self._hook_state["calls"] = 0
        foreign = 0
        if self._watched:
            # The interval runs from the start of the previous sync: its own traffic is in both counts.
            now = self._watched_bytes()
            foreign = max((now - self._traffic_mark) - (stats["bytes_sent"] - self._own_bytes_mark), 0)
            self._traffic_mark, self._own_bytes_mark = now, stats["bytes_sent"]
            stats["foreign_bytes"] += foreign
        if self._fired:
            return
        # stacklevel 3: the warning names the caller of DiLoCo.sync() (step(), or the script)
        if foreign >= max(self._fp32_ring_bytes // 4, 1 << 16):
            self._fired = True
            warnings.warn(
                f"DiLoCo: {foreign:,} bytes crossed the process group in the {self._sync_every} inner steps before "
                f"sync {next_sync}, besides DiLoCo's own syncs (one fp32 all-reduce of the model is "
                f"{self._fp32_ring_bytes:,} bytes). Gradients are still being communicated: a DDP wrapper DiLoCo was "
                "not given (pass the DDP-wrapped model itself, not model.module), or the script's own collectives. "
                "Reported once; DiLoCo.stats['foreign_bytes'] keeps counting.", RuntimeWarning, stacklevel=3)
        elif calls:
            self._fired = True
            warnings.warn(
                f"DiLoCo: DDP's reducer ran {calls} time(s) in the inner steps before sync {next_sync} "
                "although its gradient sync is switched off; DiLoCo's local communication hook kept the gradients "
                "local (nothing was sent), at the cost of two gradient copies per call. Reported once.",
                RuntimeWarning, stacklevel=3)
