"""What the integrations share: the import check, the start-up checks, evaluation on the synced
model, the per-rank checkpoint files and the numbers reported to the frameworks' logs."""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Any, Dict, Iterator, Optional

import torch
import torch.distributed as dist

from .. import backend as _backend
from ..diloco import DiLoCo

#: DiLoCo's keyword arguments the integrations pass through (``DiLoCo.__init__`` checks them)
DILOCO_ARGS = ("sync_every", "outer_lr", "outer_momentum", "nesterov", "compression", "block_size",
               "error_feedback", "stochastic_rounding", "seed", "overlap", "state_device", "on_nonfinite")


def require(module: str, extra: str, integration: str):
    """Import ``module`` or raise an ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"localsgd_comm.integrations.{integration} needs {module.split('.')[0]}, which is not installed "
            f"({exc}); install it with pip install \"localsgd-comm[{extra}]\"") from exc


def check_process_group(who: str, compression: str, hint: str) -> None:
    """At start: an initialized default group; a group that is not "localsgd" is allowed (the
    compressed all-reduce is then composed from its all_to_all/all_gather, same bytes) with a
    warning, since its traffic is not counted by the backend."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{who}: expected an initialized torch.distributed process group, got none. {hint}")
    name = dist.get_backend()
    if "localsgd" not in str(name):
        what = ("fp32 DiLoCo (compression='none') runs on it unchanged" if compression == "none" else
                f"compression={compression!r} is composed in Python from its all_to_all/all_gather (the same bytes, "
                "slower than the localsgd backend's C++ path)")
        warnings.warn(f"{who}: the default process group's backend is {name!r}, not 'localsgd': {what}; its bytes "
                      "are not counted by localsgd_comm.get_backend_stats. " + hint, UserWarning, stacklevel=3)


def diloco_kwargs(given: Dict[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(given) - set(DILOCO_ARGS))
    if unknown:
        raise TypeError(f"unexpected DiLoCo argument(s) {unknown}; expected some of {list(DILOCO_ARGS)}")
    if "sync_every" not in given:
        raise TypeError("sync_every: expected the number of inner steps between syncs (an integer >= 1), got none")
    return dict(given)


@contextlib.contextmanager
def synced_params(diloco: Optional[DiLoCo]) -> Iterator[None]:
    """Inside: the parameters are the anchor, the model of the last sync (identical on every
    rank); after: each rank's local parameters again, bit for bit. Between syncs ranks hold
    different parameters, so evaluating them would mix replicas."""
    if diloco is None or (diloco.local_step % diloco.sync_every == 0 and diloco._pending is None):
        yield  # at a sync the parameters are the anchor already
        return
    flats = diloco._flats
    saved = [f.flat.detach().clone() for f in flats]
    for f in flats:
        f.write_params(f.anchor)
    try:
        yield
    finally:
        with torch.no_grad():
            for f, s in zip(flats, saved):
                f.flat.copy_(s)


def finish_round(diloco: Optional[DiLoCo]) -> bool:
    """End of training: apply a pending (overlap) update, or sync the partial round, so that the
    final model is the same on every rank. Returns whether it synced."""
    if diloco is None:
        return False
    if diloco._pending is not None:
        diloco.flush()
        return True
    if diloco.local_step % diloco.sync_every != 0:
        diloco.sync()
        return True
    return False


def log_stats(diloco: Optional[DiLoCo]) -> Dict[str, float]:
    """Numbers for the frameworks' logs: syncs done, bytes this rank sent in syncs, and (on a
    "localsgd" group) every byte the backend counted, construction broadcasts included."""
    if diloco is None:
        return {}
    out = {"diloco_syncs": float(diloco.stats["syncs"]), "diloco_bytes_sent": float(diloco.stats["bytes_sent"])}
    total = _backend.bytes_sent_on(diloco.group)
    if total is not None:
        out["localsgd_bytes_sent"] = float(total)
    return out


def rank_state_name(rank: int) -> str:
    return f"diloco_rank{rank}.pt"


def save_rank_state(diloco: DiLoCo, path: str) -> str:
    """This rank's DiLoCo state (inner optimizer, local parameters, anchor, momentum, residual,
    counters) in ``path``: one file per rank, as an exact resume needs."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"world_size": dist.get_world_size(diloco.group), "diloco": diloco.state_dict()}, tmp)
    os.replace(tmp, path)
    return path


def load_rank_state(diloco: DiLoCo, path: str, checkpoint: str, who: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{who}: the checkpoint {checkpoint} has no DiLoCo state for rank {diloco.rank} ({path} is missing): "
            "it was saved without DiLoCo or by fewer ranks; an exact resume needs every rank's own file")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    world = dist.get_world_size(diloco.group)
    if blob["world_size"] != world:
        raise ValueError(f"{who}: the checkpoint {checkpoint} was saved by {blob['world_size']} ranks, "
                         f"this run has {world}: resume with the same number of ranks")
    diloco.load_state_dict(blob["diloco"])
