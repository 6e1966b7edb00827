"""Train a small byte-level GPT on 2 workers: plain DDP here, DiLoCo in diloco_train.py.

The two scripts differ by three lines (the backend, the optimizer, the label printed): that is
the whole change an existing DDP script needs to become DiLoCo.

Run with ``torchrun --nproc_per_node 2 examples/ddp_train.py`` or plain
``python examples/ddp_train.py`` (spawns 2 local CPU workers). ``EXAMPLE_STEPS`` sets the steps
(default 100).
"""
import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import localsgd_comm  # noqa: F401  (registers the "localsgd" backend)
from localsgd_comm.data import ByteData, load_corpus
from localsgd_comm.model import GPT, config_for



def _steps() -> int:
    raw = os.environ.get("EXAMPLE_STEPS", "100").strip()
    if not raw.isdigit() or int(raw) < 1:
        sys.exit(f"EXAMPLE_STEPS: expected a positive integer (training steps), got {raw!r}")
    return int(raw)


STEPS = _steps()


def train():
    torch.set_num_threads(1)  # one thread per worker: oversubscribed CPU runs ~5x slower
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DDP(GPT(config_for("tiny")))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    data = ByteData(load_corpus(), seq_len=128, seed=0)
    for step in range(STEPS):
        x, y = data.batch(rank, step, batch_size=16)
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0 and (step % 20 == 0 or step == STEPS - 1):
            print(f"step {step:4d}  train loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        xv, yv = data.val_batches(1, batch_size=16)[0]
        val = model(xv, yv).item()
    if rank == 0:
        print(f"ddp: validation loss {val:.4f}", flush=True)
        print(localsgd_comm.traffic_report(model, STEPS), flush=True)
    dist.destroy_process_group()


def _spawned(rank, world):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    train()


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if "RANK" in os.environ:  # launched by torchrun
        train()
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        mp.spawn(_spawned, args=(2,), nprocs=2)
