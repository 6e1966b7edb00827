"""The collectives of the outer step, over a torch process group or over a bare "localsgd"
backend, and the exact fp32 sum composed from them (written once, for every mode).

A :class:`Reducer` is what the engine sees of a group: its size, the compressed all-reduce
(AVG, of bytes the caller already compressed), and the pieces of the exact fp32 sum.
:class:`GroupReducer` wraps a ``torch.distributed`` process group (DiLoCo's ``group``, the
``hierarchy.cross`` group, later the ``"replicate"`` dimension of a device mesh);
:class:`BackendReducer` wraps a backend object made outside torch's group registry (elastic
DiLoCo's group of one round attempt). Every call starts asynchronously and returns a Work.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from .. import backend as _backend

# torch 2.13 deprecates all_gather_into_tensor in favour of all_gather_single (same semantics)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def carries(group, device: torch.device) -> bool:
    """Whether ``group`` has a backend for tensors on ``device`` (an NCCL group has none for CPU
    tensors: outer state kept on the CPU must then travel through the parameters' device)."""
    pg = group if group is not None else dist.group.WORLD
    try:
        pg._get_backend(torch.device(device.type))
        return True
    except (RuntimeError, ValueError):
        return False


def staged_broadcast(t: torch.Tensor, src: int, group, stage: Optional[torch.device]) -> None:
    """``dist.broadcast`` of ``t``, through a copy on ``stage`` when ``group`` cannot carry
    ``t``'s device (CPU state over an NCCL group)."""
    if stage is None or carries(group, t.device):
        dist.broadcast(t, src=src, group=group)
        return
    tmp = t.to(stage)
    dist.broadcast(tmp, src=src, group=group)
    t.copy_(tmp)


class Reducer:
    """The collectives the engine uses, on one group of ``size`` ranks."""

    size: int

    def composes_sum(self, device: torch.device) -> bool:
        """True when an fp32 SUM must be composed (:func:`exact_sum`): a "localsgd" group would
        quantize a plain all_reduce of a large float tensor."""
        raise NotImplementedError

    def all_reduce_compressed(self, payload, scales, numel: int, fmt: str, block_size: int, seed: Optional[int]):
        raise NotImplementedError

    def all_reduce_sum(self, buf: torch.Tensor):
        raise NotImplementedError

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor):
        raise NotImplementedError

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        """Blocking all-gather of equal chunks into ``out``."""
        raise NotImplementedError


class GroupReducer(Reducer):
    """A ``torch.distributed`` process group (any backend). ``stage_device``: where tensors the
    group cannot carry travel (the parameters' device, for outer state kept on the CPU with an
    NCCL group); each call copies them there and back when it completes."""

    def __init__(self, group, stage_device: Optional[torch.device] = None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.stage_device = stage_device

    def _stage(self, *tensors: torch.Tensor):
        """-> the tensors to send (copies on the stage device where needed) and a function that
        copies the results back."""
        if self.stage_device is None or carries(self.group, tensors[0].device):
            return tensors, (lambda: None)
        moved = tuple(t.to(self.stage_device) for t in tensors)

        def back():
            for t, m in zip(tensors, moved):
                t.copy_(m)
        return moved, back

    def _after(self, work, back):
        if work is None:
            back()
            return None

        def finish():
            work.wait()
            back()
        return Deferred(finish)

    def composes_sum(self, device):
        return _backend.localsgd_backend_of(self.group, self._device(device)) is not None

    def _device(self, device):
        return device if self.stage_device is None or carries(self.group, device) else self.stage_device

    def all_reduce_compressed(self, payload, scales, numel, fmt, block_size, seed):
        (payload_, scales_), back = self._stage(payload, scales)
        work = _backend.all_reduce_compressed(payload_, scales_, numel, fmt, block_size, group=self.group,
                                              op=dist.ReduceOp.AVG, async_op=True, seed=seed)
        return self._after(work, back)

    def all_reduce_sum(self, buf):
        (buf_,), back = self._stage(buf)
        return self._after(dist.all_reduce(buf_, op=dist.ReduceOp.SUM, group=self.group, async_op=True), back)

    def all_to_all(self, out, inp):
        (out_, inp_), back = self._stage(out, inp)
        return self._after(dist.all_to_all_single(out_, inp_, group=self.group, async_op=True), back)

    def all_gather(self, out, inp):
        (out_, inp_), back = self._stage(out, inp)
        _all_gather(out_, inp_, group=self.group)
        back()


class BackendReducer(Reducer):
    """A bare "localsgd" backend object of ``size`` ranks (not in torch's group registry)."""

    def __init__(self, backend, size: int):
        self.backend, self.size = backend, size

    def composes_sum(self, device):
        return True

    def all_reduce_compressed(self, payload, scales, numel, fmt, block_size, seed):
        return self.backend.allreduce_compressed(payload, scales, numel, _backend.format_code(fmt), block_size,
                                                 True, -1 if seed is None else int(seed))

    def all_to_all(self, out, inp):
        return self.backend.alltoall_base(out, inp, [], [], dist.AllToAllOptions())

    def all_gather(self, out, inp):
        self.backend._allgather_base(out, inp, torch._C._distributed_c10d.AllgatherOptions()).wait()


class Deferred:
    """A Work-like handle whose wait() runs the rest of a composed collective."""

    def __init__(self, fn):
        self._fn = fn

    def wait(self):
        if self._fn is not None:
            fn, self._fn = self._fn, None
            fn()
        return True


def exact_sum(reducer: Reducer, buf: torch.Tensor, *, async_op: bool,
              probe: Optional[Callable[[str], None]] = None):
    """Exact fp32 SUM all-reduce of ``buf`` in place, identical bytes on every rank. Returns a
    Work-like handle when ``async_op``, else None (done).

    On a "localsgd" group ``dist.all_reduce`` of a large float tensor is *quantized* (that is the
    backend's job), so the sum is composed from collectives the backend passes through untouched:
    an all-to-all of the p chunks (the reduce-scatter half: each rank receives every rank's copy
    of its own chunk, (p-1)/p of the tensor each way), a sum in rank order on the chunk's owner,
    and an all-gather of the summed chunks. That is the ring volume 2 (p-1)/p x 4 bytes per
    element (gloo's reduce_scatter would all-reduce the whole tensor: 1.5x that at p = 2), and
    every rank receives the owner's bytes, so replicas stay bitwise identical. Other groups use
    all_reduce. With ``async_op`` the all-gather half runs when the handle is waited for.
    ``probe("allreduce")`` is called once the exchange started (fault injection).
    """
    if not reducer.composes_sum(buf.device):
        work = reducer.all_reduce_sum(buf)
        if probe is not None:
            probe("allreduce")
        if async_op:
            return work
        work.wait()
        return None
    p = reducer.size
    n = buf.numel()
    chunk = -(-n // p)
    padded = torch.zeros(chunk * p, dtype=buf.dtype, device=buf.device)
    padded[:n].copy_(buf)
    received = torch.empty_like(padded)
    work = reducer.all_to_all(received, padded)
    if probe is not None:
        probe("allreduce")

    def finish():
        work.wait()
        parts = received.view(p, chunk)
        mine = parts[0].clone()
        for r in range(1, p):  # fixed order: the same bytes in every run
            mine.add_(parts[r])
        reducer.all_gather(padded, mine)
        buf.copy_(padded[:n])

    if async_op:
        return Deferred(finish)
    finish()
    return None
