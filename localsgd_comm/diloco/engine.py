"""The outer sync's building blocks: seeds, in-flight reduces."""
from __future__ import annotations

import hashlib

import torch.distributed as dist


def _derive_seed(seed: int, sync_index: int, rank: int) -> int:
    """A 62-bit stochastic-rounding seed from (seed, sync index, rank): reproducible on resume,
    different per rank (independent rounding noise averages out) and per sync."""
    h = hashlib.blake2b(f"{seed}:{sync_index}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2


# torch 2.13 deprecates all_gather_into_tensor in favour of all_gather_single (same semantics)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Deferred:
    """A Work-like handle whose wait() runs the rest of a composed collective."""

    def __init__(self, fn):
        self._fn = fn

    def wait(self):
        if self._fn is not None:
            fn, self._fn = self._fn, None
            fn()
        return True


class _Pending:
    """An in-flight (or finished, not yet applied) reduce of one sync."""

    def __init__(self):
        self.items: list = []  # per flat buffer: (kind, tensors...)
        self.works: list = []
        self.residual_backup: list = []

    def wait(self):
        for w in self.works:
            if w is not None:
                w.wait()
        self.works = []
