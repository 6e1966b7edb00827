"""A hand-written ``accelerate`` loop (gradient accumulation with ``accelerator.accumulate``,
``accelerator.clip_grad_norm_``, an lr scheduler) on the tiny byte-level GPT, as plain DDP or with
``--diloco`` (``prepare_diloco`` after ``accelerator.prepare``). Launched on 2 processes by
tests/test_integrations.py. ``--save-at K`` writes each rank's state after step K;
``--resume DIR`` continues from it. Rank 0 writes a JSON report to ``--out``; every rank writes
its final parameters to ``OUT.rank{r}.pt``."""
import argparse
import json
import math
import os

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
ap.add_argument("--steps", type=int, default=24)
ap.add_argument("--sync-every", type=int, default=8)
ap.add_argument("--accum", type=int, default=2)
ap.add_argument("--save-at", type=int, default=0)
ap.add_argument("--resume", default=None)
ap.add_argument("--ckpt-dir", default="acc_ckpt")
a = ap.parse_args()
torch.set_num_threads(1)
if a.diloco:
    dist.init_process_group("localsgd")

from accelerate import Accelerator  # noqa: E402

accelerator = Accelerator(cpu=True, gradient_accumulation_steps=a.accum)
rank = accelerator.process_index
torch.manual_seed(0)
model = GPT(config_for("tiny", seq_len=64))
opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
T = a.steps * accelerator.num_processes  # accelerate steps a prepared scheduler once per process
sched = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda s: min(1.0, (s + 1) / 3) * 0.5 * (1 + math.cos(math.pi * min(s, T) / T)))
model, opt, sched = accelerator.prepare(model, opt, sched)
diloco = None
if a.diloco:
    from localsgd_comm.integrations.accelerate import prepare_diloco
    diloco = prepare_diloco(model, opt, sync_every=a.sync_every, compression="int8", outer_lr=a.outer_lr,
                            outer_momentum=a.outer_momentum)
data = ByteData(load_corpus(), seq_len=64, seed=0)
start = 0
if a.resume:
    st = torch.load(os.path.join(a.resume, f"rank{rank}.pt"), weights_only=False)
    opt.load_state_dict(st["opt"])   # DiLoCo's state: local params, inner optimizer, anchor, momentum
    sched.load_state_dict(st["sched"])
    start = st["step"]
for step in range(start, a.steps):
    for micro in range(a.accum):
        x, y = data.batch(rank, step * a.accum + micro, batch_size=8)
        with accelerator.accumulate(model):
            loss = model(x, y)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
    if a.save_at and step + 1 == a.save_at:
        os.makedirs(a.ckpt_dir, exist_ok=True)
        torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "step": step + 1},
                   os.path.join(a.ckpt_dir, f"rank{rank}.pt"))
net = accelerator.unwrap_model(model)
with torch.no_grad():
    val = sum(net(x, y).item() for x, y in data.val_batches(4, batch_size=16)) / 4
torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, f"{a.out}.rank{rank}.pt")
if rank == 0:
    report = {"val_loss": val, "world": dist.get_world_size(),
              "numel": sum(p.numel() for p in net.parameters() if p.requires_grad),
              "backend": localsgd_comm.get_backend_stats(), "diloco": None if diloco is None else dict(diloco.stats),
              "lr": sched.get_last_lr()[0]}
    with open(a.out, "w") as f:
        json.dump(report, f, default=str)
dist.barrier()
