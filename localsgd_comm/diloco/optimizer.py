"""``DiLoCo``, the optimizer-facing wrapper: arguments, the sync schedule, the inner optimizer,
DDP under DiLoCo, checkpoints. The sync itself is the engine's (:mod:`.engine`). See the
package docstring for what it does."""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import backend as _backend
from .buffers import FLOAT_DTYPES, build_buffers, unique_parameters
from .collectives import GroupReducer
from .ddp import Tripwire, find_ddp, make_ddp_local, unwrap_compiled
from .engine import OuterConfig, OuterEngine, Reduction, derive_seed
from .hierarchical import HierarchicalGroups, HierarchicalStreamingSync, HierarchicalSync
from .inner import InnerWrapper, check_common_args
from .agreement import agree, layout_summary
from .module_buffers import BufferSync
from .streaming import StreamingSync, check_streaming_args, resolved_mixing


class DiLoCo(InnerWrapper):
    """DiLoCo (or plain local SGD) around an inner optimizer; see the ``localsgd_comm.diloco`` docstring.

    Args:
        model: an ``nn.Module`` or a ``DistributedDataParallel`` wrapping one, or a model sharded
            with FSDP2's ``fully_shard`` on ``mesh["shard"]`` of a 2-D mesh (DTensor parameters:
            the call returns a :class:`~localsgd_comm.diloco.sharded.ShardedDiLoCo`).
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
        group: the process group of the sync (default: the default group; for an FSDP2 model the
            replicate group, default: the first dimension of the 2-D mesh).
        hierarchy: a :class:`HierarchicalGroups` for hierarchical mode (``group`` is ignored).
        overlap: delayed outer step with the all-reduce in the background (see the package docstring).
        state_device: device of anchor/momentum/residual (default: the parameters' device).
        on_nonfinite: ``"skip"`` or ``"raise"``.
        broadcast_init: broadcast parameters and buffers from rank 0 at construction, unless every
            rank already holds the same bytes (checked with a digest: DDP broadcast them already).
        sync_buffers: at every sync, average the module's floating buffers (BatchNorm statistics)
            across the group and broadcast its other buffers from rank 0 (:mod:`.module_buffers`);
            ``False`` leaves each rank's buffers its own.
        fragments, overlap_steps, mixing: streaming DiLoCo (:mod:`.streaming`): the model synced
            in ``fragments`` parts staggered over the ``sync_every`` steps, each reduce in flight
            for ``overlap_steps`` inner steps, then merged as
            ``params <- mixing * params + (1 - mixing) * anchor`` (default mixing: 0.5 when
            ``overlap_steps > 0``, else 0). ``fragments=None`` (default): not streaming.
    """

    def __new__(cls, model=None, inner_optimizer=None, *args, **kwargs):
        # An FSDP2 model (DTensor parameters) gets DiLoCo over sharded replicas (.sharded).
        if cls is DiLoCo:
            from .sharded import ShardedDiLoCo, holds_dtensors
            if holds_dtensors(model, inner_optimizer):
                cls = ShardedDiLoCo
        return super().__new__(cls)

    #: streaming mode's fragments (None: not streaming; subclasses that do not stream keep the default)
    _stream: Optional[StreamingSync] = None
    #: module buffers synced at each sync (None: off, or a subclass that syncs them its own way)
    _buffer_sync: Optional[BufferSync] = None

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer, *, sync_every: int,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, nesterov: bool = True,
                 compression: str = "int8", block_size: Optional[int] = None, error_feedback: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0, group=None,
                 hierarchy: Optional[HierarchicalGroups] = None, overlap: bool = False,
                 state_device=None, on_nonfinite: str = "skip", broadcast_init: bool = True,
                 sync_buffers: bool = True, fragments: Optional[int] = None, overlap_steps: int = 0,
                 mixing: Optional[float] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module (or DDP-wrapped one), got {type(model).__name__}")
        block_size = check_common_args(inner_optimizer, sync_every, outer_lr, outer_momentum, compression,
                                       error_feedback, block_size, on_nonfinite, stochastic_rounding)
        if hierarchy is not None and overlap:
            raise ValueError("overlap=True with hierarchy: expected one of the two, got both (not supported together)")
        check_streaming_args(fragments, overlap_steps, mixing, sync_every, overlap, hierarchy)
        if hierarchy is not None and not isinstance(hierarchy, HierarchicalGroups):
            raise TypeError(f"hierarchy: expected HierarchicalGroups (new_hierarchical_groups), got {type(hierarchy).__name__}")
        if not dist.is_initialized():
            raise RuntimeError("DiLoCo: expected an initialized process group (dist.init_process_group), got none")

        self._set_common(model, inner_optimizer, sync_every, outer_lr, outer_momentum, nesterov, compression,
                         block_size, error_feedback, stochastic_rounding, seed, overlap, on_nonfinite)
        self.hierarchy = hierarchy
        self.group = hierarchy.cross if hierarchy is not None else (group if group is not None else dist.group.WORLD)
        self.rank = dist.get_rank()
        self._reducer = GroupReducer(self.group)
        self.sync_size = self._reducer.size
        # outer_lr=1, outer_momentum=0 is model averaging; in fp32 it is computed as such (exact).
        # Not in overlap mode: there the delayed step is theta <- theta - g_{k-1}, and theta has
        # moved since g_{k-1}'s round started, so avg(params of round k-1) is not that step.
        # Streaming with overlap_steps=sync_every is the delayed step (see .streaming): the same.
        averaging = (self.outer_lr == 1.0 and self.outer_momentum == 0.0 and compression == "none"
                     and not self.overlap and not (fragments is not None and overlap_steps == sync_every))
        self._engine = OuterEngine(OuterConfig(compression, block_size, self.outer_lr, self.outer_momentum,
                                               self.nesterov, averaging))

        ddp = find_ddp(model)
        self._ddp = ddp is not None
        module = ddp.module if ddp is not None else unwrap_compiled(model)
        hook_state = {"calls": 0}
        if ddp is not None:
            if hierarchy is None:
                make_ddp_local(ddp, hook_state)  # see "DDP under DiLoCo"
            elif dist.get_world_size(ddp.process_group) != hierarchy.cluster_size:
                raise ValueError("hierarchical mode with DDP: expected DDP over hierarchy.intra (size "
                                 f"{hierarchy.cluster_size}), got a DDP group of size "
                                 f"{dist.get_world_size(ddp.process_group)}")

        # ---- parameters: deduplicated (tied weights), trainable ones synced ----
        all_params = unique_parameters(module)
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
            if p.dtype not in FLOAT_DTYPES:
                raise TypeError(f"parameters: expected float32/bfloat16/float16, got {p.dtype}")
            if p.is_sparse:
                raise TypeError("parameters: expected dense parameters, got a sparse one")

        # ---- the same settings on every rank, and an identical start: broadcast from rank 0 of the
        # sync group (world in hierarchical mode) ----
        bgroup = None if hierarchy is not None else self.group
        # One all-gather of two digests (32 bytes per rank, see .agreement): members constructed with
        # other settings raise here, every one of them; the broadcast is skipped when every rank
        # already holds the same bytes (DDP broadcast them at its own construction): verified, not assumed.
        start = list(all_params) + list(module.buffers())
        settings = self._settings(broadcast_init, sync_buffers, fragments, overlap_steps, mixing)
        settings.update(hierarchy_cluster_size=hierarchy.cluster_size if hierarchy else None,
                        parameters=layout_summary(trainable), buffers=layout_summary(list(module.buffers())))
        identical = agree(settings, start if broadcast_init else None, bgroup, all_params[0].device)
        if broadcast_init and not identical:
            src = dist.get_global_rank(bgroup, 0) if bgroup not in (None, dist.group.WORLD) else 0
            with torch.no_grad():
                for t in start:
                    dist.broadcast(t.data, src=src, group=bgroup)

        align = self.block_size if self.compression != "none" else 1
        self._flats = build_buffers(trainable, state_device=state_device, momentum=self.outer_momentum != 0.0,
                                    residual=self.error_feedback, align=align)
        # Outer state on another device than the parameters (state_device="cpu"): a group that
        # cannot carry it (NCCL) gets it through the parameters' device.
        self._reducer.stage_device = next((f.device for f in self._flats if f.device != f.state_device), None)
        names = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), name)
        self._param_names = [[names.get(id(p), f"<parameter {i}>") for i, p in enumerate(f.params)]
                             for f in self._flats]
        # where each parameter is registered: fully_shard (or anything else) replacing it after
        # construction is reported by _check_params
        owners = {}
        for mod in module.modules():
            for attr, p in mod._parameters.items():
                if p is not None:
                    owners.setdefault(id(p), (mod, attr))
        self._owners = [[owners.get(id(p)) for p in f.params] for f in self._flats]
        # What the engine syncs: whole buffers, or this rank's shards of them in hierarchical mode.
        self._hier = HierarchicalSync(hierarchy, self._flats, self.block_size) if hierarchy is not None else None
        self._segments = self._hier.segments if self._hier is not None else [f.segment() for f in self._flats]

        self._local_step = 0   # inner steps taken
        self._sync_index = 0   # syncs started
        self._pending: Optional[Reduction] = None  # overlap mode: the reduce in flight
        # streaming mode: the fragments, their schedule and their reduces in flight
        # (across clusters in hierarchical mode: each fragment synced on this rank's shards of it)
        if fragments is not None:
            self._stream = (StreamingSync(self, trainable, fragments, overlap_steps, mixing, align)
                            if self._hier is None else
                            HierarchicalStreamingSync(self, self._hier, trainable, fragments, overlap_steps,
                                                      mixing, align))
        self.stats = {"syncs": 0, "skipped_syncs": 0, "bytes_sent": 0, "intra_bytes_sent": 0, "foreign_bytes": 0,
                      "ddp_hook_calls": 0}
        # Tripwire (see "DDP under DiLoCo"): traffic on the watched groups between syncs.
        groups = [self.group]
        if ddp is not None and hierarchy is None and ddp.process_group is not self.group:
            groups.append(ddp.process_group)
        # fp32 bytes of one all-reduce of the synced parameters: the scale of "gradient traffic"
        fp32_ring_bytes = sum(_backend.ddp_bytes_per_rank(f.numel, 1, self.sync_size) for f in self._flats)
        self._tripwire = Tripwire(groups, hook_state, fp32_ring_bytes, sync_every)
        self.stats["buffer_bytes_sent"] = 0
        self._buffer_sync = BufferSync(module, bgroup if bgroup is not None else dist.group.WORLD) \
            if sync_buffers else None

    def _set_common(self, model, inner_optimizer, sync_every, outer_lr, outer_momentum, nesterov, compression,
                    block_size, error_feedback, stochastic_rounding, seed, overlap, on_nonfinite) -> None:
        """The settings every DiLoCo (plain, hierarchical, streaming, sharded) keeps as attributes."""
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
        self.overlap = bool(overlap)
        self.on_nonfinite = on_nonfinite

    def _settings(self, broadcast_init, sync_buffers, fragments, overlap_steps, mixing) -> Dict[str, Any]:
        """The resolved settings every member of the sync group must share (see .agreement)."""
        return {"sync_every": self.sync_every, "outer_lr": self.outer_lr, "outer_momentum": self.outer_momentum,
                "nesterov": self.nesterov, "compression": self.compression, "block_size": self.block_size,
                "error_feedback": self.error_feedback, "stochastic_rounding": self.stochastic_rounding,
                "overlap": self.overlap, "on_nonfinite": self.on_nonfinite, "broadcast_init": bool(broadcast_init),
                "sync_buffers": bool(sync_buffers), "fragments": fragments, "overlap_steps": overlap_steps,
                "mixing": None if fragments is None else resolved_mixing(mixing, overlap_steps)}

    # ------------------------------------------------------------------ public API
    #: GradScaler.step(opt) calls step() with ``grad_scale``/``found_inf`` set instead of skipping
    #: it on an inf, so the step count (hence the sync schedule) stays the same on every rank.
    _step_supports_amp_scaling = True

    def step(self, closure=None):
        """One inner step; a sync every ``sync_every`` calls. Returns the closure's loss."""
        self._check_params("step()")
        if self._hier is not None and not self._ddp:
            if closure is not None:
                # The closure computes the gradients inside inner_optimizer.step(): average them
                # after it ran (averaging before would see the previous step's gradients).
                inner_closure = closure

                def closure():
                    loss = inner_closure()
                    self._hier.average_gradients(self.stats)
                    return loss
            else:
                self._hier.average_gradients(self.stats)
        loss = self._inner_step(closure)
        self._local_step += 1
        if self._stream is not None:
            if self._buffer_sync is not None and self._local_step % self.sync_every == 0:
                # streaming: module buffers once per round of fragments, at its end (a fragment's
                # reduce may be in flight on the group: its bytes are not the buffers')
                self._buffer_sync.sync(self.stats, measure=not self._stream.in_flight)
            self._stream.after_step(self._local_step)
        elif self._local_step % self.sync_every == 0:
            self.sync()
        return loss

    def sync(self) -> None:
        """Run one outer sync now (``step`` calls this every ``sync_every`` steps)."""
        self._check_params("sync()")
        if self._stream is not None:
            raise RuntimeError("DiLoCo.sync(): in streaming mode (fragments=...) each fragment syncs on its own "
                               "schedule inside step(); call flush() to merge the fragments in flight now")
        if self._tripwire.watching and self._pending is not None:
            # Overlap mode: the previous sync's reduce must be counted before the tripwire reads the
            # counters. Free on a "localsgd" group: its worker runs collectives in order, so the new
            # reduce could not start before this one ends anyway.
            self._pending.wait()
        self._tripwire.check(self.stats, self._sync_index + 1)
        if self._buffer_sync is not None:
            self._buffer_sync.sync(self.stats)  # module buffers: see module_buffers.py
        self._sync_index += 1
        # Without overlap a skipped (non-finite) update restores the residual. In overlap mode a skip
        # is decided one sync later, after the residual moved on: the engine zeroes its non-finite
        # entries instead.
        red = self._engine.start(self._segments, self._reducer, async_op=self.overlap, keep_backup=not self.overlap,
                                 seed=self._seed(), wire_seed=self._wire_seed())
        self.stats["bytes_sent"] += red.bytes_sent
        if self._hier is not None:
            self._finish(red, finite=self._hier.agree_finite(self._engine.is_finite(red)))
            return
        if not self.overlap:
            self._finish(red)
            return
        prev, self._pending = self._pending, red
        if prev is not None:
            prev.wait()
            self._finish(prev)  # also writes params = anchor
        else:
            self._reset_params()

    def flush(self) -> None:
        """Overlap mode: wait for the pending reduce and apply it now (params <- new anchor).
        Streaming mode: merge every fragment in flight now."""
        if self._stream is not None:
            self._check_params("flush()")
            self._stream.flush()
            return
        if self._pending is not None:
            prev, self._pending = self._pending, None
            prev.wait()
            self._finish(prev)

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
        for f, names, owners in zip(self._flats, self._param_names, getattr(self, "_owners", ())):
            for p, owner, name in zip(f.params, owners, names):
                if owner is not None and owner[0]._parameters.get(owner[1]) is not p:
                    now = owner[0]._parameters.get(owner[1])
                    what = ("a DTensor: fully_shard was applied after DiLoCo was constructed. Apply fully_shard "
                            "first, then build the inner optimizer and DiLoCo over the sharded model"
                            if type(now).__name__ == "DTensor" or type(getattr(now, "data", None)).__name__ == "DTensor"
                            else "another tensor")
                    raise RuntimeError(f"DiLoCo.{where}: parameter {name!r} was replaced in the model after DiLoCo "
                                       f"was constructed (it is now {what}); syncs would no longer change it.")

    def _seed(self) -> Optional[int]:
        if not self.stochastic_rounding:
            return None
        return derive_seed(self.seed, self._sync_index, self.rank)

    def _wire_seed(self) -> Optional[int]:
        # the requantization inside the all-reduce: one seed for every rank (they must agree)
        return derive_seed(self.seed, self._sync_index, -1) if self.stochastic_rounding else None

    def _finish(self, red: Reduction, finite: Optional[bool] = None) -> None:
        """Outer step from a finished reduce, or the non-finite policy; params <- anchor."""
        red.wait()
        if finite is None:
            finite = self._engine.is_finite(red)
        self.stats["syncs"] += 1
        if not finite:
            self._nonfinite(red)
            return
        self._engine.apply(red)
        if self._hier is not None:
            self._hier.gather_anchors(self.stats)

    def _nonfinite(self, red: Reduction) -> None:
        self.stats["skipped_syncs"] += 1
        self._engine.restore_residuals(red)
        self._reset_params()
        msg = (f"DiLoCo sync {self._sync_index}: non-finite pseudo-gradient on at least one rank; "
               "outer step skipped on every rank, parameters reset to the anchor")
        if self.on_nonfinite == "raise":
            raise FloatingPointError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _reset_params(self) -> None:
        for f in self._flats:
            f.write_params(f.anchor)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume bitwise-identically (per rank): inner optimizer state,
        the local parameters, anchor, momentum, residual, counters, seed and, in overlap mode,
        the (awaited) result of the pending reduce."""
        pending = None if self._pending is None else self._pending.state()
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
            "streaming": None if self._stream is None else self._stream.state(),
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
            self._pending = Reduction.from_state(state["pending"], self._segments, self.sync_size)
        if self._stream is not None:
            self._stream.load_state(state.get("streaming"))
        elif state.get("streaming") is not None:
            raise ValueError("load_state_dict: expected a state without fragments as constructed, got a streaming "
                             f"state (fragments={state['streaming']['fragments']})")

    def __repr__(self) -> str:
        return (f"DiLoCo(sync_every={self.sync_every}, outer_lr={self.outer_lr}, outer_momentum={self.outer_momentum}, "
                f"nesterov={self.nesterov}, compression={self.compression!r}, overlap={self.overlap}, "
                f"hierarchical={self.hierarchy is not None}, "
                + (f"fragments={self._stream.fragments}, overlap_steps={self._stream.overlap_steps}, "
                   f"mixing={self._stream.mixing}, " if self._stream is not None else "")
                + f"inner={type(self.inner_optimizer).__name__})")
