"""``DiLoCo``: see the package docstring."""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import _ops
from .. import backend as _backend
from .. import functional as F
from .buffers import _FLOAT_DTYPES, _Flat
from .ddp import _backend_bytes, _find_ddp, _make_ddp_local, _unwrap_compiled
from .engine import _all_gather, _Deferred, _derive_seed, _Pending
from .hierarchical import HierarchicalGroups
from .inner import _check_outer_args, _InnerWrapper


class DiLoCo(_InnerWrapper):
    """DiLoCo (or plain local SGD) around an inner optimizer; see the module docstring.

    Args:
        model: an ``nn.Module`` or a ``DistributedDataParallel`` wrapping one.
        inner_optimizer: an optimizer over (a subset of) the model's parameters.
        sync_every: inner steps between syncs (H), >= 1.
        outer_lr, outer_momentum, nesterov: the outer SGD (``outer_lr=1, outer_momentum=0``
            is plain model averaging, i.e. local SGD).
        compression: ``"none"`` (fp32), ``"int8"``, ``"int4"`` or ``"fp8"``.
        block_size: quantization block size (default ``localsgd_comm.DEFAULT_BLOCK_SIZE``).
        error_feedback: keep the quantization error in a residual added to the next delta.
        stochastic_rounding: seeded stochastic rounding of the local delta, seeds derived
            from ``(seed, sync index, rank)``.
        seed: base seed of stochastic rounding.
        group: the process group of the sync (default: the default group).
        hierarchy: a :class:`HierarchicalGroups` for hierarchical mode (``group`` is ignored).
        overlap: delayed outer step with the all-reduce in the background (see module doc).
        state_device: device of anchor/momentum/residual (default: the parameters' device).
        on_nonfinite: ``"skip"`` or ``"raise"``.
        broadcast_init: broadcast parameters and buffers from rank 0 at construction.
    """

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer, *, sync_every: int,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, nesterov: bool = True,
                 compression: str = "int8", block_size: Optional[int] = None, error_feedback: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0, group=None,
                 hierarchy: Optional[HierarchicalGroups] = None, overlap: bool = False,
                 state_device=None, on_nonfinite: str = "skip", broadcast_init: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module (or DDP-wrapped one), got {type(model).__name__}")
        _check_outer_args(inner_optimizer, sync_every, outer_lr, outer_momentum, compression, error_feedback)
        if block_size is None:
            block_size = _ops.DEFAULT_BLOCK_SIZE
        _ops.check_block_size(block_size)
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite: expected 'skip' or 'raise', got {on_nonfinite!r}")
        if stochastic_rounding and compression == "none":
            raise ValueError("stochastic_rounding: expected a quantizing compression (int8/int4/fp8), got 'none'")
        if hierarchy is not None and overlap:
            raise ValueError("overlap=True with hierarchy: expected one of the two, got both (not supported together)")
        if hierarchy is not None and not isinstance(hierarchy, HierarchicalGroups):
            raise TypeError(f"hierarchy: expected HierarchicalGroups (new_hierarchical_groups), got {type(hierarchy).__name__}")
        if not dist.is_initialized():
            raise RuntimeError("DiLoCo: expected an initialized process group (dist.init_process_group), got none")

        self.model = model
        self._wrap(inner_optimizer)
        self.sync_every = sync_every
        self.outer_lr = float(outer_lr)
        self.outer_momentum = float(outer_momentum)
        self.nesterov = bool(nesterov)
        self.compression = compression
        self.block_size = block_size
        self.error_feedback = bool(error_feedback)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.seed = int(seed)
        self.hierarchy = hierarchy
        self.group = hierarchy.cross if hierarchy is not None else (group if group is not None else dist.group.WORLD)
        self.overlap = bool(overlap)
        self.on_nonfinite = on_nonfinite
        self.rank = dist.get_rank()
        self.sync_size = dist.get_world_size(self.group)
        # outer_lr=1, outer_momentum=0 is model averaging; in fp32 it is computed as such (exact).
        # Not in overlap mode: there the delayed step is theta <- theta - g_{k-1}, and theta has
        # moved since g_{k-1}'s round started, so avg(params of round k-1) is not that step.
        self._averaging = (self.outer_lr == 1.0 and self.outer_momentum == 0.0 and compression == "none"
                           and not self.overlap)

        ddp = _find_ddp(model)
        self._ddp = ddp is not None
        module = ddp.module if ddp is not None else _unwrap_compiled(model)
        self._ddp_module = ddp if hierarchy is None else None
        self._hook_state = {"calls": 0}
        if ddp is not None:
            if hierarchy is None:
                _make_ddp_local(ddp, self._hook_state)  # see "DDP under DiLoCo"
            elif dist.get_world_size(ddp.process_group) != hierarchy.cluster_size:
                raise ValueError("hierarchical mode with DDP: expected DDP over hierarchy.intra (size "
                                 f"{hierarchy.cluster_size}), got a DDP group of size "
                                 f"{dist.get_world_size(ddp.process_group)}")

        # ---- parameters: deduplicated (tied weights), trainable ones synced ----
        seen, all_params = set(), []
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                all_params.append(p)
        model_ids = {id(p) for p in all_params}
        for gi, g in enumerate(inner_optimizer.param_groups):
            for p in g["params"]:
                if id(p) not in model_ids:
                    raise ValueError(
                        f"inner_optimizer: expected an optimizer over the model's parameters, got param group {gi} "
                        f"holding a tensor of shape {tuple(p.shape)} that is not a parameter of the model")
        trainable = [p for p in all_params if p.requires_grad]
        if not trainable:
            raise ValueError("model: expected at least one parameter with requires_grad=True, got none")
        for p in trainable:
            if p.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"parameters: expected float32/bfloat16/float16, got {p.dtype}")
            if p.is_sparse:
                raise TypeError("parameters: expected dense parameters, got a sparse one")

        # ---- identical start: broadcast from rank 0 of the sync group (world in hierarchical mode) ----
        bgroup = None if hierarchy is not None else self.group
        if broadcast_init:
            src = dist.get_global_rank(bgroup, 0) if bgroup not in (None, dist.group.WORLD) else 0
            with torch.no_grad():
                for t in list(all_params) + list(module.buffers()):
                    dist.broadcast(t.data, src=src, group=bgroup)

        keys: Dict[tuple, List[nn.Parameter]] = {}
        for p in trainable:
            keys.setdefault((p.device, p.dtype), []).append(p)
        mom = self.outer_momentum != 0.0
        align = self.block_size if self.compression != "none" else 1
        self._flats = [_Flat(ps, state_device, mom, self.error_feedback, align) for ps in keys.values()]
        names = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), name)
        self._param_names = [[names.get(id(p), f"<parameter {i}>") for i, p in enumerate(f.params)]
                             for f in self._flats]
        if hierarchy is not None:
            self._setup_shards()

        self._local_step = 0   # inner steps taken
        self._sync_index = 0   # syncs started
        self._pending: Optional[_Pending] = None
        self.stats = {"syncs": 0, "skipped_syncs": 0, "bytes_sent": 0, "intra_bytes_sent": 0, "foreign_bytes": 0,
                      "ddp_hook_calls": 0}
        # Tripwire (see "DDP under DiLoCo"): traffic on the watched groups between syncs.
        groups = [self.group]
        if ddp is not None and hierarchy is None and ddp.process_group is not self.group:
            groups.append(ddp.process_group)
        self._watched = [g for g in groups if _backend_bytes(g) is not None]
        self._own_bytes_mark = 0
        self._traffic_mark = self._watched_bytes()
        self._tripwire_fired = False
        # fp32 bytes of one all-reduce of the synced parameters: the scale of "gradient traffic"
        self._fp32_ring_bytes = sum(_backend.ddp_bytes_per_rank(f.numel, 1, self.sync_size) for f in self._flats)

    # ------------------------------------------------------------------ public API
    #: GradScaler.step(opt) calls step() with ``grad_scale``/``found_inf`` set instead of skipping
    #: it on an inf, so the step count (hence the sync schedule) stays the same on every rank.
    _step_supports_amp_scaling = True

    def step(self, closure=None):
        """One inner step; a sync every ``sync_every`` calls. Returns the closure's loss."""
        self._check_params("step()")
        if self.hierarchy is not None and not self._ddp:
            if closure is not None:
                # The closure computes the gradients inside inner_optimizer.step(): average them
                # after it ran (averaging before would see the previous step's gradients).
                inner_closure = closure

                def closure():
                    loss = inner_closure()
                    self._allreduce_grads_intra()
                    return loss
            else:
                self._allreduce_grads_intra()
        loss = self._inner_step(closure)
        self._local_step += 1
        if self._local_step % self.sync_every == 0:
            self.sync()
        return loss

    def sync(self) -> None:
        """Run one outer sync now (``step`` calls this every ``sync_every`` steps)."""
        self._check_params("sync()")
        if self._watched and self._pending is not None:
            # Overlap mode: the previous sync's reduce must be counted before the tripwire reads the
            # counters. Free on a "localsgd" group: its worker runs collectives in order, so the new
            # reduce could not start before this one ends anyway.
            self._pending.wait()
        self._check_traffic()
        self._sync_index += 1
        if self.hierarchy is not None:
            self._sync_hierarchical()
            return
        launched = self._launch(async_op=self.overlap)
        if not self.overlap:
            launched.wait()
            self._apply(launched)
            return
        prev, self._pending = self._pending, launched
        if prev is not None:
            prev.wait()
            self._apply(prev)  # also writes params = anchor
        else:
            self._reset_params()

    def flush(self) -> None:
        """Overlap mode: wait for the pending reduce and apply it now (params <- new anchor)."""
        if self._pending is not None:
            prev, self._pending = self._pending, None
            prev.wait()
            self._apply(prev)

    @property
    def local_step(self) -> int:
        return self._local_step

    @property
    def sync_count(self) -> int:
        return self._sync_index

    def anchors(self) -> List[torch.Tensor]:
        """The fp32 anchors, one flat tensor per device/dtype buffer, holding the parameters'
        elements in order (a copy, without the block-alignment padding of the internal buffer)."""
        return [f.packed(f.anchor) for f in self._flats]

    # ------------------------------------------------------------------ internals
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

    def _check_params(self, where: str) -> None:
        """Every trainable parameter must still be a view of its flat buffer."""
        for f, names in zip(self._flats, self._param_names):
            for p, ptr, name in zip(f.params, f.ptrs, names):
                if p.data_ptr() != ptr or p.dtype != f.dtype or p.device != f.device:
                    raise RuntimeError(
                        f"DiLoCo.{where}: parameter {name!r} no longer lives in DiLoCo's buffer (it is now "
                        f"{p.dtype} on {p.device}, DiLoCo holds it as {f.dtype} on {f.device}): the model was moved, "
                        "cast or had its parameters replaced (model.to(...), .half(), load_state_dict(assign=True)) "
                        "after DiLoCo was constructed, so syncs would no longer change it. Move or cast the model "
                        "before constructing DiLoCo.")

    def _watched_bytes(self) -> int:
        return sum(_backend_bytes(g) or 0 for g in self._watched)

    def _check_traffic(self) -> None:
        """The tripwire: traffic between the previous sync and this one that DiLoCo did not send."""
        calls = self._hook_state["calls"]
        if calls:
            self.stats["ddp_hook_calls"] += calls
            self._hook_state["calls"] = 0
        foreign = 0
        if self._watched:
            # The interval runs from the start of the previous sync: its own traffic is in both counts.
            now = self._watched_bytes()
            foreign = max((now - self._traffic_mark) - (self.stats["bytes_sent"] - self._own_bytes_mark), 0)
            self._traffic_mark, self._own_bytes_mark = now, self.stats["bytes_sent"]
            self.stats["foreign_bytes"] += foreign
        if self._tripwire_fired:
            return
        if foreign >= max(self._fp32_ring_bytes // 4, 1 << 16):
            self._tripwire_fired = True
            warnings.warn(
                f"DiLoCo: {foreign:,} bytes crossed the process group in the {self.sync_every} inner steps before sync "
                f"{self._sync_index + 1}, besides DiLoCo's own syncs (one fp32 all-reduce of the model is "
                f"{self._fp32_ring_bytes:,} bytes). Gradients are still being communicated: a DDP wrapper DiLoCo was "
                "not given (pass the DDP-wrapped model itself, not model.module), or the script's own collectives. "
                "Reported once; DiLoCo.stats['foreign_bytes'] keeps counting.", RuntimeWarning, stacklevel=3)
        elif calls:
            self._tripwire_fired = True
            warnings.warn(
                f"DiLoCo: DDP's reducer ran {calls} time(s) in the inner steps before sync {self._sync_index + 1} "
                "although its gradient sync is switched off; DiLoCo's local communication hook kept the gradients "
                "local (nothing was sent), at the cost of two gradient copies per call. Reported once.",
                RuntimeWarning, stacklevel=3)

    def _seed(self) -> Optional[int]:
        if not self.stochastic_rounding:
            return None
        return _derive_seed(self.seed, self._sync_index, self.rank)

    def _wire_bytes(self, numel: int, p: int) -> int:
        # ring-optimal volume sent per rank: 2 (p-1)/p x encoded size (docs/design.md: the quantized all-reduce)
        if p <= 1:
            return 0
        return int(2 * (p - 1) * F.compressed_nbytes(self.compression, numel, self.block_size) / p)

    def _launch(self, async_op: bool) -> _Pending:
        """Compute and compress the deltas of the (owned shards of the) flat buffers and start
        their all-reduce over ``self.group``."""
        pend = _Pending()
        seed = self._seed()
        p = self.sync_size
        for f in self._flats:
            lo, hi = f.lo, f.hi
            n = hi - lo
            if n == 0:
                pend.items.append(None)
                pend.residual_backup.append(None)
                continue
            params = f.params_on_state_device()[lo:hi]
            anchor = f.anchor[lo:hi]
            if self.compression == "none" and self._averaging:
                # Plain model averaging: reduce the parameters themselves. anchor - avg(anchor - x)
                # would round twice (cancellation); avg(x) is exact for one worker, so local SGD
                # with one worker equals plain training bit for bit.
                buf = params.to(torch.float32, copy=True)
                w = self._fp32_sum(buf, async_op)
                pend.items.append(("avg", buf))
                pend.residual_backup.append(None)
            elif self.compression == "none":
                delta = anchor - params.float()
                w = self._fp32_sum(delta, async_op)
                pend.items.append(("none", delta))
                pend.residual_backup.append(None)
            else:
                res = f.residual[lo:hi] if f.residual is not None else None
                # Non-overlap skip restores the pre-sync residual. In overlap mode a skip is decided
                # one sync later, after the residual moved on: there only non-finite entries are
                # dropped (below), otherwise a NaN residual would poison every later sync.
                keep = res is not None and not async_op
                pend.residual_backup.append(res.clone() if keep else None)
                payload, scales = F.compress_delta(anchor, params, res, self.compression, self.block_size, seed=seed)
                if res is not None and not F.is_finite(scales):
                    res.masked_fill_(~torch.isfinite(res), 0.0)
                w = _backend.all_reduce_compressed(payload, scales, n, self.compression, self.block_size,
                                                   group=self.group, op=dist.ReduceOp.AVG, async_op=async_op,
                                                   seed=None if seed is None else _derive_seed(self.seed, self._sync_index, -1))
                pend.items.append(("q", payload, scales))
            pend.works.append(w if async_op else None)
            self.stats["bytes_sent"] += self._wire_bytes(n, p)
        return pend

    def _fp32_sum(self, buf: torch.Tensor, async_op: bool):
        """Exact fp32 SUM all-reduce of ``buf`` in place, identical bytes on every rank.

        On a "localsgd" group ``dist.all_reduce`` of a large float tensor is *quantized* (that is
        the backend's job), so fp32 DiLoCo composes the sum from collectives the backend passes
        through untouched: an all-to-all of the p chunks (the reduce-scatter half: each rank
        receives every rank's copy of its own chunk, (p-1)/p of the tensor each way), a sum in
        rank order on the chunk's owner, and an all-gather of the summed chunks. That is the ring
        volume 2 (p-1)/p x 4 bytes per element (gloo's reduce_scatter would all-reduce the whole
        tensor: 1.5x that at p = 2), and every rank receives the owner's bytes, so replicas stay
        bitwise identical. Other groups use all_reduce.
        """
        if _backend._localsgd_backend(self.group, buf.device) is None:
            return dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group, async_op=async_op)
        p = self.sync_size
        n = buf.numel()
        chunk = -(-n // p)
        padded = torch.zeros(chunk * p, dtype=buf.dtype, device=buf.device)
        padded[:n].copy_(buf)
        received = torch.empty_like(padded)
        group = self.group
        work = dist.all_to_all_single(received, padded, group=group, async_op=async_op)

        def finish():
            if work is not None:
                work.wait()
            parts = received.view(p, chunk)
            mine = parts[0].clone()
            for r in range(1, p):  # fixed order: the same bytes in every run
                mine.add_(parts[r])
            _all_gather(padded, mine, group=group)
            buf.copy_(padded[:n])

        if async_op:
            return _Deferred(finish)  # the all-gather half runs when the result is awaited
        finish()
        return None

    def _finite(self, pend: _Pending) -> bool:
        ok = True
        for it in pend.items:
            if it is None:
                continue
            if it[0] in ("none", "avg"):
                ok = ok and bool(torch.isfinite(it[1]).all())
            else:
                ok = ok and F.is_finite(it[2])
        return ok

    def _apply(self, pend: _Pending, finite: Optional[bool] = None) -> None:
        """Outer step from a finished reduce, or the non-finite policy; params <- anchor."""
        if finite is None:
            finite = self._finite(pend)
        self.stats["syncs"] += 1
        if not finite:
            self._nonfinite(pend)
            return
        for f, it in zip(self._flats, pend.items):
            if it is None:
                continue
            lo, hi = f.lo, f.hi
            mom = f.momentum[lo:hi] if f.momentum is not None else None
            same = f.state_device == f.device
            params = f.flat[lo:hi] if same else None
            if it[0] == "avg":
                g = it[1]
                g.div_(self.sync_size)
                f.anchor[lo:hi].copy_(g)
                if params is not None:
                    params.copy_(g)
            elif it[0] == "none":
                g = it[1]
                g.div_(self.sync_size)  # SUM -> AVG: one IEEE division, identical on every rank
                F.outer_nesterov_step(f.anchor[lo:hi], mom, params, g, self.outer_lr, self.outer_momentum,
                                      self.nesterov)
            else:
                F.outer_nesterov_step_compressed(f.anchor[lo:hi], mom, params, it[1], it[2], self.compression,
                                                 self.block_size, 1.0, self.outer_lr, self.outer_momentum,
                                                 self.nesterov)
            if not same:
                f.write_params(f.anchor)
        if self.hierarchy is None:
            return
        self._gather_anchor_shards()

    def _nonfinite(self, pend: _Pending) -> None:
        self.stats["skipped_syncs"] += 1
        for f, backup in zip(self._flats, pend.residual_backup):
            if backup is not None:
                f.residual[f.lo:f.hi].copy_(backup)
        self._reset_params()
        msg = (f"DiLoCo sync {self._sync_index}: non-finite pseudo-gradient on at least one rank; "
               "outer step skipped on every rank, parameters reset to the anchor")
        if self.on_nonfinite == "raise":
            raise FloatingPointError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _reset_params(self) -> None:
        for f in self._flats:
            f.write_params(f.anchor)

    # ---- hierarchical ----
    def _setup_shards(self) -> None:
        h = self.hierarchy
        for f in self._flats:
            per = -(-f.numel // h.cluster_size)
            L = -(-per // self.block_size) * self.block_size  # block-aligned shards
            f.shard_len = L
            f.lo = min(h.local_index * L, f.numel)
            f.hi = min(f.lo + L, f.numel)

    def _allreduce_grads_intra(self) -> None:
        """fp32 gradient all-reduce (AVG) inside the cluster over one flat buffer per dtype."""
        h = self.hierarchy
        for f in self._flats:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in f.params]
            # One "has a gradient" flag per parameter rides along: a parameter that got a gradient
            # on some members of the cluster only (data-dependent branch) must get the averaged
            # gradient on all of them, or the inner step moves it on some members only and the
            # cluster's replicas diverge (as DDP, which assigns the reduced bucket everywhere).
            has = torch.tensor([0.0 if p.grad is None else 1.0 for p in f.params], device=f.device)
            flat = torch.cat([g.reshape(-1).float() for g in grads] + [has])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=h.intra)
            flags = flat[flat.numel() - len(f.params):].tolist()
            flat.div_(h.cluster_size)
            self.stats["intra_bytes_sent"] += int(2 * (h.cluster_size - 1) * flat.numel() * 4 / h.cluster_size)
            off = 0
            for p, flag in zip(f.params, flags):
                n = p.numel()
                if flag > 0:
                    g = flat[off:off + n].view_as(p)
                    if p.grad is None:
                        p.grad = g.to(p.dtype, copy=True)
                    else:
                        p.grad.copy_(g)
                off += n

    def _sync_hierarchical(self) -> None:
        pend = self._launch(async_op=False)
        # Members of a cluster hold different shards: agree on one decision (4 bytes, fast link).
        bad = torch.tensor([0.0 if self._finite(pend) else 1.0], device=self._flats[0].state_device)
        dist.all_reduce(bad, op=dist.ReduceOp.SUM, group=self.hierarchy.intra)
        self._apply(pend, finite=bool(bad.item() == 0.0))

    def _gather_anchor_shards(self) -> None:
        h = self.hierarchy
        for f in self._flats:
            L = f.shard_len
            mine = torch.zeros(L, dtype=torch.float32, device=f.state_device)
            mine[:f.hi - f.lo].copy_(f.anchor[f.lo:f.hi])
            parts = [torch.empty_like(mine) for _ in range(h.cluster_size)]
            dist.all_gather(parts, mine, group=h.intra)
            f.anchor.copy_(torch.cat(parts)[:f.numel])
            self.stats["intra_bytes_sent"] += (h.cluster_size - 1) * L * 4
            f.write_params(f.anchor)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume bitwise-identically (per rank): inner optimizer state,
        the local parameters, anchor, momentum, residual, counters, seed and, in overlap mode,
        the (awaited) result of the pending reduce."""
        pending = None
        if self._pending is not None:
            self._pending.wait()
            pending = [None if it is None else (it[0],) + tuple(t.clone() for t in it[1:])
                       for it in self._pending.items]
            pending = {"items": pending,
                       "residual_backup": [None if b is None else b.clone() for b in self._pending.residual_backup]}
        return {
            "inner_optimizer": self.inner_optimizer.state_dict(),
            "params": [f.flat.detach().clone() for f in self._flats],
            "anchor": [f.anchor.clone() for f in self._flats],
            "momentum": [None if f.momentum is None else f.momentum.clone() for f in self._flats],
            "residual": [None if f.residual is None else f.residual.clone() for f in self._flats],
            "local_step": self._local_step,
            "sync_index": self._sync_index,
            "stats": dict(self.stats),
            "pending": pending,
            "config": {"sync_every": self.sync_every, "compression": self.compression,
                       "block_size": self.block_size, "seed": self.seed, "overlap": self.overlap,
                       "numels": [f.numel for f in self._flats]},
            "rank": self.rank,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        cfg = state["config"]
        numels = [f.numel for f in self._flats]
        if cfg["numels"] != numels:
            raise ValueError(f"load_state_dict: expected flat buffers of sizes {numels}, got {cfg['numels']}")
        for k in ("compression", "block_size", "overlap"):
            if cfg[k] != getattr(self, k):
                raise ValueError(f"load_state_dict: expected {k}={getattr(self, k)!r} as constructed, got {cfg[k]!r}")
        for k, what in (("momentum", "outer_momentum != 0"), ("residual", "error_feedback")):
            have = [getattr(f, k) is not None for f in self._flats]
            got = [t is not None for t in state[k]]
            if have != got:
                raise ValueError(f"load_state_dict: expected {k} buffers {have} ({what} as constructed), "
                                 f"got {got} in the state")
        saved_rank = state.get("rank", self.rank)
        if saved_rank != self.rank:
            warnings.warn(
                f"DiLoCo.load_state_dict: this state was saved on rank {saved_rank} and is loaded on rank {self.rank}: "
                "anchor, momentum and counters are shared and resume exactly, but the local parameters and the inner "
                f"optimizer state are rank {saved_rank}'s. For a bit-exact resume save one state per rank.",
                UserWarning, stacklevel=2)
        self.inner_optimizer.load_state_dict(state["inner_optimizer"])
        with torch.no_grad():
            for i, f in enumerate(self._flats):
                f.flat.copy_(state["params"][i])
                f.anchor.copy_(state["anchor"][i])
                if f.momentum is not None:
                    f.momentum.copy_(state["momentum"][i])
                if f.residual is not None:
                    f.residual.copy_(state["residual"][i])
        self._local_step = int(state["local_step"])
        self._sync_index = int(state["sync_index"])
        self.seed = int(cfg["seed"])
        self.stats = dict(state["stats"])
        self._pending = None
        if state["pending"] is not None:
            pend = _Pending()
            for it in state["pending"]["items"]:
                pend.items.append(None if it is None else (it[0],) + tuple(
                    t.to(self._flats[0].state_device).clone() for t in it[1:]))
            pend.residual_backup = [None if b is None else b.clone() for b in state["pending"]["residual_backup"]]
            self._pending = pend

    def __repr__(self) -> str:
        return (f"DiLoCo(sync_every={self.sync_every}, outer_lr={self.outer_lr}, outer_momentum={self.outer_momentum}, "
                f"nesterov={self.nesterov}, compression={self.compression!r}, overlap={self.overlap}, "
                f"hierarchical={self.hierarchy is not None}, inner={type(self.inner_optimizer).__name__})")
