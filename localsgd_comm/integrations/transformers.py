"""DiLoCo for ``transformers.Trainer``: :class:`DiLoCoTrainer`.

A plain DDP Trainer script becomes DiLoCo in three lines::

    from localsgd_comm.integrations.transformers import DiLoCoTrainer   # + (imports localsgd_comm)
    torch.distributed.init_process_group("localsgd")                    # + before TrainingArguments
    trainer = DiLoCoTrainer(model=model, args=args, train_dataset=train,  # ~ Trainer -> DiLoCoTrainer
                            eval_dataset=val, sync_every=50, compression="int8")

How it fits the Trainer (transformers 4.57 and 5.x): the Trainer builds the optimizer, then
``accelerator.prepare`` wraps the model in DDP and the optimizer in an ``AcceleratedOptimizer``,
and the lr scheduler is built on it. At ``on_train_begin`` (after all that, and after a resumed
run loaded ``optimizer.pt``/``scheduler.pt``) DiLoCo is built around the DDP model and the inner
optimizer and put inside the ``AcceleratedOptimizer`` (see
:mod:`localsgd_comm.integrations.accelerate`). What Trainer users rely on keeps working:

* gradient accumulation: ``sync_every`` counts optimizer updates (Trainer steps), not micro-steps;
  DDP's gradient sync stays off whatever ``no_sync`` does.
* lr schedulers act on the inner optimizer; ``max_grad_norm`` clips the local gradients;
  mixed precision (bf16 autocast; fp16 with GradScaler on GPU) as in the Trainer.
* checkpoints: every rank writes ``diloco_rank{r}.pt`` into each ``checkpoint-N`` folder (its
  local parameters, inner optimizer state, anchor, momentum, residual, counters);
  ``optimizer.pt`` holds rank 0's inner optimizer state, as a plain Trainer's would.
  ``train(resume_from_checkpoint=...)`` loads every rank's own file: bit for bit the
  uninterrupted run, also from a checkpoint in the middle of a round.
* logging: ``diloco_syncs``, ``diloco_bytes_sent`` (this rank's sync bytes) and, on a "localsgd"
  group, ``localsgd_bytes_sent`` (everything the backend counted) join each log entry.
* evaluation runs on the synced model (the anchor of the last sync, identical on every rank);
  the local parameters are put back afterwards.
* the end of training syncs a partial last round (``sync_at_end=True``), so the saved model is
  the same on every rank.

What it hooks: the public callback API (``on_train_begin``/``on_train_end``), ``log``, ``evaluate``,
and the Trainer's ``_save_optimizer_and_scheduler``/``_load_optimizer_and_scheduler`` (private,
the same in 4.57 and 5.x: checked with 4.57.1 and 5.25.0), which run on every rank.

Refused at start with a message: no process group, DeepSpeed, FSDP (``fsdp``/``fsdp_config``, or an
FSDP accelerator state). A group that is not "localsgd" (gloo, NCCL) works, with a warning: fp32
DiLoCo is unchanged there, compressed DiLoCo is composed in Python (same bytes, slower, traffic
not counted by the backend).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from ._common import (check_process_group, diloco_kwargs, finish_round, load_rank_state, log_stats, rank_state_name,
                      require, save_rank_state, synced_params)

_tf = require("transformers", "hf", "transformers")
require("accelerate", "hf", "transformers")

from . import accelerate as _acc  # noqa: E402
from ..diloco import DiLoCo  # noqa: E402

__all__ = ["DiLoCoTrainer"]

_HINT = ("Call torch.distributed.init_process_group(\"localsgd\") before creating TrainingArguments, and launch "
         "with torchrun (e.g. torchrun --nproc-per-node 2 train.py)")


class _DiLoCoHook(_tf.TrainerCallback):
    """Builds DiLoCo when training begins (after the Trainer prepared model, optimizer and
    scheduler and loaded a checkpoint), finishes the round when it ends."""

    def __init__(self, trainer: "DiLoCoTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._attach_diloco()

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer.sync_at_end:
            finish_round(self.trainer.diloco)


class DiLoCoTrainer(_tf.Trainer):
    """A ``transformers.Trainer`` whose data-parallel training is DiLoCo.

    Args:
        *args, **kwargs: the Trainer's.
        sync_every: inner steps (optimizer updates) between syncs, required.
        outer_lr, outer_momentum, nesterov, compression, block_size, error_feedback,
        stochastic_rounding, seed, overlap, state_device, on_nonfinite: :class:`localsgd_comm.DiLoCo`'s.
        sync_at_end: sync a partial last round when training ends (default True).

    ``trainer.diloco`` is the :class:`localsgd_comm.DiLoCo` object once training began.
    """

    def __init__(self, *args, sync_every: int, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 nesterov: bool = True, compression: str = "int8", block_size: Optional[int] = None,
                 error_feedback: bool = False, stochastic_rounding: bool = False, seed: int = 0,
                 overlap: bool = False, state_device=None, on_nonfinite: str = "skip", sync_at_end: bool = True,
                 **kwargs):
        self._diloco_kwargs: Dict[str, Any] = diloco_kwargs(dict(
            sync_every=sync_every, outer_lr=outer_lr, outer_momentum=outer_momentum, nesterov=nesterov,
            compression=compression, block_size=block_size, error_feedback=error_feedback,
            stochastic_rounding=stochastic_rounding, seed=seed, overlap=overlap, state_device=state_device,
            on_nonfinite=on_nonfinite))
        self.sync_at_end = bool(sync_at_end)
        self.diloco: Optional[DiLoCo] = None
        self._diloco_resume: Optional[str] = None
        args_ = kwargs.get("args", args[1] if len(args) > 1 else None)
        if args_ is not None:
            _check_training_args(args_)
        super().__init__(*args, **kwargs)
        _check_training_args(self.args)
        if self.is_deepspeed_enabled or getattr(self, "is_fsdp_enabled", False):
            raise ValueError("DiLoCoTrainer: expected plain data parallelism, got "
                             f"{'DeepSpeed' if self.is_deepspeed_enabled else 'FSDP'} in the accelerator state")
        _acc.check_distributed_type()
        check_process_group("DiLoCoTrainer", compression, _HINT)
        self.add_callback(_DiLoCoHook(self))

    # ---------------------------------------------------------------- DiLoCo around the prepared objects
    def _attach_diloco(self) -> None:
        if self.diloco is not None:
            return  # a second train() call keeps the DiLoCo of the first
        opt = self.optimizer
        inner = opt.optimizer if isinstance(opt, _acc._acc_opt.AcceleratedOptimizer) else opt
        self.diloco = DiLoCo(self.model_wrapped, inner, **self._diloco_kwargs)
        if inner is opt:
            self.optimizer = self.diloco
        else:
            _acc.install(opt, self.diloco)
        for name in ("optimizer",):
            setattr(self.callback_handler, name, self.optimizer)
        if self._diloco_resume is not None:
            path = os.path.join(self._diloco_resume, rank_state_name(self.diloco.rank))
            load_rank_state(self.diloco, path, self._diloco_resume, "DiLoCoTrainer")

    # ---------------------------------------------------------------- checkpoints: one DiLoCo file per rank
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        d = self.diloco
        if d is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        save_rank_state(d, os.path.join(output_dir, rank_state_name(d.rank)))
        # optimizer.pt: rank 0's inner optimizer state, the file a plain Trainer writes and reads
        opt = self.optimizer
        if opt is d:
            self.optimizer = d.inner_optimizer
        else:
            opt.optimizer = d.inner_optimizer
        try:
            super()._save_optimizer_and_scheduler(output_dir)
        finally:
            if opt is d:
                self.optimizer = d
            else:
                opt.optimizer = d

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if checkpoint is not None:
            if self.diloco is not None:
                raise RuntimeError("DiLoCoTrainer: resuming in a second train() call of the same trainer is not "
                                   "supported; build a new DiLoCoTrainer to resume")
            self._diloco_resume = checkpoint  # loaded once DiLoCo is built (on_train_begin)
        return super()._load_optimizer_and_scheduler(checkpoint)

    # ---------------------------------------------------------------- logs and evaluation
    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        logs.update(log_stats(self.diloco))
        return super().log(logs, *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        """The Trainer's evaluation, on the synced model (the anchor of the last sync)."""
        with synced_params(self.diloco):
            return super().evaluate(*args, **kwargs)


def _check_training_args(args) -> None:
    if getattr(args, "deepspeed", None):
        raise ValueError("DiLoCoTrainer: expected no DeepSpeed (TrainingArguments.deepspeed is set); DiLoCo keeps "
                         "whole replicas and replaces DDP's gradient all-reduce, DeepSpeed ZeRO shards them")
    fsdp = getattr(args, "fsdp", None)
    if fsdp:
        raise ValueError(f"DiLoCoTrainer: expected no FSDP (TrainingArguments.fsdp={fsdp!r}); DiLoCo keeps whole "
                         "replicas. For sharded replicas use DiLoCo(fsdp2_model, ..., "
                         "group=mesh.get_group('replicate')) in a hand-written loop")
