"""DiLoCo over sharded replicas: FSDP2 (``fully_shard``) inside each replica, the compressed
outer sync across replicas (the HSDP layout: a 2-D mesh ``("replicate", "shard")``).

Usage (the same call as for an unsharded model; ``DiLoCo`` picks this class when the
parameters are DTensors)::

    mesh = init_device_mesh("cuda", (R, S), mesh_dim_names=("replicate", "shard"))
    for block in model.blocks:
        fully_shard(block, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    opt = localsgd_comm.DiLoCo(model, torch.optim.AdamW(model.parameters()), sync_every=H,
                               compression="int8", group=mesh.get_group("replicate"))

What each rank keeps and does
-----------------------------
* Outer state for its local shards only: anchor, outer momentum and error-feedback residual are
  flat fp32 buffers over ``p.to_local()`` of every synced parameter (block-aligned per shard, so a
  quantization block never straddles two parameters), i.e. 1/S of the unsharded state per rank.
  ``state_device="cpu"`` keeps them in host memory (pinned when the parameters are on CUDA; the
  CUDA paths are not tested yet: the tests run on CPU).
  FSDP keeps owning the shards' storage: they are read into a transient flat buffer at each sync
  and written back in place, never re-pointed.
* A sync (every ``sync_every`` steps) runs the shared outer-step engine on those buffers over
  ``group``, the ranks holding the same shard in every replica: compressed pseudo-gradient,
  compressed all-reduce (exact fp32 sum for ``compression="none"``), fused outer Nesterov step,
  ``local shards = anchor``. No rank ever gathers the full model for the sync; every byte the
  sync sends crosses ``group`` (counted by the backend on that group, apart from FSDP's
  all-gathers and reduce-scatters, which run on the shard group).
* Every member of ``group`` dequantizes the same bytes into the same anchor, so after each sync
  every replica's full parameters (``p.full_tensor()``) are bitwise identical.
* Construction broadcasts the local shards (and the module buffers; later syncs average these,
  see "Module buffers") once across ``group`` from
  its rank 0 (one broadcast per dtype: ``local_shard_numel x element size`` bytes sent by that
  rank, a 64-byte call header by each other member; recorded in ``stats["init_bytes"]``);
  ``broadcast_init=False`` skips it when the replicas start identical from the same seed.

Module buffers (BatchNorm's running statistics, counters)
---------------------------------------------------------
FSDP2 does not shard buffers: every rank holds the whole buffer and updates it from its own
batch, so the ranks of one replica drift apart as well as the replicas. With
``sync_buffers=True`` (the default, as for ``DiLoCo``) every sync leaves every rank of every
replica holding the same buffers, as hierarchical ``DiLoCo`` does over its whole world: floating
buffers changed on any rank become the mean over all ``R x S`` ranks, other buffers
(``num_batches_tracked``) the values of the mesh's first rank (replica 0, shard 0). It is two
:class:`~.module_buffers.BufferSync` passes (:class:`ShardedBufferSync`), the same rules as
``DiLoCo``'s (only buffers changed somewhere are sent; exact fp32 sums): first over the shard group
(the replica's mean, on the fast intra-replica link; counted in ``stats["intra_bytes_sent"]``),
then over ``group`` (the mean of the replicas' means, which every shard rank computes from the
same bytes; counted in ``stats["bytes_sent"]``). Both go to ``stats["buffer_bytes_sent"]``. The
mean of the means is the mean of all ranks (every replica has S ranks) up to fp32 rounding
(two sums and two divisions), and bitwise the same on every rank. In streaming mode the buffers
are synced once per round of fragments, at its last step (``sync_every`` divides the step),
before that step's merges and starts, with the replicate group's bytes estimated when a
fragment's reduce is in flight (as unsharded streaming). ``sync_buffers=False`` leaves each
rank's buffers its own after the construction broadcast.

``group`` omitted: the parameters' mesh must be a dimension of a 2-D mesh (``mesh["shard"]``);
the other (first) dimension of that mesh is taken as the replicate dimension. A 1-D mesh
(plain FSDP, no replicas) is an error saying what to pass.

What is supported with it: ``MixedPrecisionPolicy`` (outer state is fp32 over the sharded fp32
parameters), ``reshard_after_forward`` either way, activation checkpointing, ``torch.compile`` of
blocks, gradient accumulation with ``set_requires_gradient_sync(False)``, ``clip_grad_norm_`` on
the DTensor parameters, lr schedulers on the wrapper, tied embeddings (synced once), the delayed
outer step (``overlap=True``), streaming fragments (below). Not supported (a clear error at construction): hierarchical mode
(FSDP's shard group is the fast intra-replica link already), a DDP wrapper, parameters sharded
on the 2-D mesh itself (``fully_shard(mesh=mesh2d)`` is HSDP: it all-reduces gradients across
replicas every step), a model with some parameters sharded and others not.

Streaming (``fragments=P, overlap_steps=TAU, mixing=ALPHA``)
-----------------------------------------------------------
The schedule, the bound on TAU, the merge ``local shards <- ALPHA local + (1 - ALPHA) anchor`` and
the ordering with other collectives are those of unsharded streaming (:mod:`.streaming`); what
differs is the cut. A fragment must be the same parameters on every shard rank and every replica,
or a fragment sync would update one half of a parameter at one step and its other half at another,
and each shard rank's cut would depend on its local sizes (FSDP2 chunks dimension 0, so the shard
ranks' sizes differ when it does not divide evenly). So the cut is planned over the whole
(unsharded) parameters in the model's order (:func:`plan_sharded_fragments`): each parameter
weighs its full ``numel`` rounded up to the quantization block (the last of each dtype buffer not
rounded: the weights the unsharded plan uses), and the same min-max rule cuts them into P
contiguous runs whose largest is as small as possible. Unlike the unsharded rule a parameter is
never split: a parameter larger than ``total / P`` makes its fragment that large (FSDP has already
divided it by S on every rank). Balance is measured on those full sizes
(``opt._stream.fragment_full_numels()``), the same numbers on every rank; each rank's share of
fragment f (``fragment_numels()``, its local shards' elements with their padding) is about 1/S of
it. When no parameter is split the cuts are the unsharded plan's (the same parameter names), and a
fp32 run with whole batches on every shard rank equals unsharded streaming bit for bit
(``tests/test_fsdp_streaming.py``).

Each rank's fragment f is one :class:`ShardSegment` per buffer (its local shards of those
parameters, contiguous in its flat outer state); the fragment's reduce runs over ``group`` like a
whole sync. At a merge the fragment's finiteness is agreed by a 4-byte MIN over the shard group
(as a whole sync does), so a non-finite fragment is skipped by every shard and replica together;
the other fragments are unaffected. After a merge modules a no-grad forward left unsharded are
resharded so the next forward gathers the new shards. ``fragments=1, overlap_steps=0`` is the
non-streaming sync bit for bit.

Checkpoints: :meth:`ShardedDiLoCo.state_dict` returns a nested dict ready for
``torch.distributed.checkpoint`` (DCP). DCP treats tensors under the same key on several ranks as
copies and keeps one; between syncs replicas differ (local parameters, inner optimizer moments,
residuals), so everything that is per rank sits under a key naming the rank's replica and shard
(``"replica{r}.shard{s}"``): the model's local parameters, the inner optimizer's state, anchor,
momentum, residual and the pending reduce; in streaming mode one slot per fragment
(``fragments.{f}``, at most one reduce per fragment is in flight between steps) holds the awaited
result of its reduce in flight, or zeros, and ``meta.streaming.in_flight`` lists
``[fragment, due step, sync index]`` of those in flight, so a fresh process's ``state_dict()``
has every key ``dcp.load`` fills and the resumed run merges them at the same steps (bitwise). Save ``{"diloco": opt.state_dict()}`` with
``dcp.save``; to resume build the same layout, call ``sd = {"diloco": opt.state_dict()}``,
``dcp.load(sd, ...)`` and ``opt.load_state_dict(sd["diloco"])``: bit-exact with the same number of
replicas and shards.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import backend as _backend
from .agreement import mismatch_message
from .buffers import FLOAT_DTYPES
from .collectives import GroupReducer
from .ddp import Tripwire, find_ddp, unwrap_compiled
from .engine import OuterConfig, OuterEngine, Reduction
from .inner import check_common_args
from .optimizer import DiLoCo
# the pieces ShardedDiLoCo syncs (holds_dtensors, plan_sharded_fragments and the classes are
# imported from here by users and tests too)
from .shards import (ShardedBuffer, ShardedBufferSync, ShardedStreamingSync, ShardSegment,  # noqa: F401
                     _flat_of, _fsdp_modules, _is_dtensor, _local, _mesh_desc, _replicate_ranks, _root_mesh,
                     _unflat_into, DTensor, holds_dtensors, plan_sharded_fragments)
from .streaming import _InFlight, check_streaming_args


class ShardedDiLoCo(DiLoCo):
    """DiLoCo over FSDP2-sharded replicas; see the module docstring. ``DiLoCo(...)`` returns one
    when the model's or the inner optimizer's parameters are DTensors; the sync schedule, the
    non-finite policy, overlap mode and streaming (``fragments``, ``overlap_steps``, ``mixing``:
    fragments cut over whole parameters, see the module docstring) are DiLoCo's, over
    :class:`ShardSegment` segments."""

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer, *, sync_every: int,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, nesterov: bool = True,
                 compression: str = "int8", block_size: Optional[int] = None, error_feedback: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0, group=None, hierarchy=None,
                 overlap: bool = False, state_device=None, on_nonfinite: str = "skip", broadcast_init: bool = True,
                 sync_buffers: bool = True, fragments: Optional[int] = None, overlap_steps: int = 0,
                 mixing: Optional[float] = None, **unsupported):
        if unsupported:
            raise ValueError(f"DiLoCo over an FSDP2 model: {sorted(unsupported)} not supported with sharded "
                             "replicas (yet)")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        block_size = check_common_args(inner_optimizer, sync_every, outer_lr, outer_momentum, compression,
                                       error_feedback, block_size, on_nonfinite, stochastic_rounding)
        if hierarchy is not None:
            raise ValueError("hierarchy: not supported with an FSDP2 model (FSDP's shard group is the intra-replica "
                             "link); pass group=mesh.get_group('replicate') instead")
        check_streaming_args(fragments, overlap_steps, mixing, sync_every, overlap, None)
        if find_ddp(model) is not None:
            raise ValueError("model: expected an FSDP2 model (fully_shard), got a DistributedDataParallel wrapper "
                             "around DTensor parameters")
        if not dist.is_initialized():
            raise RuntimeError("DiLoCo: expected an initialized process group (dist.init_process_group), got none")

        module = unwrap_compiled(model)
        fsdp = _fsdp_modules(module)
        for m in fsdp:  # a no-grad forward can leave the root unsharded: register the sharded parameters
            m.reshard()
        self._set_common(model, inner_optimizer, sync_every, outer_lr, outer_momentum, nesterov, compression,
                         block_size, error_feedback, stochastic_rounding, seed, overlap, on_nonfinite)
        self.hierarchy = None
        self.rank = dist.get_rank()
        self._fsdp_modules = fsdp

        # ---- parameters: all DTensors on one mesh, the inner optimizer over them ----
        named, seen = [], set()
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) not in seen:
                seen.add(id(p))
                named.append((name, p))
        plain = [n for n, p in named if not _is_dtensor(p)]
        if plain:
            raise ValueError(
                f"model: expected every parameter sharded by fully_shard (DTensors), got plain tensors too: "
                f"{plain[:3]}{' ...' if len(plain) > 3 else ''}: apply fully_shard to the root module as well "
                "(fully_shard(model, mesh=mesh['shard']) after the blocks)")
        mesh = named[0][1].device_mesh if named else None
        for n, p in named:
            if p.device_mesh != mesh:
                raise ValueError(
                    f"model: expected every parameter on one device mesh, got {named[0][0]!r} on {_mesh_desc(mesh)} "
                    f"and {n!r} on {_mesh_desc(p.device_mesh)}: shard every module on the same mesh['shard']")
        model_ids = {id(p): n for n, p in named}
        for gi, g in enumerate(inner_optimizer.param_groups):
            for p in g["params"]:
                if id(p) not in model_ids:
                    hint = (" (a plain tensor: was the optimizer built before fully_shard? fully_shard replaces "
                            "the parameters with DTensors; build the optimizer, then DiLoCo, after it)"
                            if not _is_dtensor(p) else "")
                    raise ValueError(
                        f"inner_optimizer: expected an optimizer over the model's parameters, got param group {gi} "
                        f"holding a tensor of shape {tuple(p.shape)} that is not a parameter of the model{hint}")
        trainable = [(n, p) for n, p in named if p.requires_grad]
        if not trainable:
            raise ValueError("model: expected at least one parameter with requires_grad=True, got none")
        for n, p in trainable:
            if p.dtype not in FLOAT_DTYPES:
                raise TypeError(f"parameters: expected float32/bfloat16/float16, got {p.dtype} ({n!r})")
        if mesh.ndim != 1:
            raise ValueError(
                f"model: parameters sharded on the {mesh.ndim}-D mesh {_mesh_desc(mesh)} (HSDP: FSDP all-reduces "
                "every gradient across replicas each step, which DiLoCo exists to avoid); shard on the shard "
                "dimension only, fully_shard(module, mesh=mesh['shard']), and pass group=mesh.get_group('replicate')")
        self.mesh = mesh

        # ---- the replicate group: ranks holding the same shard in every replica ----
        expected = _replicate_ranks(mesh, self.rank)
        if group is None:
            if expected is None:
                raise ValueError(
                    f"group: none given and the parameters' mesh {_mesh_desc(mesh)} is 1-D with no replicate "
                    "dimension (plain FSDP: every rank holds a different shard, there is nothing to sync across). "
                    "Build a 2-D mesh init_device_mesh(device, (R, S), mesh_dim_names=('replicate', 'shard')), "
                    "fully_shard on mesh['shard'] and pass group=mesh.get_group('replicate')")
            root = _root_mesh(mesh)
            group = root.get_group(0)
            got = sorted(dist.get_process_group_ranks(group))
            if got != expected:
                raise ValueError(
                    f"group: none given and the first dimension of {_mesh_desc(root)} is not the replicate "
                    f"dimension of the parameters' mesh {_mesh_desc(mesh)}; pass group= explicitly")
        try:
            in_group = dist.get_rank(group) >= 0
        except (RuntimeError, ValueError):
            in_group = False
        if not in_group:
            raise ValueError(f"group: expected a process group that contains this rank ({self.rank}), got one that "
                             "does not")
        got = sorted(dist.get_process_group_ranks(group))
        if expected is not None and got != expected:
            raise ValueError(
                f"group: expected the ranks holding the same shard as rank {self.rank} in every replica, {expected} "
                f"(mesh.get_group('replicate') of the 2-D mesh the parameters' mesh {_mesh_desc(mesh)} comes from), "
                f"got a group of ranks {got}")
        clash = set(got) & set(mesh.mesh.flatten().tolist()) - {self.rank}
        if clash:
            raise ValueError(f"group: expected ranks of other replicas only, got ranks {sorted(clash)} that hold "
                             f"other shards of this rank's replica (its mesh is {_mesh_desc(mesh)})")
        self.group = group
        self.replica_index = dist.get_rank(group)
        self.shard_index = mesh.get_local_rank()
        self._reducer = GroupReducer(group)
        self.sync_size = self._reducer.size
        # Every member must shard alike (same modules, same mesh size) and pass the same settings
        # (see .agreement): checked once, before any tensor moves.
        fingerprint = (self.shard_index, [(n, tuple(p.shape), tuple(_local(p).shape), str(p.dtype))
                                          for n, p in trainable])
        settings = self._settings(broadcast_init, sync_buffers, fragments, overlap_steps, mixing)
        prints = [None] * self.sync_size
        dist.all_gather_object(prints, (fingerprint, settings), group=group)
        for r, (fp, _) in enumerate(prints):
            if fp != fingerprint:
                raise ValueError(
                    f"group: expected every member to hold the same shard of the same parameters, got member {r} "
                    f"holding shard {fp[0]} ({len(fp[1])} parameters) where this rank (member {self.replica_index}) "
                    f"holds shard {fingerprint[0]} ({len(fingerprint[1])} parameters)")
        msg = mismatch_message("ShardedDiLoCo", [st for _, st in prints], dist.get_process_group_ranks(group))
        if msg is not None:
            raise ValueError(msg)

        averaging = (self.outer_lr == 1.0 and self.outer_momentum == 0.0 and compression == "none"
                     and not self.overlap and not (fragments is not None and overlap_steps == sync_every))
        self._engine = OuterEngine(OuterConfig(compression, block_size, self.outer_lr, self.outer_momentum,
                                               self.nesterov, averaging))
        self._ddp = False

        # ---- identical start: one broadcast of the local shards (and the buffers) across group ----
        self.stats = {"syncs": 0, "skipped_syncs": 0, "bytes_sent": 0, "intra_bytes_sent": 0, "foreign_bytes": 0,
                      "ddp_hook_calls": 0, "init_bytes": 0}
        align = self.block_size if self.compression != "none" else 1
        params = [p for _, p in trainable]
        keys: Dict[tuple, list] = {}
        for p in params:
            t = _local(p)
            keys.setdefault((t.device, t.dtype), []).append(p)
        before = _backend.bytes_sent_on(group)
        if broadcast_init:
            src = dist.get_global_rank(group, 0)
            with torch.no_grad():
                for ps in keys.values():
                    tmp = _flat_of([_local(p) for p in ps])
                    if tmp.numel():  # the same on every member (checked above)
                        dist.broadcast(tmp, src=src, group=group)
                        _unflat_into(tmp, [_local(p) for p in ps])
                frozen = [_local(p) for _, p in named if not p.requires_grad]
                for t in frozen + [b.to_local() if _is_dtensor(b) else b for b in module.buffers()]:
                    if t.numel():
                        dist.broadcast(t.data, src=src, group=group)
        after = _backend.bytes_sent_on(group)
        if before is not None and after is not None:
            self.stats["init_bytes"] = after - before
        self._flats = [ShardedBuffer(ps, state_device, self.outer_momentum != 0.0, self.error_feedback, align)
                       for ps in keys.values()]
        self._reducer.stage_device = next((f.device for f in self._flats if f.device != f.state_device), None)
        self._param_names = [[model_ids[id(p)] for p in f.params] for f in self._flats]
        self._hier = None
        self._segments = [f.segment() for f in self._flats]
        self._local_step = 0
        self._sync_index = 0
        self._pending: Optional[Reduction] = None
        # streaming: fragments over whole parameters, the same on every rank (plan_sharded_fragments)
        self._stream = (ShardedStreamingSync(self, params, fragments, overlap_steps, mixing, align)
                        if fragments is not None else None)
        fp32_ring_bytes = sum(_backend.ddp_bytes_per_rank(f.numel, 1, self.sync_size) for f in self._flats)
        self._tripwire = Tripwire([group], {"calls": 0}, fp32_ring_bytes, sync_every)
        # module buffers: averaged over every rank of every replica at each sync (see "Module buffers")
        self.stats["buffer_bytes_sent"] = 0
        self._buffer_sync = ShardedBufferSync(module, mesh.get_group(), group) if sync_buffers else None

    # ------------------------------------------------------------------ hooks of DiLoCo
    def _check_params(self, where: str) -> None:
        for f, names in zip(self._flats, self._param_names):
            for p, shape, name in zip(f.params, f.shapes, names):
                t = _local(p)
                if t.shape != shape or t.dtype != f.dtype or t.device != f.device:
                    raise RuntimeError(
                        f"DiLoCo.{where}: the local shard of parameter {name!r} changed (now {t.dtype} "
                        f"{tuple(t.shape)} on {t.device}, DiLoCo holds {f.dtype} {tuple(shape)} on {f.device}): "
                        "the model was moved, cast or re-sharded after DiLoCo was constructed")

    def _finish(self, red: Reduction, finite: Optional[bool] = None) -> None:
        if finite is None:
            # Every member of group holds the same bytes, so it agrees on its shard; the other shards
            # of the replica are synced by other groups: one 4-byte MIN over the shard group makes the
            # whole model skip (or not) together, never half of it.
            red.wait()
            flag = torch.tensor([1 if self._engine.is_finite(red) else 0], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.mesh.get_group())
            finite = bool(flag.item())
        super()._finish(red, finite)
        self._drop_unsharded()

    def _reset_params(self) -> None:
        super()._reset_params()
        self._drop_unsharded()

    def step(self, closure=None):
        loss = super().step(closure)
        if self._stream is not None:
            self._drop_unsharded()  # a merge may have written the local shards
        return loss

    def flush(self) -> None:
        super().flush()
        self._drop_unsharded()

    def _drop_unsharded(self) -> None:
        # A module left unsharded (root after a no-grad forward) would compute with its stale
        # all-gathered copy; resharding makes the next forward gather the new shards.
        for m in self._fsdp_modules:
            m.reshard()

    @property
    def group_ranks(self) -> List[int]:
        """The global ranks of the replicate group (the sync's group)."""
        return dist.get_process_group_ranks(self.group)

    def outer_state_bytes(self) -> int:
        """Bytes of anchor, momentum and residual on this rank."""
        return sum(t.numel() * t.element_size() for f in self._flats
                   for t in (f.anchor, f.momentum, f.residual) if t is not None)

    # ------------------------------------------------------------------ checkpointing
    def _key(self) -> str:
        return f"replica{self.replica_index}.shard{self.shard_index}"

    def state_dict(self) -> Dict[str, Any]:
        """A nested dict for ``torch.distributed.checkpoint`` (see the module docstring): every
        per-rank tensor under ``"replica{r}.shard{s}"``, the counters and config as plain values."""
        pending = None if self._pending is None else self._pending.state()
        if not self.inner_optimizer.state:
            self._init_inner_state()
        inner = self.inner_optimizer.state_dict()
        per_rank = {
            "params": {str(i): f.gather() for i, f in enumerate(self._flats)},
            "anchor": {str(i): f.anchor.clone() for i, f in enumerate(self._flats)},
            "momentum": {str(i): f.momentum.clone() for i, f in enumerate(self._flats) if f.momentum is not None},
            "residual": {str(i): f.residual.clone() for i, f in enumerate(self._flats) if f.residual is not None},
            "inner_state": {str(k): {name: _local(v).clone() if torch.is_tensor(v) else v for name, v in st.items()}
                            for k, st in inner["state"].items()},
            "stats": dict(self.stats),  # per rank (init_bytes, foreign_bytes differ between ranks)
        }
        if pending is None and self.overlap:
            # overlap mode: the structure a saved pending reduce is loaded into (dcp.load fills what exists)
            placeholder = self._engine.received(self._segments, self.sync_size)
            pending = {"items": placeholder.items, "residual_backup": [None] * len(self._segments)}
            pending_kinds = None
        else:
            pending_kinds = None if pending is None else [None if it is None else it[0] for it in pending["items"]]
        if self._stream is not None:
            per_rank["fragments"] = self._fragment_slots()
        if pending is not None:
            per_rank["pending"] = {
                "items": {str(i): {str(j): t for j, t in enumerate(it[1:])} for i, it in enumerate(pending["items"])
                          if it is not None},
                "residual_backup": {str(i): b for i, b in enumerate(pending["residual_backup"]) if b is not None}}
        return {
            self._key(): per_rank,
            "meta": {"local_step": self._local_step, "sync_index": self._sync_index,
                     "param_groups": inner["param_groups"], "inner_state_keys": sorted(inner["state"]),
                     "pending_kinds": pending_kinds,
                     "streaming": None if self._stream is None else {
                         "fragments": self._stream.fragments, "overlap_steps": self._stream.overlap_steps,
                         "mixing": self._stream.mixing,
                         # [fragment, due, sync_index] lists: a list of dicts would be flattened by
                         # index by DCP, and a fresh process (nothing in flight) has no such keys
                         "in_flight": [[it.fragment, it.due, it.sync_index] for it in self._stream.in_flight]},
                     "config": {"sync_every": self.sync_every, "compression": self.compression,
                                "block_size": self.block_size, "seed": self.seed, "overlap": self.overlap,
                                "numels": [f.numel for f in self._flats],
                                "replicas": self.sync_size, "shards": self.mesh.size()}},
        }

    def _fragment_slot_template(self, f: int) -> Reduction:
        """A zeroed Reduction shaped like fragment f's reduce in flight (items and residual backups)."""
        st = self._stream
        red = self._engine.received(st.segments[f], self.sync_size)
        for it in red.items:
            if it is not None:
                for t in it[1:]:
                    t.zero_()
        keep = st.overlap_steps < self.sync_every
        red.residual_backup = [torch.zeros_like(seg.residual) if keep and seg.residual is not None and seg.numel
                               else None for seg in red.segments]
        return red

    def _fragment_slots(self) -> Dict[str, Any]:
        """Streaming: one slot per fragment (at most one reduce per fragment is in flight between
        steps), holding the awaited result of its reduce in flight or zeros, so that a fresh
        process's state_dict() has every key ``dcp.load`` may fill."""
        st = self._stream
        flying = {it.fragment: it.red for it in st.in_flight}
        if len(flying) != len(st.in_flight):  # cannot happen between steps (see the module docstring)
            raise RuntimeError("DiLoCo.state_dict: expected at most one reduce in flight per fragment, got "
                               f"{[it.fragment for it in st.in_flight]}")
        slots = {}
        for f in range(st.fragments):
            if f in flying:
                got = flying[f].state()
                items, backups = got["items"], got["residual_backup"]
            else:
                red = self._fragment_slot_template(f)
                items, backups = red.items, red.residual_backup
            slots[str(f)] = {"items": {str(i): {str(j): t for j, t in enumerate(it[1:])} for i, it in enumerate(items)
                                       if it is not None},
                             "residual_backup": {str(i): b for i, b in enumerate(backups) if b is not None}}
        return slots

    def _load_fragments(self, meta_stream: Optional[Dict[str, Any]], mine: Dict[str, Any]) -> None:
        st = self._stream
        if st is None:
            if meta_stream is not None:
                raise ValueError("load_state_dict: expected a state without fragments as constructed, got a streaming "
                                 f"state (fragments={meta_stream['fragments']})")
            return
        st.check_state_settings(meta_stream)
        in_flight = []
        for f, due, sync_index in meta_stream["in_flight"]:
            slot = mine["fragments"][str(f)]
            template = self._fragment_slot_template(f)
            items = [None if it is None else (it[0],) + tuple(slot["items"][str(i)][str(j)] for j in range(len(it) - 1))
                     for i, it in enumerate(template.items)]
            backups = [None if b is None else slot["residual_backup"][str(i)]
                       for i, b in enumerate(template.residual_backup)]
            red = Reduction.from_state({"items": items, "residual_backup": backups}, st.segments[f], self.sync_size)
            in_flight.append(_InFlight(f, int(due), int(sync_index), red))
        st.in_flight = in_flight
        st._held = []

    def _init_inner_state(self) -> None:
        """Create the inner optimizer's state (as torch.distributed.checkpoint.state_dict does): one
        step with zero gradients at learning rate 0, parameters unchanged; so that a fresh DiLoCo's
        state_dict() has the structure ``dcp.load`` fills in."""
        opt = self.inner_optimizer
        params = [p for g in opt.param_groups for p in g["params"]]
        grads = [p.grad for p in params]
        lrs = [g["lr"] for g in opt.param_groups]
        for p in params:
            p.grad = torch.zeros_like(p)
        for g in opt.param_groups:
            g["lr"] = lrs[0] * 0.0 if torch.is_tensor(lrs[0]) else 0.0
        try:
            opt.step()
        finally:
            for g, lr in zip(opt.param_groups, lrs):
                g["lr"] = lr
            for p, g in zip(params, grads):
                p.grad = g

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        meta = state["meta"]
        cfg = meta["config"]
        if self._key() not in state:
            raise ValueError(f"load_state_dict: expected this rank's state under {self._key()!r}, got keys "
                             f"{sorted(k for k in state if k != 'meta')}")
        for k in ("compression", "block_size", "overlap"):
            if cfg[k] != getattr(self, k):
                raise ValueError(f"load_state_dict: expected {k}={getattr(self, k)!r} as constructed, got {cfg[k]!r}")
        layout = (self.sync_size, self.mesh.size(), [f.numel for f in self._flats])
        if (cfg["replicas"], cfg["shards"], cfg["numels"]) != layout:
            raise ValueError(f"load_state_dict: expected (replicas, shards, buffer sizes) {layout} as constructed, "
                             f"got {(cfg['replicas'], cfg['shards'], cfg['numels'])}")
        mine = state[self._key()]
        self._load_fragments(meta.get("streaming"), mine)  # checks the settings before anything changes
        inner_state = {}
        params_by_index = [p for g in self.inner_optimizer.param_groups for p in g["params"]]
        for k in meta["inner_state_keys"]:
            st = {}
            p = params_by_index[int(k)]
            for name, v in mine["inner_state"][str(k)].items():
                if torch.is_tensor(v) and _is_dtensor(p) and v.shape == _local(p).shape and v.dim() > 0:
                    v = DTensor.from_local(v.clone(), p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                           run_check=False)
                st[name] = v
            inner_state[int(k)] = st
        self.inner_optimizer.load_state_dict({"state": inner_state, "param_groups": meta["param_groups"]})
        with torch.no_grad():
            for i, f in enumerate(self._flats):
                f.write_params(mine["params"][str(i)])
                f.anchor.copy_(mine["anchor"][str(i)])
                if f.momentum is not None:
                    f.momentum.copy_(mine["momentum"][str(i)])
                if f.residual is not None:
                    f.residual.copy_(mine["residual"][str(i)])
        self._local_step = int(meta["local_step"])
        self._sync_index = int(meta["sync_index"])
        self.seed = int(cfg["seed"])
        self.stats = dict(mine["stats"])
        # the tripwire counts from here: the loaded syncs' bytes are not this process's traffic
        self._tripwire._own_bytes_mark = self.stats["bytes_sent"]
        self._tripwire._traffic_mark = self._tripwire._watched_bytes()
        self._pending = None
        if meta["pending_kinds"] is not None:
            items = []
            for i, kind in enumerate(meta["pending_kinds"]):
                if kind is None:
                    items.append(None)
                else:
                    ts = mine["pending"]["items"][str(i)]
                    items.append((kind,) + tuple(ts[str(j)] for j in range(len(ts))))
            backups = [mine["pending"]["residual_backup"].get(str(i)) for i in range(len(self._segments))]
            self._pending = Reduction.from_state({"items": items, "residual_backup": backups}, self._segments,
                                                 self.sync_size)
        self._drop_unsharded()
