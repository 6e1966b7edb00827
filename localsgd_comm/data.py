"""Byte-level text data for the main job: an embedded corpus needing no download.

The default corpus is the source text of a fixed list of modules of the installed Python
standard library (English comments and docstrings plus code, ~1-2 MB), read at run time, so
every worker on one machine reads identical bytes. ``--data FILE`` uses a user's text instead.
Batches are random windows drawn from a generator seeded by (seed, rank, step): the same
(rank, step) sees the same tokens in every training mode, which makes DiLoCo and DDP runs
directly comparable.
"""
from __future__ import annotations

import os
import sysconfig
from typing import Optional, Tuple

import torch

__all__ = ["load_corpus", "ByteData"]

# Fixed order: the corpus must not depend on directory listing order.
_STDLIB_FILES = (
    "argparse.py", "dataclasses.py", "enum.py", "functools.py", "inspect.py", "typing.py", "textwrap.py",
    "threading.py", "subprocess.py", "pathlib.py", "shutil.py", "tarfile.py", "zipfile.py", "difflib.py",
    "collections/__init__.py", "json/decoder.py", "json/encoder.py", "logging/__init__.py", "email/message.py",
    "http/client.py", "unittest/case.py", "asyncio/base_events.py", "pydoc.py", "doctest.py",
)
_MAX_BYTES = 2 * 1024 * 1024
MIN_DATA_BYTES = 4096  # the smallest --data file (see load_corpus)


def load_corpus(path: Optional[str] = None) -> bytes:
    """The training text: ``path`` when given, else the embedded standard-library corpus."""
    if path is not None:
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < MIN_DATA_BYTES:
            raise ValueError(f"--data {path}: expected at least {MIN_DATA_BYTES} bytes of text, got {len(data)}")
        return data
    root = sysconfig.get_paths()["stdlib"]
    parts = []
    for rel in _STDLIB_FILES:
        p = os.path.join(root, rel)
        if os.path.exists(p):
            with open(p, "rb") as f:
                parts.append(f.read())
    data = b"\n".join(parts)[:_MAX_BYTES]
    if len(data) < 100_000:
        raise RuntimeError(f"the embedded corpus under {root} has only {len(data)} bytes; pass --data FILE")
    return data


class ByteData:
    """Train/validation split (last 5% for validation) and seeded random windows."""

    def __init__(self, data: bytes, seq_len: int, seed: int):
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        n_val = max(len(t) // 20, seq_len + 2)
        self.train, self.val = t[:-n_val], t[-n_val:]
        self.seq_len, self.seed = seq_len, seed

    def _windows(self, src: torch.Tensor, starts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + torch.arange(self.seq_len + 1)[None, :]
        w = src[idx]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def batch(self, rank: int, step: int, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + rank) * 1_000_003 + step)
        starts = torch.randint(0, len(self.train) - self.seq_len - 1, (batch_size,), generator=g)
        return self._windows(self.train, starts)

    def val_batches(self, n: int, batch_size: int):
        """``n`` fixed validation batches (evenly spaced windows): the same for every mode."""
        span = len(self.val) - self.seq_len - 1
        starts = torch.linspace(0, span, n * batch_size).long()
        return [self._windows(self.val, starts[i * batch_size:(i + 1) * batch_size]) for i in range(n)]
