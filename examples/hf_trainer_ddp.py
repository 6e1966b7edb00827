"""Train a tiny GPT-2 (built from a config, no download) with transformers.Trainer on 2 CPU
workers: plain DDP here, DiLoCo in hf_trainer_diloco.py.

The two scripts differ by three lines (import DiLoCoTrainer, create the "localsgd" process group
before TrainingArguments, Trainer -> DiLoCoTrainer): that is the whole change a Trainer script
needs to become DiLoCo.

Run with ``torchrun --nproc_per_node 2 examples/hf_trainer_ddp.py`` or plain
``python examples/hf_trainer_ddp.py`` (spawns 2 local CPU workers). ``EXAMPLE_STEPS`` sets the
optimizer steps (default 100). Needs ``pip install "localsgd-comm[hf]"``.
"""
import argparse
import os
import socket
import sys
import tempfile

import torch
import torch.multiprocessing as mp
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from localsgd_comm.data import load_corpus



def _steps() -> int:
    raw = os.environ.get("EXAMPLE_STEPS", "100").strip()
    if not raw.isdigit() or int(raw) < 1:
        sys.exit(f"EXAMPLE_STEPS: expected a positive integer (training steps), got {raw!r}")
    return int(raw)


STEPS, SEQ = _steps(), 64


class Windows(torch.utils.data.Dataset):
    """Fixed random windows of the embedded text (bytes are the tokens: vocabulary 256)."""

    def __init__(self, text, n, seed):
        self.text = text
        self.starts = torch.randint(0, len(text) - SEQ, (n,), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        x = self.text[self.starts[i]:self.starts[i] + SEQ]
        return {"input_ids": x, "labels": x}


def train():
    torch.set_num_threads(1)  # one thread per worker: oversubscribed CPU runs ~5x slower
    text = torch.frombuffer(bytearray(load_corpus()), dtype=torch.uint8).long()
    train_set, val_set = Windows(text[:-100_000], 20_000, 0), Windows(text[-100_000:], 64, 1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4))
    args = TrainingArguments(output_dir=os.path.join(tempfile.gettempdir(), "hf_trainer_example"), max_steps=STEPS,
                             per_device_train_batch_size=16, learning_rate=2e-3, lr_scheduler_type="cosine",
                             warmup_steps=5, logging_steps=20, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set)
    trainer.train()
    val = trainer.evaluate()["eval_loss"]
    if trainer.is_world_process_zero():
        print(f"{type(trainer).__name__}: validation loss {val:.4f}", flush=True)
    torch.distributed.destroy_process_group()


def _spawned(rank, world):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
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
