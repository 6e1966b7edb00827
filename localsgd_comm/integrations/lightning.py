"""DiLoCo for PyTorch Lightning: :class:`DiLoCoStrategy`, a ``DDPStrategy``.

A ``Trainer(strategy="ddp")`` script becomes DiLoCo in two lines::

    from localsgd_comm.integrations.lightning import DiLoCoStrategy          # +
    trainer = L.Trainer(strategy=DiLoCoStrategy(sync_every=50), accelerator="cpu", devices=2)  # ~

The strategy creates the process group itself with the "localsgd" backend
(``process_group_backend=`` chooses another), wraps the model in DDP as ``DDPStrategy`` does,
and after Lightning set up the optimizer wraps it in :class:`localsgd_comm.DiLoCo` (DDP's
gradients stay local, see "DDP under DiLoCo" in ``localsgd_comm.diloco``). What Lightning users
rely on keeps working:

* ``accumulate_grad_batches``: ``sync_every`` counts optimizer steps, not micro-batches.
* lr schedulers from ``configure_optimizers`` act on the inner optimizer; gradient clipping
  clips the local gradients; precision plugins (``"bf16-mixed"``, ``"16-mixed"`` with its
  GradScaler on GPU) step through DiLoCo.
* checkpoints: next to every checkpoint file ``X.ckpt`` every rank writes ``X.ckpt.diloco_rank{r}.pt``
  (its local parameters, inner optimizer state, anchor, momentum, residual, counters); the
  ``.ckpt`` itself holds rank 0's inner optimizer state, as with ``DDPStrategy``.
  ``trainer.fit(ckpt_path=...)`` loads every rank's own file: bit for bit the uninterrupted run,
  also from a checkpoint in the middle of a round.
* logging: ``diloco_syncs``, ``diloco_bytes_sent`` and (on a "localsgd" group)
  ``localsgd_bytes_sent`` are logged every step (rank 0's values).
* validation runs on the synced model (the anchor of the last sync, identical on every rank).
* the end of ``fit`` syncs a partial last round (``sync_at_end=True``).

Refused with a message: more than one optimizer, DDP communication hooks or post-local-SGD
model averaging (DiLoCo replaces them).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from ._common import (check_process_group, diloco_kwargs, finish_round, load_rank_state, log_stats, require,
                      save_rank_state, synced_params)

require("lightning", "lightning", "lightning")
from lightning.pytorch.core.optimizer import LightningOptimizer  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from lightning.pytorch.trainer.states import TrainerFn  # noqa: E402

from ..diloco import DiLoCo  # noqa: E402

__all__ = ["DiLoCoStrategy"]


def _rank_file(ckpt_path: str, rank: int) -> str:
    # a ``last.ckpt`` symlink (ModelCheckpoint(save_last="link")) points at the file the ranks wrote next to
    return f"{os.path.realpath(ckpt_path)}.diloco_rank{rank}.pt"


class DiLoCoStrategy(DDPStrategy):
    """Lightning's DDP strategy with DiLoCo around the optimizer.

    Args:
        sync_every: inner steps (optimizer steps) between syncs, required.
        outer_lr, outer_momentum, nesterov, compression, block_size, error_feedback,
        stochastic_rounding, seed, overlap, state_device, on_nonfinite: :class:`localsgd_comm.DiLoCo`'s.
        sync_at_end: sync a partial last round when ``fit`` ends (default True).
        log_stats: log syncs and bytes every step (default True).
        process_group_backend: default ``"localsgd"``.
        **kwargs: ``DDPStrategy``'s (``find_unused_parameters``, ``static_graph``, ``timeout``, ...).

    ``strategy.diloco`` is the :class:`localsgd_comm.DiLoCo` object once ``fit`` set up.
    """

    strategy_name = "diloco"

    def __init__(self, sync_every: int, *, outer_lr: float = 0.7, outer_momentum: float = 0.9, nesterov: bool = True,
                 compression: str = "int8", block_size: Optional[int] = None, error_feedback: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0, overlap: bool = False, state_device=None,
                 on_nonfinite: str = "skip", sync_at_end: bool = True, log_stats: bool = True,
                 process_group_backend: Optional[str] = "localsgd", **kwargs: Any):
        for k in ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period"):
            if kwargs.get(k) is not None:
                raise ValueError(f"DiLoCoStrategy: expected no {k} (DiLoCo keeps DDP's gradients local and replaces "
                                 "post-local-SGD averaging with its outer step), got one")
        self._diloco_kwargs = diloco_kwargs(dict(
            sync_every=sync_every, outer_lr=outer_lr, outer_momentum=outer_momentum, nesterov=nesterov,
            compression=compression, block_size=block_size, error_feedback=error_feedback,
            stochastic_rounding=stochastic_rounding, seed=seed, overlap=overlap, state_device=state_device,
            on_nonfinite=on_nonfinite))
        from ..diloco.inner import check_outer_args  # the argument errors at construction, not at fit()
        check_outer_args(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), sync_every, outer_lr,
                         outer_momentum, compression, error_feedback)
        self.sync_at_end = bool(sync_at_end)
        self.log_stats = bool(log_stats)
        self.diloco: Optional[DiLoCo] = None
        self._resume_path: Optional[str] = None
        super().__init__(process_group_backend=process_group_backend, **kwargs)

    # ---------------------------------------------------------------- set-up: DiLoCo around the optimizer
    def setup(self, trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        check_process_group("DiLoCoStrategy", self._diloco_kwargs["compression"],
                            "DiLoCoStrategy creates it in setup_environment (process_group_backend='localsgd').")
        opts = [o._optimizer if isinstance(o, LightningOptimizer) else o for o in self.optimizers]
        if len(opts) != 1:
            raise ValueError(f"DiLoCoStrategy: expected configure_optimizers to return one optimizer, got {len(opts)} "
                             "(DiLoCo wraps the optimizer over all of the model's parameters)")
        if isinstance(opts[0], DiLoCo):
            self.diloco = opts[0]  # a second fit() on the same trainer
            return
        self.diloco = DiLoCo(self.model, opts[0], **self._diloco_kwargs)
        self.optimizers = [self.diloco]

    # ---------------------------------------------------------------- steps and logs
    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.log_stats and self.diloco is not None and self.lightning_module is not None:
            self.lightning_module.log_dict(log_stats(self.diloco), on_step=True, on_epoch=False, rank_zero_only=True)
        return out

    def on_train_end(self) -> None:
        if self.sync_at_end:
            finish_round(self.diloco)
        super().on_train_end()

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._eval_ctx = None
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:  # validation inside fit()
            self._eval_ctx = synced_params(self.diloco)
            self._eval_ctx.__enter__()

    def on_validation_end(self) -> None:
        ctx, self._eval_ctx = getattr(self, "_eval_ctx", None), None
        if ctx is not None:
            ctx.__exit__(None, None, None)
        super().on_validation_end()

    # ---------------------------------------------------------------- checkpoints: one DiLoCo file per rank
    def optimizer_state(self, optimizer):
        opt = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        if isinstance(opt, DiLoCo):
            return opt.inner_optimizer.state_dict()  # the .ckpt stays a plain DDPStrategy checkpoint
        return super().optimizer_state(optimizer)

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        if self.diloco is not None:
            save_rank_state(self.diloco, _rank_file(str(filepath), self.diloco.rank))

    def remove_checkpoint(self, filepath) -> None:
        if self.diloco is not None:
            path = _rank_file(str(filepath), self.diloco.rank)
            if os.path.exists(path):
                os.remove(path)
        super().remove_checkpoint(filepath)

    def load_checkpoint(self, checkpoint_path, *args, **kwargs):
        self._resume_path = str(checkpoint_path)
        return super().load_checkpoint(checkpoint_path, *args, **kwargs)

    def load_optimizer_state_dict(self, checkpoint) -> None:
        if self.diloco is None or self._resume_path is None:
            return super().load_optimizer_state_dict(checkpoint)
        load_rank_state(self.diloco, _rank_file(self._resume_path, self.diloco.rank), self._resume_path,
                        "DiLoCoStrategy")
