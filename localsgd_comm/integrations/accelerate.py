"""DiLoCo in a hand-written ``accelerate`` loop: ``accelerator.prepare`` first, then DiLoCo.

::

    accelerator = Accelerator(gradient_accumulation_steps=4)          # after init_process_group("localsgd")
    model, opt, dl = accelerator.prepare(model, torch.optim.AdamW(model.parameters()), dl)
    diloco = prepare_diloco(model, opt, sync_every=50, compression="int8")   # the one added line
    for batch in dl:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(); opt.zero_grad()

``prepare_diloco`` puts DiLoCo *inside* the ``AcceleratedOptimizer``: ``opt.step()`` on a
micro-step of ``accelerate`` gradient accumulation is skipped by accelerate before it reaches
DiLoCo, so ``sync_every`` counts optimizer updates, not micro-steps; with a GradScaler (fp16)
``scaler.step`` reaches DiLoCo (which unscales and skips a non-finite step itself, still
counting it, so every rank syncs at the same step), ``accelerator.clip_grad_norm_`` unscales
through it, and ``opt.step_was_skipped`` stays true on an overflow. The DDP wrapper that
``prepare`` built keeps its gradients local (see "DDP under DiLoCo" in ``localsgd_comm.diloco``).
``opt.state_dict()`` is then DiLoCo's (per rank: save one file per rank for an exact resume).
"""
from __future__ import annotations

from ._common import check_process_group, diloco_kwargs, require

_acc_opt = require("accelerate.optimizer", "hf", "accelerate")

from ..diloco import DiLoCo  # noqa: E402

__all__ = ["prepare_diloco", "unwrap_diloco"]


def unwrap_diloco(optimizer):
    """The DiLoCo inside an ``AcceleratedOptimizer`` (or ``optimizer`` itself); None if there is none."""
    inner = getattr(optimizer, "optimizer", None) if isinstance(optimizer, _acc_opt.AcceleratedOptimizer) else optimizer
    return inner if isinstance(inner, DiLoCo) else None


def prepare_diloco(model, optimizer, **kwargs) -> DiLoCo:
    """Wrap the optimizer that ``accelerator.prepare`` returned in DiLoCo, in place.

    Args:
        model: the model ``accelerator.prepare`` returned (the DDP-wrapped one).
        optimizer: the ``AcceleratedOptimizer`` it returned; keep stepping it as before.
        **kwargs: :class:`localsgd_comm.DiLoCo`'s arguments (``sync_every`` required).

    Returns the DiLoCo object (``.stats``, ``.sync()``, ``.state_dict()``)."""
    kw = diloco_kwargs(kwargs)
    if not isinstance(optimizer, _acc_opt.AcceleratedOptimizer):
        raise TypeError("prepare_diloco: expected the AcceleratedOptimizer returned by accelerator.prepare(...), "
                        f"got {type(optimizer).__name__}")
    if unwrap_diloco(optimizer) is not None:
        raise ValueError("prepare_diloco: this optimizer is already wrapped by DiLoCo")
    check_distributed_type()
    check_process_group("prepare_diloco", kw.get("compression", "int8"),
                        "Call torch.distributed.init_process_group(\"localsgd\") before creating the Accelerator.")
    diloco = DiLoCo(model, optimizer.optimizer, **kw)
    install(optimizer, diloco)
    return diloco


def check_distributed_type() -> None:
    """DiLoCo replaces data parallelism's gradient all-reduce; sharded or engine-managed modes
    (DeepSpeed, FSDP, Megatron, XLA) own their communication and are refused at start."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if not PartialState._shared_state:
        return
    dt = PartialState().distributed_type
    if AcceleratorState._shared_state:
        dt = AcceleratorState().distributed_type
    refused = {DistributedType.DEEPSPEED: "DeepSpeed", DistributedType.FSDP: "FSDP",
               DistributedType.MEGATRON_LM: "Megatron-LM", DistributedType.XLA: "XLA"}
    if dt in refused:
        raise ValueError(f"DiLoCo with accelerate: expected plain data parallelism (DDP, MULTI_CPU/MULTI_GPU), got "
                         f"{refused[dt]} (distributed_type={dt}); DiLoCo keeps whole replicas and replaces DDP's "
                         "gradient all-reduce. For sharded replicas use DiLoCo(fsdp2_model, ..., "
                         "group=mesh.get_group('replicate')) in a hand-written loop")


def install(acc_opt, diloco: DiLoCo) -> None:
    """``acc_opt.optimizer <- diloco``, and accelerate's GradScaler bookkeeping re-pointed at it."""
    acc_opt.optimizer = diloco
    if acc_opt.scaler is not None:
        def patched_step(*args, **kwargs):
            # accelerate reads "was step() called" as "no overflow"; DiLoCo's step is always called
            # (the step counts on every rank), so the overflow is read from GradScaler's flag
            found_inf = diloco.__dict__.get("found_inf")
            acc_opt._accelerate_step_called = found_inf is None or float(found_inf.sum().item()) == 0.0
            return diloco.step(*args, **kwargs)

        acc_opt._optimizer_original_step_method = diloco.step
        acc_opt._optimizer_patched_step_method = patched_step
