"""A DDP training script shaped like the widely used public GPT scripts (nanoGPT's train.py and
its kin), used by tests/test_drop_in.py to check that DiLoCo is a drop-in for them.

It does what those scripts do: its own model definition (with a causal-mask buffer, as older
scripts keep one), ``torch.compile``, DDP, gradient accumulation that sets
``model.require_backward_grad_sync`` on every micro-step (or uses ``no_sync()``), autocast with
``torch.amp.GradScaler`` (enabled for fp16 only), ``scaler.unscale_`` + ``clip_grad_norm_``, a
learning-rate schedule written into ``optimizer.param_groups`` every iteration (or a
``torch.optim.lr_scheduler`` object), and a checkpoint dict holding ``model``, ``optimizer``,
``scaler``, ``iter_num``, saved and resumed in a fresh process.

``--diloco`` applies the README's three-line change (import, ``--backend=localsgd``, the
``DiLoCo`` wrapper right after the ``DDP(...)`` line). Launched like torchrun: RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT in the environment. Rank 0 writes ``--out`` (JSON: losses, learning
rates, backend counters, TCP bytes, DiLoCo stats); every rank writes its final parameters to
``--out`` + ``.rank{r}.pt``.
"""
import argparse
import json
import math
import os
import re
import subprocess

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import localsgd_comm
from localsgd_comm.data import ByteData, load_corpus


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, block_size):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head = n_head
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, block_size):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab=256, block_size=64, n_layer=2, n_head=2, n_embd=64, unused_head=False):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head, block_size) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT
        # a parameter that never gets a gradient: what find_unused_parameters exists for
        self.aux_head = nn.Linear(n_embd, 2) if unused_head else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, targets):
        T = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))


def tcp_bytes_sent():
    """Bytes this process sent over its open TCP sockets (``ss``; None where it is missing)."""
    try:
        out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total, lines, me = 0, out.splitlines(), f"pid={os.getpid()},"
    for i, line in enumerate(lines):
        if me in line:
            m = re.search(r"bytes_sent:(\d+)", line + " " + (lines[i + 1] if i + 1 < len(lines) else ""))
            if m:
                total += int(m.group(1))
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--diloco", action="store_true")
    ap.add_argument("--compression", default="int8")
    ap.add_argument("--sync-every", type=int, default=10)
    ap.add_argument("--max-iters", type=int, default=40)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--accum-style", choices=["flag", "no_sync"], default="flag")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--lr-schedule", choices=["manual", "scheduler", "constant"], default="manual")
    ap.add_argument("--compile", choices=["no", "before_ddp", "after_ddp"], default="no")
    ap.add_argument("--find-unused", action="store_true")
    ap.add_argument("--static-graph", action="store_true")
    ap.add_argument("--bucket-view", action="store_true")
    ap.add_argument("--to-after-wrap", default="", help="a dtype to move the model to after wrapping")
    ap.add_argument("--wrap-inner", action="store_true", help="a mistake: DiLoCo given model.module, not the DDP model")
    ap.add_argument("--init-scale", type=float, default=2.0**10)
    ap.add_argument("--save-at", type=int, default=-1)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--ckpt-dir", default="")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group(backend="localsgd" if a.diloco else os.environ.get("TEST_DDP_BACKEND", "localsgd"))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1337)
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[a.dtype]
    ctx = torch.amp.autocast(device_type="cpu", dtype=ptdtype, enabled=a.dtype != "float32")
    scaler = torch.amp.GradScaler("cpu", enabled=(a.dtype == "float16"), init_scale=a.init_scale)

    block_size, batch_size = 64, 8
    model = GPT(block_size=block_size, unused_head=a.find_unused)
    iter_num = 0
    ckpt_path = os.path.join(a.ckpt_dir, f"ckpt_rank{rank}.pt") if a.ckpt_dir else ""
    checkpoint = None
    if a.resume:
        checkpoint = torch.load(ckpt_path, map_location="cpu")  # weights_only default, as scripts do now
        model.load_state_dict(checkpoint["model"])
        iter_num = checkpoint["iter_num"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    if a.compile == "before_ddp":
        model = torch.compile(model)
    model = DDP(model, find_unused_parameters=a.find_unused, static_graph=a.static_graph,
                gradient_as_bucket_view=a.bucket_view)
    if a.compile == "after_ddp":
        model = torch.compile(model)
    if a.diloco:
        optimizer = localsgd_comm.DiLoCo(model.module if a.wrap_inner else model, optimizer, sync_every=a.sync_every, compression=a.compression,
                                         outer_momentum=0.6)
    scheduler = None
    if a.lr_schedule == "scheduler":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 / (1.0 + 0.05 * it))
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
    if a.to_after_wrap:
        model.to(getattr(torch, a.to_after_wrap))
    raw_model = model.module if hasattr(model, "module") else model

    def get_lr(it):  # warmup then cosine, as nanoGPT
        warmup, lr_decay_iters, lr, min_lr = 5, a.max_iters, 1e-3, 1e-4
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = min((it - warmup) / max(lr_decay_iters - warmup, 1), 1.0)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    data = ByteData(load_corpus(), seq_len=block_size, seed=0)
    ddp_model = model._orig_mod if a.compile == "after_ddp" else model
    losses, lrs = [], []
    while iter_num < a.max_iters:
        if a.lr_schedule == "manual":
            lr = get_lr(iter_num)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
        for micro_step in range(a.accum):
            X, Y = data.batch(rank, iter_num * a.accum + micro_step, batch_size)
            last = micro_step == a.accum - 1
            if a.accum_style == "flag":
                ddp_model.require_backward_grad_sync = last
                with ctx:
                    loss = model(X, Y) / a.accum
                scaler.scale(loss).backward()
            elif last:
                with ctx:
                    loss = model(X, Y) / a.accum
                scaler.scale(loss).backward()
            else:
                with ddp_model.no_sync():
                    with ctx:
                        loss = model(X, Y) / a.accum
                    scaler.scale(loss).backward()
        if a.grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item() * a.accum)
        inner = optimizer.inner_optimizer if a.diloco else optimizer
        lrs.append(inner.param_groups[0]["lr"])
        iter_num += 1
        if iter_num == a.save_at:
            checkpoint = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scaler": scaler.state_dict(), "iter_num": iter_num}
            if scheduler is not None:
                checkpoint["scheduler"] = scheduler.state_dict()
            torch.save(checkpoint, ckpt_path)
            break

    with torch.no_grad():
        xv, yv = data.val_batches(1, batch_size=batch_size)[0]
        val = model(xv, yv).item()
    tcp = tcp_bytes_sent()
    stats = localsgd_comm.get_backend_stats()
    params = {n: p.detach().clone() for n, p in raw_model.named_parameters()}
    torch.save(params, f"{a.out}.rank{rank}.pt")
    if rank == 0:
        out = {"losses": losses, "lrs": lrs, "val_loss": val, "tcp_bytes_sent": tcp, "backend": stats,
               "world": world, "numel": sum(p.numel() for p in raw_model.parameters()),
               "diloco": dict(optimizer.stats) if a.diloco else None, "scale": scaler.get_scale()}
        with open(a.out, "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
