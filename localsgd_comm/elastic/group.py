"""A localsgd backend over the members of one attempt."""
from __future__ import annotations

from datetime import timedelta
from typing import List

import torch.distributed as dist

from .. import backend as _backend


class _Group:
    """A localsgd backend over the members of one attempt (gloo underneath), outside torch's
    group registry."""

    def __init__(self, store, prefix: str, members: List[str], me: str, timeout_s: float, fmt: str, block: int):
        self.members = list(members)
        self.rank, self.size = self.members.index(me), len(self.members)
        opts = _backend.BackendOptions(format=fmt, block_size=block, threshold_bytes=0, cuda_inner="gloo",
                                       check_calls=True).resolved()
        self.backend = _backend._make_backend(dist.PrefixStore(prefix, store), self.rank, self.size,
                                              timedelta(seconds=timeout_s), opts)
        _backend._unregistered_backends.append(self.backend)

    def close(self) -> None:
        b, self.backend = self.backend, None
        if b is None:
            return
        try:
            b.abort() if b.failure() else b.shutdown()
        except Exception:  # noqa: BLE001 - a failed group tears down as it can
            pass
        if b in _backend._unregistered_backends:
            _backend._unregistered_backends.remove(b)
