"""Train a small byte-level GPT with PyTorch Lightning on 2 CPU workers: plain DDP here, DiLoCo
in lightning_diloco.py.

The two scripts differ by two lines (import DiLoCoStrategy, strategy="ddp" ->
DiLoCoStrategy(...)): that is the whole change a Lightning script needs to become DiLoCo.

Run with ``python examples/lightning_ddp.py`` (Lightning starts the second worker itself) or
``torchrun --nproc_per_node 2 examples/lightning_ddp.py``. ``EXAMPLE_STEPS`` sets the optimizer
steps (default 100). Needs ``pip install "localsgd-comm[lightning]"``.
"""
import argparse
import os
import sys

import lightning as L
import torch

from localsgd_comm.data import ByteData, load_corpus
from localsgd_comm.model import GPT, config_for


def _steps() -> int:
    raw = os.environ.get("EXAMPLE_STEPS", "100").strip()
    if not raw.isdigit() or int(raw) < 1:
        sys.exit(f"EXAMPLE_STEPS: expected a positive integer (training steps), got {raw!r}")
    return int(raw)


STEPS = _steps()


class Windows(torch.utils.data.Dataset):
    """Random windows of the embedded text: (input, next bytes)."""

    def __init__(self, src, n, seq_len=128):
        self.src, self.seq_len = src, seq_len
        self.starts = torch.randint(0, len(src) - seq_len - 1, (n,), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        w = self.src[self.starts[i]:self.starts[i] + self.seq_len + 1]
        return w[:-1], w[1:]


class LitGPT(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = GPT(config_for("tiny"))

    def training_step(self, batch, batch_idx):
        loss = self.net(*batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=2e-3)


def main():
    torch.set_num_threads(1)  # one thread per worker: oversubscribed CPU runs ~5x slower
    data = ByteData(load_corpus(), seq_len=128, seed=0)
    L.seed_everything(0, verbose=False)
    model = LitGPT()
    loader = torch.utils.data.DataLoader(Windows(data.train, 32 * STEPS), batch_size=16, shuffle=True)
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=STEPS,
                        strategy="ddp",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    with torch.no_grad():
        xv, yv = data.val_batches(1, batch_size=16)[0]
        val = model.net(xv, yv).item()
    if trainer.is_global_zero:
        print(f"{type(trainer.strategy).__name__}: validation loss {val:.4f}", flush=True)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
