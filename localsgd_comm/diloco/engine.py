"""The outer-step engine: pseudo-gradient with error feedback, the all-reduce, the outer
Nesterov step. Written once; every mode drives it.

For a list of :class:`~.buffers.Segment` (ranges of parameter buffers with their anchor,
momentum and residual) and a :class:`~.collectives.Reducer` (a group):

1. :meth:`OuterEngine.start` computes each segment's pseudo-gradient ``anchor - params`` (plus
   the residual with error feedback), compresses it in the same fused pass and starts its
   all-reduce (compressed AVG, or the exact fp32 SUM), returning a :class:`Reduction`;
2. :meth:`Reduction.wait` waits for it (at once, or later: the reduce runs in the background);
3. :meth:`OuterEngine.apply` applies the outer step ``torch.optim.SGD(outer_lr, momentum,
   nesterov)`` to the anchor, reading the gradient straight from the reduced bytes, and writes
   ``params = anchor`` (or leaves the parameters to the caller, ``write_params=False``).

A Reduction is independent of every other: a plain sync starts, waits and applies one; the
delayed outer step (``DiLoCo(overlap=True)``) keeps one in flight across a round and applies
it at the next sync; a streaming mode keeps one per fragment in flight (a fragment is a list
of segments; ``apply(write_params=False)`` leaves the merge into the live parameters to it).
A Reduction in flight is saved (:meth:`Reduction.state`) and restored
(:meth:`Reduction.from_state`) with checkpoints. Which segments is the mode's choice: whole
buffers (plain), a rank's shards of them (hierarchical), fragments (streaming), the local
shards of a sharded model, reduced over its replicate group (a segment type whose parameters
are those shards). What to do when a reduce is not finite (skip, raise, redo the round) is the
caller's policy; the engine gives the mechanisms (:meth:`OuterEngine.is_finite`,
:meth:`OuterEngine.restore_residuals`).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import functional as F
from .. import _ops
from .buffers import Segment
from .collectives import Reducer, exact_sum


def derive_seed(seed: int, sync_index: int, rank: int) -> int:
    """A 62-bit stochastic-rounding seed from (seed, sync index, rank): reproducible on resume,
    different per rank (independent rounding noise averages out) and per sync."""
    h = hashlib.blake2b(f"{seed}:{sync_index}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2


@dataclasses.dataclass(frozen=True)
class OuterConfig:
    """The outer step's settings. ``averaging``: reduce the parameters themselves instead of
    ``anchor - params`` (only for ``compression="none", outer_lr=1, outer_momentum=0``, where
    ``avg(x)`` is exact and ``anchor - avg(anchor - x)`` would round twice)."""

    compression: str
    block_size: int
    outer_lr: float
    outer_momentum: float
    nesterov: bool
    averaging: bool = False


def wire_bytes(compression: str, numel: int, block_size: int, p: int) -> int:
    """Bytes one rank sends in the all-reduce of ``numel`` elements over ``p`` ranks: the
    ring-optimal volume 2 (p-1)/p x encoded size (docs/design.md: the quantized all-reduce)."""
    if p <= 1:
        return 0
    return int(2 * (p - 1) * F.compressed_nbytes(compression, numel, block_size) / p)


class Reduction:
    """The reduce of one sync over some segments: in flight until :meth:`wait`, then applied once.

    ``items[i]`` is segment i's result: None (empty segment), ``("q", payload, scales)`` (the
    compressed AVG, reduced in place), ``("none", delta)`` (fp32 SUM of the pseudo-gradients) or
    ``("avg", params)`` (fp32 SUM of the parameters, model averaging). ``residual_backup[i]``
    holds segment i's residual from before the compression when it was kept. ``size`` is the
    number of ranks summed over (the divisor of the fp32 kinds)."""

    def __init__(self, segments: Sequence[Segment], size: int, keep_backup: bool):
        self.segments = list(segments)
        self.size = size
        self.items: list = []
        self.works: list = []
        self.residual_backup = [s.residual.clone() if keep_backup and s.residual is not None and s.numel else None
                                for s in self.segments]
        self.bytes_sent = 0

    def wait(self) -> None:
        for w in self.works:
            if w is not None:
                w.wait()
        self.works = []

    def tensors(self) -> List[torch.Tensor]:
        """The reduced tensors, in order (what a replica's other ranks receive)."""
        return [t for it in self.items if it is not None for t in it[1:]]

    def state(self) -> Dict[str, list]:
        """A copy of the (awaited) result and the residual backups, for a checkpoint."""
        self.wait()
        return {"items": [None if it is None else (it[0],) + tuple(t.clone() for t in it[1:]) for it in self.items],
                "residual_backup": [None if b is None else b.clone() for b in self.residual_backup]}

    @classmethod
    def from_state(cls, state: Dict[str, list], segments: Sequence[Segment], size: int) -> "Reduction":
        red = cls(segments, size, keep_backup=False)
        red.items = [None if it is None else (it[0],) + tuple(t.to(s.state_device).clone() for t in it[1:])
                     for it, s in zip(state["items"], red.segments)]
        red.residual_backup = [None if b is None else b.clone() for b in state["residual_backup"]]
        return red


class OuterEngine:
    """Starts, and applies, the outer step's reduces (see the module docstring)."""

    def __init__(self, config: OuterConfig):
        self.config = config

    def start(self, segments: Sequence[Segment], reducer: Reducer, *, async_op: bool = False,
              keep_backup: bool = False, seed: Optional[int] = None, wire_seed: Optional[int] = None,
              probe: Optional[Callable[[str], None]] = None) -> Reduction:
        """Compress every segment's pseudo-gradient and start its all-reduce over ``reducer``.

        ``async_op``: return at once, the reduce in flight (else it is done on return).
        ``keep_backup``: keep each residual as it was before, for :meth:`restore_residuals`.
        Without it a residual that took a non-finite value has those entries zeroed, or every
        later sync would be poisoned. ``seed``/``wire_seed``: stochastic rounding of the local
        compression / of the all-reduce's requantization. ``probe(phase)`` is called after each
        compression (``"compress"``) and once each exchange started (``"allreduce"``).
        If starting fails, the residuals kept are restored before the error propagates.
        """
        red = Reduction(segments, reducer.size, keep_backup)
        try:
            for seg, backup in zip(red.segments, red.residual_backup):
                item, work = self._start_one(seg, reducer, backup is not None, async_op, seed, wire_seed, probe)
                red.items.append(item)
                red.works.append(work)
                if item is not None:
                    red.bytes_sent += wire_bytes(self.config.compression, seg.numel, self.config.block_size,
                                                 reducer.size)
        except BaseException:
            self.restore_residuals(red)
            raise
        return red

    def _start_one(self, seg: Segment, reducer: Reducer, kept: bool, async_op, seed, wire_seed, probe):
        """-> (the segment's item, its work in flight or None)."""
        c = self.config
        if seg.numel == 0:
            return None, None
        params = seg.params_on_state_device()
        if c.compression == "none" and c.averaging:
            # Plain model averaging: reduce the parameters themselves. anchor - avg(anchor - x)
            # would round twice (cancellation); avg(x) is exact for one worker, so local SGD
            # with one worker equals plain training bit for bit.
            item = ("avg", params.to(torch.float32, copy=True))
        elif c.compression == "none":
            item = ("none", seg.anchor - params.float())
            if probe is not None:
                probe("compress")
        else:
            res = seg.residual
            payload, scales = F.compress_delta(seg.anchor, params, res, c.compression, c.block_size, seed=seed)
            if probe is not None:
                probe("compress")
            if res is not None and not kept:
                # No backup to restore (the delayed step decides one sync later, after the residual
                # moved on): drop the non-finite entries, or a NaN residual poisons every later sync.
                # Unconditional (a no-op where every block was finite: a finite block leaves a finite
                # residual) so that no host sync waits here for the scales on a GPU.
                res.masked_fill_(~torch.isfinite(res), 0.0)
            work = reducer.all_reduce_compressed(payload, scales, seg.numel, c.compression, c.block_size, wire_seed)
            if probe is not None:
                probe("allreduce")
            if not async_op:
                work.wait()
                work = None
            return ("q", payload, scales), work
        return item, exact_sum(reducer, item[1], async_op=async_op, probe=probe)

    def received(self, segments: Sequence[Segment], size: int) -> Reduction:
        """An empty Reduction shaped like :meth:`start`'s, to receive a result into
        (:meth:`Reduction.tensors`) from a rank that computed it."""
        red = Reduction(segments, size, keep_backup=False)
        c = self.config
        for seg in red.segments:
            n, dev = seg.numel, seg.state_device
            if n == 0:
                red.items.append(None)
            elif c.compression == "none":
                red.items.append(("avg" if c.averaging else "none", torch.empty(n, dtype=torch.float32, device=dev)))
            else:
                red.items.append(("q", torch.empty(_ops.payload_bytes(c.compression, n), dtype=torch.uint8, device=dev),
                                  torch.empty(_ops.num_blocks(n, c.block_size), dtype=torch.float32, device=dev)))
        return red

    @staticmethod
    def is_finite(red: Reduction) -> bool:
        """Whether the (awaited) result holds only finite values: the same answer on every rank
        of the group, which all hold the same bytes."""
        flags = [torch.isfinite(it[1] if it[0] in ("none", "avg") else it[2]).all()
                 for it in red.items if it is not None]
        if not flags:
            return True
        # one host sync for all segments (on a GPU each bool() would wait for the device)
        if len({f.device for f in flags}) > 1:
            return all(bool(f) for f in flags)
        return bool(torch.stack(flags).all()) if len(flags) > 1 else bool(flags[0])

    def apply(self, red: Reduction, *, write_params: bool = True) -> None:
        """The outer step of every segment from the (awaited) result; ``params <- anchor`` unless
        ``write_params=False``. Reads the result without changing it."""
        c = self.config
        for seg, it in zip(red.segments, red.items):
            if it is None:
                continue
            params = seg.params_in_place() if write_params else None
            if it[0] == "avg":
                g = it[1] / red.size  # SUM -> AVG: one IEEE division, identical on every rank
                seg.anchor.copy_(g)
                if params is not None:
                    params.copy_(g)
            elif it[0] == "none":
                g = it[1] / red.size
                F.outer_nesterov_step(seg.anchor, seg.momentum, params, g, c.outer_lr, c.outer_momentum, c.nesterov)
            else:
                F.outer_nesterov_step_compressed(seg.anchor, seg.momentum, params, it[1], it[2], c.compression,
                                                 c.block_size, 1.0, c.outer_lr, c.outer_momentum, c.nesterov)
            if write_params and params is None:
                seg.write_params(seg.anchor)

    @staticmethod
    def restore_residuals(red: Reduction) -> None:
        """Residuals back to what they were before :meth:`start` (where a backup was kept)."""
        for seg, backup in zip(red.segments, red.residual_backup):
            if backup is not None:
                seg.residual.copy_(backup)
