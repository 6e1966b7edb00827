"""A transformers.Trainer script on a tiny GPT-2 (built from a config) and the embedded text,
as plain DDP or with ``--diloco`` as DiLoCoTrainer; launched on 2 processes by
tests/test_integrations.py (torchrun-style environment). Rank 0 writes a JSON report to
``--out``; every rank writes its final parameters to ``OUT.rank{r}.pt``."""
import argparse
import json
import os

import torch
import torch.distributed as dist

import localsgd_comm
from localsgd_comm.data import load_corpus

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--diloco", action="store_true")
ap.add_argument("--outer-lr", type=float, default=0.7)
ap.add_argument("--outer-momentum", type=float, default=0.9)
ap.add_argument("--backend", default=None, help="init this process group first (default: DiLoCo: localsgd)")
ap.add_argument("--max-steps", type=int, default=24)
ap.add_argument("--sync-every", type=int, default=8)
ap.add_argument("--accum", type=int, default=1)
ap.add_argument("--save-steps", type=int, default=0)
ap.add_argument("--resume", default=None)
ap.add_argument("--output-dir", default="hf_out")
ap.add_argument("--bf16", action="store_true")
ap.add_argument("--deepspeed", default=None)
ap.add_argument("--fsdp", default="")
a = ap.parse_args()

torch.set_num_threads(1)
backend = a.backend or ("localsgd" if a.diloco else None)
if backend:
    dist.init_process_group(backend)

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

SEQ = 64


class Windows(torch.utils.data.Dataset):
    def __init__(self, data, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.data, self.starts = data, torch.randint(0, len(data) - SEQ, (n,), generator=g)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        x = self.data[self.starts[i]:self.starts[i] + SEQ]
        return {"input_ids": x, "labels": x}


text = torch.frombuffer(bytearray(load_corpus()), dtype=torch.uint8).long()
n_val = len(text) // 20
train, val = Windows(text[:-n_val], 4096, 0), Windows(text[-n_val:], 64, 1)
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
args = TrainingArguments(output_dir=a.output_dir, max_steps=a.max_steps, per_device_train_batch_size=8,
                         per_device_eval_batch_size=16, gradient_accumulation_steps=a.accum, learning_rate=2e-3,
                         lr_scheduler_type="cosine", warmup_steps=2, max_grad_norm=1.0, logging_steps=4,
                         save_strategy="steps" if a.save_steps else "no", save_steps=a.save_steps or 500,
                         report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0, bf16=a.bf16,
                         disable_tqdm=True, deepspeed=a.deepspeed, fsdp=a.fsdp)
kw = dict(model=model, args=args, train_dataset=train, eval_dataset=val)
if a.diloco:
    from localsgd_comm.integrations.transformers import DiLoCoTrainer
    trainer = DiLoCoTrainer(**kw, sync_every=a.sync_every, compression="int8", outer_lr=a.outer_lr,
                            outer_momentum=a.outer_momentum)
else:
    trainer = Trainer(**kw)
trainer.train(resume_from_checkpoint=a.resume)
ev = trainer.evaluate()
rank = dist.get_rank()
torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{a.out}.rank{rank}.pt")
if rank == 0:
    d = getattr(trainer, "diloco", None)
    report = {"val_loss": ev["eval_loss"], "world": dist.get_world_size(),
              "numel": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "backend": localsgd_comm.get_backend_stats(), "diloco": None if d is None else dict(d.stats),
              "log_history": trainer.state.log_history, "global_step": trainer.state.global_step}
    with open(a.out, "w") as f:
        json.dump(report, f, default=str)
dist.barrier()
dist.destroy_process_group()
