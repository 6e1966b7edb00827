"""A Lightning script on the tiny byte-level GPT and the embedded text, as plain
``strategy="ddp"`` or with ``--diloco`` as ``DiLoCoStrategy``; launched on 2 processes by
tests/test_integrations.py (torchrun-style environment, which Lightning picks up). Rank 0 writes
a JSON report to ``--out``; every rank writes its final parameters to ``OUT.rank{r}.pt``."""
import argparse
import json
import math
import os

import lightning as L
import torch
import torch.distributed as dist

import localsgd_comm
from localsgd_comm.data import ByteData, load_corpus
from localsgd_comm.model import GPT, config_for

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--diloco", action="store_true")
ap.add_argument("--outer-lr", type=float, default=0.7)
ap.add_argument("--outer-momentum", type=float, default=0.9)
ap.add_argument("--max-steps", type=int, default=24)
ap.add_argument("--sync-every", type=int, default=8)
ap.add_argument("--accum", type=int, default=1)
ap.add_argument("--ckpt-dir", default="ckpt")
ap.add_argument("--resume", default=None)
ap.add_argument("--precision", default="32-true")
a = ap.parse_args()
torch.set_num_threads(1)
SEQ = 64


class Windows(torch.utils.data.Dataset):
    def __init__(self, src, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.src, self.starts = src, torch.randint(0, len(src) - SEQ - 1, (n,), generator=g)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        w = self.src[self.starts[i]:self.starts[i] + SEQ + 1]
        return w[:-1], w[1:]


def warmup_cosine(s, total):
    return min(1.0, (s + 1) / 3) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))


class LitGPT(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = GPT(config_for("tiny", seq_len=SEQ))
        self.trace = []

    def training_step(self, batch, _):
        self.trace.append([self.global_step, int(batch[0].sum())])  # which data each step saw
        loss = self.net(*batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, a.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


data = ByteData(load_corpus(), seq_len=SEQ, seed=0)
L.seed_everything(0, verbose=False)
model = LitGPT()
# 96 windows, 2 ranks x batch 8: 6 optimizer steps per epoch. A checkpoint every 12 steps, saved after the
# last batch of an epoch: Lightning resumes such a checkpoint exactly (mid-epoch ones only with a
# resumable dataloader); with sync_every 8 step 12 is in the middle of a round
train_dl = torch.utils.data.DataLoader(Windows(data.train, 96 * a.accum, 0), batch_size=8, shuffle=True)
ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=a.ckpt_dir, every_n_train_steps=12, save_top_k=-1)
if a.diloco:
    from localsgd_comm.integrations.lightning import DiLoCoStrategy
    strategy = DiLoCoStrategy(sync_every=a.sync_every, outer_lr=a.outer_lr, outer_momentum=a.outer_momentum)
else:
    strategy = "ddp"
trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_steps=a.max_steps, callbacks=[ckpt],
                    accumulate_grad_batches=a.accum, gradient_clip_val=1.0, precision=a.precision,
                    logger=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
trainer.fit(model, train_dl, ckpt_path=a.resume)
rank = dist.get_rank()
with torch.no_grad():
    model.eval()
    val = sum(model.net(x, y).item() for x, y in data.val_batches(4, batch_size=16)) / 4
torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{a.out}.rank{rank}.pt")
if rank == 0:
    d = getattr(trainer.strategy, "diloco", None)
    report = {"val_loss": val, "world": dist.get_world_size(), "global_step": trainer.global_step,
              "numel": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "backend": localsgd_comm.get_backend_stats(), "diloco": None if d is None else dict(d.stats),
              "logged": {k: float(v) for k, v in trainer.callback_metrics.items()},
              "ckpts": sorted(os.listdir(a.ckpt_dir)), "trace": model.trace}
    with open(a.out, "w") as f:
        json.dump(report, f, default=str)
dist.barrier()
