"""DDP under DiLoCo (see the package docstring)."""
from __future__ import annotations

import warnings
from typing import Dict, Optional

import torch
from torch import nn

from .. import backend as _backend


def _unwrap_compiled(m: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` wrappers (OptimizedModule keeps it as ``_orig_mod``)."""
    while isinstance(m, nn.Module) and "_orig_mod" in m._modules and type(m).__name__ == "OptimizedModule":
        m = m._modules["_orig_mod"]
    return m


def _find_ddp(model: nn.Module):
    """``model`` itself, or the DDP module inside ``torch.compile(DDP(...))``; None otherwise."""
    m = _unwrap_compiled(model)
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


def _make_ddp_local(ddp, hook_state: Dict[str, int]) -> None:
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


def _backend_bytes(group) -> Optional[int]:
    """Bytes this rank sent on ``group`` as counted by its "localsgd" backend (None: not one)."""
    if not _backend._localsgd_backends(group):
        return None
    return int(_backend.get_backend_stats(group)["bytes_sent"])
