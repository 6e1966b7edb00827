"""Construction-time agreement: every member of a sync group built DiLoCo with the same settings.

A replica constructed with another ``sync_every``, ``outer_lr``, ``compression``, fragment count
or parameter layout than its peers does not always fail by itself: a different ``outer_lr`` or
``outer_momentum`` applies a different outer step to the same reduced bytes, so the replicas
silently stop being identical; a different ``sync_every`` pairs one rank's first sync with
another's second and only fails when the first rank exits (measured before this module: a
"Connection reset by peer" at the end of the run, the training in between wrong). Such a
difference usually comes from one node reading another config file, and DDP itself checks its
parameter shapes across ranks at construction for the same reason.

:func:`agree` runs one all-gather of 32 bytes per rank: a digest of the settings and a digest of
the tensors' contents (dtype, shape and bytes; the latter answers "do the replicas already start
identical", which lets DiLoCo skip its construction broadcast). When the settings digests differ,
a second all-gather exchanges the settings themselves and **every** member raises the same
``ValueError`` naming each differing setting with its value on each rank, so no member goes on
to a collective its peers will never join. :func:`mismatch_message` builds that message from
settings gathered another way (sharded DiLoCo's layout check already all-gathers objects).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .collectives import carries

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

__all__ = ["agree", "mismatch_message", "layout_summary", "tensors_digest"]


def tensors_digest(tensors: Sequence[torch.Tensor]) -> bytes:
    """16 bytes identifying the exact contents (dtype, shape and bytes) of ``tensors``."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def layout_summary(tensors: Sequence[torch.Tensor]) -> str:
    """A short description of the shapes and dtypes of ``tensors`` (not their values): equal on
    two ranks exactly when both hold the same parameter layout."""
    desc = ";".join(f"{t.dtype}{tuple(t.shape)}" for t in tensors)
    h = hashlib.blake2b(desc.encode(), digest_size=4).hexdigest()
    return f"{len(tensors)} tensors, {sum(t.numel() for t in tensors)} elements, layout {h}"


def _canonical(settings: Dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=repr)


def _group_ranks(group) -> List[int]:
    g = group if group is not None else dist.group.WORLD
    return dist.get_process_group_ranks(g) if g is not dist.group.WORLD else list(range(dist.get_world_size()))


_CONSTRUCTED = ("the members of the sync group were constructed with different settings",
                "Every replica must pass the same settings (a node that read another configuration?); "
                "nothing was synced")


def mismatch_message(who: str, per_rank: Sequence[Dict[str, Any]], ranks: Sequence[int],
                     wording: Tuple[str, str] = _CONSTRUCTED) -> Optional[str]:
    """None when every entry of ``per_rank`` (the settings of the group's members, in group order,
    ``ranks`` their global ranks) is equal; otherwise the error naming each differing setting with
    the ranks holding each value (``wording``: what differs, and what to do)."""
    keys = sorted({k for s in per_rank for k in s})
    parts = []
    for k in keys:
        values: Dict[str, List[int]] = {}
        for r, s in zip(ranks, per_rank):
            values.setdefault(repr(s.get(k, "<missing>")), []).append(r)
        if len(values) > 1:
            parts.append(f"{k}: " + ", ".join(f"{v} on rank{'s' if len(rs) > 1 else ''} "
                                              f"{_ranks_text(rs)}" for v, rs in values.items()))
    if not parts:
        return None
    return f"{who}: {wording[0]}: " + "; ".join(parts) + f". {wording[1]}"


def _ranks_text(rs: List[int]) -> str:
    return str(rs[0]) if len(rs) == 1 else str(rs)


def _gather_bytes(payload: bytes, group, dev: torch.device) -> List[bytes]:
    p = dist.get_world_size(group)
    n = torch.tensor([len(payload)], dtype=torch.int64, device=dev)
    lens = torch.empty(p, dtype=torch.int64, device=dev)
    _all_gather(lens, n, group=group)
    width = int(lens.max().item())
    mine = torch.zeros(width, dtype=torch.uint8, device=dev)
    if payload:
        mine[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(dev)
    out = torch.empty(p * width, dtype=torch.uint8, device=dev)
    _all_gather(out, mine, group=group)
    rows = out.view(p, width).cpu()
    return [bytes(rows[i, :int(lens[i])].numpy().tobytes()) for i in range(p)]


def agree(settings: Dict[str, Any], tensors: Optional[Sequence[torch.Tensor]], group, device: torch.device,
          who: str = "DiLoCo", wording: Tuple[str, str] = _CONSTRUCTED) -> bool:
    """Check that every member of ``group`` passed the same ``settings`` (JSON-able values; others
    are compared by ``repr``) and return whether every member holds the same bytes in ``tensors``
    (False when ``tensors`` is None). Raises ``ValueError`` on every member when the settings
    differ. One all-gather of 32 bytes per rank; a second exchange only on a mismatch."""
    p = dist.get_world_size(group)
    if p == 1:
        return True
    dev = device if carries(group, device) else torch.device("cpu")
    text = _canonical(settings)
    mine_bytes = hashlib.blake2b(text.encode(), digest_size=16).digest()
    mine_bytes += tensors_digest(tensors) if tensors is not None else bytes(16)
    mine = torch.frombuffer(bytearray(mine_bytes), dtype=torch.uint8).to(dev)
    out = torch.empty(p * mine.numel(), dtype=torch.uint8, device=dev)
    _all_gather(out, mine, group=group)
    rows = out.view(p, -1)
    if not bool((rows[:, :16] == mine[:16]).all()):
        texts = _gather_bytes(text.encode(), group, dev)
        msg = mismatch_message(who, [json.loads(t) for t in texts], _group_ranks(group), wording)
        raise ValueError(msg or f"{who}: {wording[0]}")
    return tensors is not None and bool((rows[:, 16:] == mine[16:]).all())
