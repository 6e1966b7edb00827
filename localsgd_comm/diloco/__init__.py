"""DiLoCo / local SGD: a drop-in wrapper around an existing inner optimizer.

Usage (an existing DDP script changes in three lines)::

    dist.init_process_group("localsgd")
    model = DDP(model)
    opt = localsgd_comm.DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=3e-4), sync_every=50)
    for batch in loader:
        loss = model(batch); loss.backward(); opt.step(); opt.zero_grad()

What happens
------------
* Construction checks that every rank of the sync group passed the same settings and holds the
  same parameter layout (one all-gather of two digests, :mod:`.agreement`: a rank constructed
  differently makes every rank raise a ``ValueError`` naming each differing setting), then
  broadcasts every parameter (and buffer) from rank 0 of ``group`` so all
  replicas, and hence all anchors, start identical. Trainable parameters are moved into one
  flat buffer per (device, dtype) by re-pointing ``p.data`` at a slice of it: the fused ops
  then run once per sync over the whole model instead of once per tensor. The anchor (and
  the outer momentum and error-feedback residual) are flat fp32 buffers on the parameters'
  device, or on ``state_device`` (e.g. ``"cpu"`` to save accelerator memory).
* ``step()`` runs the inner optimizer. Every ``sync_every`` inner steps it syncs (the outer-step
  engine, :mod:`localsgd_comm.diloco.engine`, shared with elastic DiLoCo):
  ``delta = anchor - params`` (+ residual with error feedback) is compressed in one fused
  pass (``functional.compress_delta``), averaged with the backend's compressed all-reduce
  (``all_reduce_compressed``; ``compression="none"``: an exact fp32 sum, see
  ``collectives.exact_sum``), and the outer step ``torch.optim.SGD(outer_lr, momentum=outer_momentum, nesterov)`` is applied to
  the anchor reading the gradient straight from the reduced bytes
  (``functional.outer_nesterov_step_compressed``), which also writes ``params = anchor``.
* ``compression="none", outer_lr=1, outer_momentum=0`` (plain model averaging) reduces the
  parameters themselves instead of ``anchor - params``: exact, so one worker with
  ``sync_every=1`` reproduces plain training bit for bit (not in overlap mode, whose delayed
  step needs the pseudo-gradient itself).
* Replicas are bitwise identical after every sync: every rank dequantizes the same reduced
  bytes into the same anchor with the same fp32 arithmetic.
* With a ``DistributedDataParallel`` model (also inside ``torch.compile``, before or after the
  DDP wrapper) no gradient crosses the wire between syncs, whatever the script does with DDP:
  see "DDP under DiLoCo" below.

DDP under DiLoCo
----------------
Real scripts drive DDP themselves: gradient accumulation sets
``model.require_backward_grad_sync = (micro_step == last)`` on every micro-step or enters
``model.no_sync()``; so a flag set once at construction does not hold. DiLoCo makes local
gradients a property of the wrapped DDP object instead:

1. ``require_backward_grad_sync`` reads ``False`` for good (the object's class is swapped for a
   subclass of its own class with that read-only property; what the script writes is recorded
   and ignored). DDP then takes the path of ``no_sync()`` on every forward: no
   ``prepare_for_backward``, no bucket copies, no unused-parameter map all-reduce with
   ``find_unused_parameters``, no bucket rebuild broadcast, no per-forward buffer broadcast.
   With ``static_graph=True`` the first iteration's delayed all-reduce is switched off too.
2. A communication hook that completes locally with the local gradient (it sends nothing) is
   registered, so that any path into DDP's reducer that bypasses the flag still sends nothing;
   it counts its calls. A hook the script registered before is reported at construction (it
   will not run); registering one afterwards raises.
3. A tripwire: at every sync DiLoCo compares the bytes the group's "localsgd" backend counted
   since the previous sync with what its own sync sent. Other traffic of at least a quarter of
   one fp32 all-reduce of the model (a DDP wrapper DiLoCo was not given, the script's own
   collectives) is reported once with its byte count (``RuntimeWarning``), and counted in
   ``stats["foreign_bytes"]`` either way. Groups of other backends keep no counters; there the
   hook's call count is the check.

Parameters must stay where DiLoCo put them: they are views of its flat buffers. ``model.to(...)``
with another dtype or device, ``.half()``, ``load_state_dict(..., assign=True)`` and the like
after construction replace them; the next ``step()`` or sync raises a ``RuntimeError`` naming the
parameter (move or cast the model before constructing DiLoCo).

Training-script features
------------------------
* ``DiLoCo`` is a ``torch.optim.Optimizer``: ``torch.optim.lr_scheduler`` objects can be built on
  it, and ``param_groups`` is the inner optimizer's list, so writing
  ``opt.param_groups[i]["lr"]`` sets the inner learning rate.
* ``torch.amp.GradScaler``: ``scaler.step(opt)`` hands DiLoCo the scale and the found-inf flag
  (``_step_supports_amp_scaling``) instead of skipping the call. A rank whose gradients hold an
  inf/NaN skips its inner update (as GradScaler does), but its step still counts, so every rank
  syncs at the same step; ``scaler.unscale_(opt)`` and ``clip_grad_norm_`` work as usual.
* Checkpoints: ``opt.state_dict()`` holds this rank's inner-optimizer state and local parameters
  plus the shared anchor and momentum; loading on the same rank resumes bit for bit. Between
  syncs ranks differ, so for an exact resume save one file per rank (a checkpoint saved on rank 0
  only and loaded everywhere gives every rank rank 0's local state; a warning says so).

Parameters of special kinds
---------------------------
* frozen (``requires_grad=False``): not synced; they are broadcast once at construction and
  stay identical as long as nothing changes them.
* never receiving a gradient: their delta is zero, the outer step leaves them in place (or
  moves them by the outer momentum built up earlier, identically on every rank).
* tied weights (the same ``Parameter`` reachable twice): synced once.
* bf16/fp16 parameters: kept in their dtype; anchor, momentum and residual are fp32, the
  outer step writes ``params = anchor`` rounded to nearest once.
* Module buffers (e.g. BatchNorm statistics): averaged across the group at every sync (floating
  ones, in fp32; integer ones such as ``num_batches_tracked`` are broadcast from rank 0), only
  those some rank changed since the previous sync (``module_buffers.py``);
  ``sync_buffers=False`` leaves each rank's buffers its own.

Sharded replicas (FSDP2)
------------------------
A model sharded with ``fully_shard(module, mesh=mesh["shard"])`` on a 2-D mesh
``("replicate", "shard")`` is synced across ``group=mesh.get_group("replicate")`` shard by shard,
with outer state for the local shards only: see :mod:`localsgd_comm.diloco.sharded`. Module
buffers (which FSDP2 does not shard) are averaged over every rank of every replica at each sync,
as hierarchical mode averages them over its whole world.

Non-finite pseudo-gradients
---------------------------
A NaN/Inf in any rank's delta makes the affected block's scale NaN in the reduced bytes
(format.h NaN/Inf contract; for ``"none"`` the fp32 sum is non-finite). After the all-reduce
every rank holds the same bytes, so checking them gives every rank the same decision without
an extra collective (hierarchical mode, where ranks of a cluster hold different shards, adds
one 4-byte all-reduce inside the cluster). ``on_nonfinite="skip"`` warns, leaves anchor and
momentum untouched, restores the residual and resets the parameters to the anchor (the
round's local progress is discarded on every rank); ``"raise"`` raises ``FloatingPointError``
on every rank after the same reset. No rank ever updates while another does not.

Overlap mode (``overlap=True``): the delayed outer step
-------------------------------------------------------
The all-reduce launched at sync ``k`` runs in the background while round ``k+1``'s inner
steps proceed; its result is applied at sync ``k+1``. Precisely, with ``theta`` the anchor:

1. at sync ``k``: ``delta_k = theta - params`` (``theta`` is the point round ``k`` started
   from), compress it and launch its all-reduce asynchronously;
2. if sync ``k-1``'s reduce is pending, wait for it and apply the outer step with its result
   ``g_{k-1}``: ``theta <- OuterSGD(theta, g_{k-1})``;
3. ``params <- theta``: round ``k+1`` starts from the anchor, identical on all replicas.

With ``compression="none"`` on a "localsgd" group only the reduce-scatter half of the fp32 sum
runs in the background; the all-gather half runs when the result is awaited. With error
feedback, a skipped (non-finite) update cannot restore the residual (it has moved on by one
sync): only its non-finite entries are zeroed.

So the anchor follows outer SGD with a one-round-stale pseudo-gradient (the gradient applied
at sync ``k`` was computed from the anchor of one outer step earlier), and sync 1 applies
nothing. :meth:`flush` waits for and applies the pending update (call it before evaluating
or saving the final model); :meth:`state_dict` waits for the pending reduce and stores its
result, so a resumed run applies it at its next sync exactly as the uninterrupted run would.

Hierarchical mode (``hierarchy=new_hierarchical_groups(ranks_per_cluster)``)
--------------------------------------------------------------------------
Ranks form clusters of consecutive ranks. Inside a cluster the gradients are all-reduced
every inner step in fp32 (by DDP when the model is DDP-wrapped over ``hierarchy.intra``,
otherwise by this class, over one flat gradient buffer), so all members of a cluster hold
the same parameters. The DiLoCo sync between clusters is sharded: member ``j`` of every
cluster owns the ``j``-th block-aligned shard of each flat buffer and runs the compressed
all-reduce and the outer step for that shard only over ``hierarchy.cross`` (member ``j`` of
every cluster), so each pseudo-gradient byte crosses the slow link once. The updated anchor
shards are then all-gathered in fp32 inside the cluster. Momentum and residual are only
meaningful on the owned shard (they are per-rank state, saved per rank).

Streaming mode (``fragments=P, overlap_steps=TAU, mixing=ALPHA``)
-----------------------------------------------------------------
The model syncs in P fragments staggered over the H steps (one fragment sync every H/P steps,
each fragment once per H), each fragment's all-reduce in the background for TAU inner steps,
then merged: ``params_f <- ALPHA params_f + (1 - ALPHA) anchor_f``. ``fragments=1,
overlap_steps=0`` is plain DiLoCo bit for bit; ``fragments=1, overlap_steps=H, mixing=0`` is
``overlap=True``. The fragment rule, the schedule, the bound on TAU, the ordering with other
collectives, the non-finite policy and checkpoints: :mod:`localsgd_comm.diloco.streaming`.
With ``hierarchy``, the gradients are still averaged in fp32 inside each cluster every step
and the cross-cluster sync is streamed: member ``j`` of every cluster syncs the ``j``-th
block-aligned shard of each fragment, the fragment's anchor is all-gathered inside the cluster
at its merge (:mod:`localsgd_comm.diloco.hierarchical`); ``fragments=1, overlap_steps=0`` is
hierarchical DiLoCo bit for bit.
"""
from __future__ import annotations

# By concern: optimizer.py (DiLoCo: arguments, schedule, checkpoints), engine.py (pseudo-gradient,
# error feedback, all-reduce, outer Nesterov step; shared with elastic DiLoCo), collectives.py (the
# groups the engine reduces over, the exact fp32 sum), buffers.py (flat block-aligned buffers and
# their segments), ddp.py (DDP under DiLoCo, the tripwire), hierarchical.py, sharded.py (FSDP2-sharded
# replicas), inner.py (the inner optimizer behind the wrapper, GradScaler).
from .hierarchical import HierarchicalGroups, new_hierarchical_groups
from .optimizer import DiLoCo

__all__ = ["DiLoCo", "HierarchicalGroups", "new_hierarchical_groups"]
