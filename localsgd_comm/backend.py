"""The ``"localsgd"`` torch.distributed backend: registration, options, statistics, and
:func:`all_reduce_compressed` for callers that already hold compressed bytes.

``import localsgd_comm`` registers the backend for CPU and CUDA::

    dist.init_process_group("localsgd")                      # torchrun / env://
    dist.init_process_group("localsgd", pg_options=localsgd_comm.BackendOptions(format="int4"))
    dist.new_group(backend="localsgd")
    dist.init_process_group("cpu:localsgd,cuda:nccl")

The backend itself is C++ (``csrc/c10d/``): it wraps inner backends created
here (gloo on a PrefixStore for CPU tensors; NCCL, or gloo when ``cuda_inner="gloo"``, for CUDA
tensors) and runs the quantized all-reduce of docs/design.md for floating tensors of at least
``threshold_bytes`` with SUM/AVG; everything else passes through to the inner backend.

Options, highest precedence first: a field set in :class:`BackendOptions` (``pg_options``), the
environment (``LOCALSGD_COMM_FORMAT`` = none|int8|int4|fp8, ``LOCALSGD_COMM_BLOCK_SIZE``,
``LOCALSGD_COMM_THRESHOLD_BYTES``), the defaults (int8, block 128, 64 KiB).

Nothing falls back to uncompressed traffic silently: every all-reduce is counted as compressed
or passed through (with the reason) in :func:`get_backend_stats`, and the first pass-through
of a floating SUM/AVG all-reduce for each reason is logged once.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import threading
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from . import _ops
from ._ops import DEFAULT_BLOCK_SIZE, FORMATS, QUANT_FORMATS, num_blocks, payload_bytes

log = logging.getLogger("localsgd_comm")

BACKEND_NAME = "localsgd"
_FORMAT_CODES = {"none": 0, "int8": 1, "int4": 2, "fp8": 3}

#: Tensors smaller than this (bytes) are all-reduced uncompressed by the inner backend. The
#: quantized path moves two phases of messages (all-to-all, then all-gather) instead of one
#: collective, plus three kernel passes. Measured on loopback, 2 ranks (torch
#: 2.13, gloo, 1 thread per rank): 4-64 KiB take ~0.7-0.9 ms compressed (int8) vs ~0.35-0.45 ms
#: for gloo fp32, i.e. ~0.4 ms of fixed extra cost; 64 KiB of fp32 is ~0.5 ms on a 1 Gbit/s
#: link, so below this size compression cannot pay even on the slow links it is meant for.
#: Set 0 to compress everything (the tests do, to cover tiny and sub-block sizes).
DEFAULT_THRESHOLD_BYTES = 64 * 1024


def _env_int(name: str, default: int) -> int:
    """An integer environment variable; unset or empty gives ``default``."""
    env = os.environ.get(name)
    try:
        return int(env) if env else default
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {env!r}") from None


def _is_seed(seed) -> bool:
    """A stochastic-rounding seed: an int in [0, 2**63). The C++ backend encodes "round to
    nearest" as -1, so a negative seed would silently mean no stochastic rounding there."""
    return isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63


@dataclass
class BackendOptions:
    """Options of the ``"localsgd"`` backend, passed as ``pg_options``.

    format: "none" | "int8" | "int4" | "fp8"; None -> ``LOCALSGD_COMM_FORMAT`` or "int8".
        "none" makes the backend an exact pass-through (useful as a baseline).
    block_size: power of two in [16, 8192]; None -> ``LOCALSGD_COMM_BLOCK_SIZE`` or 128.
    threshold_bytes: tensors below this size are not compressed (see DEFAULT_THRESHOLD_BYTES);
        None -> ``LOCALSGD_COMM_THRESHOLD_BYTES`` or 65536.
    cuda_inner: "nccl" or "gloo": the inner backend for CUDA tensors ("gloo" for TCP-only links).
    seed: None rounds to nearest; an int selects seeded stochastic rounding (unbiased).
    check_calls: every collective first sends each peer a 64-byte call header (sequence number,
        collective, format, op, dtype, element count, block size or root) and compares them
        before any data moves, so ranks that disagree raise "ranks disagree (...)" on every rank
        at once. None -> ``LOCALSGD_COMM_CHECK_CALLS`` (0/1) or True. False saves that message;
        a disagreement then hangs until the timeout or exchanges mismatched data.
    """
    format: Optional[str] = None
    block_size: Optional[int] = None
    threshold_bytes: Optional[int] = None
    cuda_inner: str = "nccl"
    seed: Optional[int] = None
    check_calls: Optional[bool] = None

    def resolved(self) -> "BackendOptions":
        """A copy with every unset field taken from the environment or the defaults, validated."""
        fmt = self.format
        if fmt is None:
            fmt = os.environ.get("LOCALSGD_COMM_FORMAT", "int8").strip().lower() or "int8"
            where = "LOCALSGD_COMM_FORMAT"
        else:
            where = "BackendOptions.format"
        if fmt not in FORMATS:
            raise ValueError(f"{where}: expected one of {FORMATS}, got {fmt!r}")
        block = self.block_size
        if block is None:
            block = _env_int("LOCALSGD_COMM_BLOCK_SIZE", DEFAULT_BLOCK_SIZE)
        _ops.check_block_size(block)
        thr = self.threshold_bytes
        if thr is None:
            thr = _env_int("LOCALSGD_COMM_THRESHOLD_BYTES", DEFAULT_THRESHOLD_BYTES)
        if not isinstance(thr, int) or thr < 0:
            raise ValueError(f"threshold_bytes: expected an integer >= 0, got {thr!r}")
        if self.cuda_inner not in ("nccl", "gloo"):
            raise ValueError(f"cuda_inner: expected 'nccl' or 'gloo', got {self.cuda_inner!r}")
        if self.seed is not None and not _is_seed(self.seed):
            raise ValueError(f"seed: expected None or an int in [0, 2**63), got {self.seed!r}")
        check = self.check_calls
        if check is None:
            env = os.environ.get("LOCALSGD_COMM_CHECK_CALLS", "1").strip() or "1"
            if env not in ("0", "1"):
                raise ValueError(f"LOCALSGD_COMM_CHECK_CALLS: expected 0 or 1, got {env!r}")
            check = env == "1"
        if not isinstance(check, bool):
            raise ValueError(f"check_calls: expected True, False or None, got {check!r}")
        return replace(self, format=fmt, block_size=block, threshold_bytes=thr, check_calls=check)


# ---- statistics of the Python-composed path -----------------------------------------------------
_py_stats_lock = threading.Lock()
_py_stats: Dict[str, Dict[str, Any]] = {}


def _empty_py_stats() -> Dict[str, Any]:
    return {"bytes_sent": 0, "bytes_received": 0, "compressed_calls": 0, "last_format": None}


def _group_key(group) -> str:
    pg = group if group is not None else dist.group.WORLD
    return getattr(pg, "group_name", None) or str(id(pg))


def _localsgd_backend(group, device: torch.device):
    """The C++ LocalSGDBackend serving ``device`` in ``group``, or None (other backend)."""
    from . import _C
    cls = getattr(_C, "LocalSGDBackend", None)
    if cls is None:
        return None
    pg = group if group is not None else dist.group.WORLD
    try:
        b = pg._get_backend(torch.device(device.type))
    except Exception:  # noqa: BLE001 - no backend for this device in the group
        return None
    return b if isinstance(b, cls) else None


def _localsgd_backends(group) -> list:
    """The distinct LocalSGDBackends of ``group`` (one per device type; CPU and CUDA may share)."""
    out = []
    for dev in ("cpu", "cuda"):
        b = _localsgd_backend(group, torch.device(dev))
        if b is not None and all(b is not x for x in out):
            out.append(b)
    return out


def get_backend_stats(group=None, reset: bool = False) -> Dict[str, Any]:
    """Per-rank traffic counters of ``group`` (default: WORLD).

    Keys: ``backend`` (the group's backend name), ``format``/``block_size``/``threshold_bytes``
    (the active options, None when the group is not a localsgd group), ``bytes_sent`` and
    ``bytes_received`` (payload + scales + metadata of the compressed all-reduces, and the
    tensor bytes of pass-through all-reduces, as this rank sends them), ``compressed_calls``,
    ``passthrough_calls`` and ``passthrough_reasons`` ({reason: count} among "small", "dtype",
    "op", "format_none", "multi_tensor"), ``cpp_calls`` / ``python_calls`` (which path ran the
    compressed all-reduces), ``last_path`` ("cpp", "python" or None), and for every other
    collective ``op_calls`` / ``op_bytes_sent`` ({op: count or bytes}: "broadcast", "allgather",
    "alltoall", "reduce_scatter", "send", ...), ``header_bytes`` (the 64-byte call headers this
    rank sent, one per peer and collective; see ``BackendOptions.check_calls``), and ``failed``:
    the group's first error (None while it is healthy; after an error every call of the group
    fails at once with it).

    Every path is counted in ``bytes_sent``/``bytes_received``: the call headers and the compressed
    all-reduce exactly (records, scales, padding), pass-through collectives by the inner
    backend's algorithm (ring all-reduce and all-gather, binomial-tree broadcast, pairwise
    all-to-all; gloo's reduce-scatter all-reduces the whole input). A barrier counts 0. Payload
    bytes only: gloo's message headers and TCP/IP headers add ~0.2-3% on the wire.
    ``reset=True`` zeroes the counters after reading them.
    """
    pg = group if group is not None else dist.group.WORLD
    key = _group_key(pg)
    out: Dict[str, Any] = {
        "backend": str(dist.get_backend(pg)), "format": None, "block_size": None,
        "threshold_bytes": None, "bytes_sent": 0, "bytes_received": 0, "compressed_calls": 0,
        "passthrough_calls": 0, "passthrough_reasons": {}, "cpp_calls": 0, "python_calls": 0,
        "last_path": None, "op_calls": {}, "op_bytes_sent": {}, "header_bytes": 0, "failed": None,
    }
    for b in _localsgd_backends(pg):
        s = b.stats()
        out["format"], out["block_size"], out["threshold_bytes"] = s["format"], s["block_size"], s["threshold_bytes"]
        out["failed"] = out.get("failed") or b.failure() or None
        for k in ("bytes_sent", "bytes_received", "compressed_calls", "passthrough_calls", "header_bytes"):
            out[k] += s[k]
        out["cpp_calls"] += s["compressed_calls"]
        for key in ("passthrough_reasons", "op_calls", "op_bytes_sent"):
            for r, c in s[key].items():
                out[key][r] = out[key].get(r, 0) + c
        if s["compressed_calls"]:
            out["last_path"] = "cpp"
        if reset:
            b.reset_stats()
    with _py_stats_lock:
        ps = _py_stats.get(key)
        if ps is not None:
            out["bytes_sent"] += ps["bytes_sent"]
            out["bytes_received"] += ps["bytes_received"]
            out["compressed_calls"] += ps["compressed_calls"]
            out["python_calls"] += ps["compressed_calls"]
            if out["format"] is None:
                out["format"] = ps["last_format"]
            if ps.get("last_path_is_python"):
                out["last_path"] = "python"
            if reset:
                _py_stats[key] = _empty_py_stats()
    return out


def ddp_bytes_per_rank(numel: int, steps: int, world_size: int, element_size: int = 4) -> int:
    """What plain DDP sends per rank for ``steps`` optimizer steps of a model of ``numel``
    parameters: one ring all-reduce of every gradient per step, ``2 (p-1)/p x element_size x
    numel`` (4 for fp32 gradients, 2 for bf16/fp16 ones or a DDP fp16/bf16 compression hook)."""
    if world_size <= 1:
        return 0
    return int(2 * (world_size - 1) * element_size * numel * steps / world_size)


# DDP communication hooks of torch.distributed.algorithms.ddp_comm_hooks.default_hooks that send
# 2 bytes per gradient element whatever the parameters' dtype
_HALF_HOOKS = ("fp16_compress_hook", "bf16_compress_hook")


def ddp_gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes per step that plain DDP all-reduces for ``model``'s trainable parameters before the
    ring factor: each parameter's element size (2 for bf16/fp16), or 2 per element when a DDP
    fp16/bf16 compression hook is registered on it (``model`` DDP, possibly inside
    ``torch.compile``)."""
    from .diloco.ddp import find_ddp
    ddp = find_ddp(model)
    hooks = [getattr(h, "__name__", "") for h, _ in getattr(ddp, "_comm_hooks", [])] if ddp is not None else []
    half = any(h in _HALF_HOOKS for h in hooks)
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    return sum(p.numel() * (min(p.element_size(), 2) if half else p.element_size()) for p in params)


def traffic_report(model: torch.nn.Module, steps: int, group=None) -> str:
    """One line for a training script's end: the bytes this rank sent on ``group`` (the localsgd
    backend's counters) next to what plain DDP would have sent for the same steps."""
    pg = group if group is not None else dist.group.WORLD
    p = dist.get_world_size(pg)
    numel = sum(t.numel() for t in {id(t): t for t in model.parameters() if t.requires_grad}.values())
    # at the gradients' element size (a bf16 model's DDP sends 2 bytes per element), not 4
    ddp = ddp_bytes_per_rank(ddp_gradient_bytes(model), steps, p, element_size=1)
    st = get_backend_stats(pg)
    if st["format"] is None and not st["python_calls"]:
        return (f"bytes sent / rank: not counted (the {st['backend']} backend keeps no counters); plain DDP sends "
                f"{ddp / 1e6:.2f} MB for {steps} steps of {numel:,} parameters on {p} ranks")
    sent = st["bytes_sent"]
    ratio = f", {ddp / sent:.1f}x less than" if sent else ", vs"
    return (f"bytes sent / rank: {sent / 1e6:.2f} MB (localsgd backend counters){ratio} plain DDP's "
            f"{ddp / 1e6:.2f} MB for {steps} steps of {numel:,} parameters on {p} ranks")


def reset_backend_stats(group=None) -> None:
    """Zero the counters of :func:`get_backend_stats`."""
    get_backend_stats(group, reset=True)


# ---- all_reduce_compressed -----------------------------------------------------------------------
def _chunking(numel: int, block: int, p: int):
    """Chunk r covers elements [r*c*B, min((r+1)*c*B, n)); c = ceil(blocks / p) blocks per chunk.

    Chunks are cut on block boundaries so every chunk's scales are whole blocks of the tensor;
    the last chunks may be shorter or empty, and records are padded to the same size so that the
    all-to-all and the all-gather are equal-split (one collective per phase)."""
    c = max(1, (num_blocks(numel, block) + p - 1) // p)
    elems = c * block
    spans = [(min(r * elems, numel), min((r + 1) * elems, numel)) for r in range(p)]
    return c, elems, spans


def _reduce_impl(device: torch.device):
    """The dequantize_reduce_requantize implementation for ``device`` (dispatcher op when a
    kernel is registered for it, else the byte-identical pure-PyTorch reference)."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    if torch._C._dispatch_has_kernel_for_dispatch_key("localsgd_comm::dequantize_reduce_requantize", key):
        return _ops.ops().dequantize_reduce_requantize, "op"
    from .kernels.reference import ops as ref
    return ref.dequantize_reduce_requantize, "reference"


def _check_compressed_args(payload, scales, numel, fmt, block, op):
    torch._check(fmt in QUANT_FORMATS, lambda: f"fmt must be one of {QUANT_FORMATS} (use dist.all_reduce for "
                 f"uncompressed tensors), got {fmt!r}")
    _ops.check_block_size(block)
    torch._check(isinstance(numel, int) and numel >= 0, lambda: f"numel must be an int >= 0, got {numel!r}")
    torch._check(payload.dtype == torch.uint8, lambda: f"payload must be uint8, got {payload.dtype}")
    torch._check(scales.dtype == torch.float32, lambda: f"scales must be float32, got {scales.dtype}")
    torch._check(payload.dim() == 1 and payload.numel() == payload_bytes(fmt, numel),
                 lambda: f"payload must be 1-D with {payload_bytes(fmt, numel)} bytes for {fmt} and numel={numel}, "
                 f"got shape {tuple(payload.shape)}")
    torch._check(scales.dim() == 1 and scales.numel() == num_blocks(numel, block),
                 lambda: f"scales must be 1-D with {num_blocks(numel, block)} blocks for block_size={block} and "
                 f"numel={numel}, got shape {tuple(scales.shape)}")
    torch._check(payload.is_contiguous() and scales.is_contiguous(),
                 lambda: "payload and scales must be contiguous (they are written in place)")
    torch._check(payload.device == scales.device,
                 lambda: f"payload and scales must be on one device, got {payload.device} and {scales.device}")
    if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
        raise NotImplementedError(f"all_reduce_compressed supports ReduceOp.SUM and ReduceOp.AVG, got {op}")


# torch 2.13 deprecates all_gather_into_tensor in favour of all_gather_single (same semantics).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_META_WORDS = 8
_META_MAGIC = 0x4C534731  # "LSG1"


def _check_meta(meta: torch.Tensor, mine: list, what: str) -> None:
    """Every rank checks every rank's header, so a disagreement raises on all ranks alike."""
    names = ("magic", "format", "numel", "block_size", "op", "tensors", "dtype", "reserved")
    rows = meta.view(-1, _META_WORDS).tolist()
    for r, row in enumerate(rows):
        if row != mine:
            diff = ", ".join(f"{names[i]}: this rank {mine[i]}, rank {r} {row[i]}"
                             for i in range(_META_WORDS) if row[i] != mine[i])
            raise RuntimeError(f"localsgd {what}: ranks disagree ({diff}); expected identical tensor sizes, "
                               "formats, block sizes and ops on every rank")


def _all_reduce_compressed_python(payload, scales, numel, fmt, block, group, op, seed):
    """Steps 2-5 of the quantized all-reduce composed from the group's own collectives.

    (0) exchange a 64-byte header and check that every rank agrees; (2) all-to-all of the p
    records [payload chunk | scales chunk] (padded to one size); (3+4) dequantize, sum in fp32
    and requantize the owned chunk; (5) all-gather the reduced records; (6) write them back into
    payload/scales. Same chunking and kernels as the C++ backend, hence the same bytes."""
    pg = group if group is not None else dist.group.WORLD
    p = dist.get_world_size(pg)
    me = dist.get_rank(pg)
    dev = payload.device
    # (0) metadata: never let mismatched sizes reach the data collectives (gloo would hang or
    # mis-size its buffers); a fixed-size all-gather cannot mismatch.
    mine = [_META_MAGIC, _FORMAT_CODES[fmt], numel, block, 1 if op == dist.ReduceOp.AVG else 0, 1, 0, 0]
    meta = torch.empty(p * _META_WORDS, dtype=torch.int64, device=dev)
    _all_gather(meta, torch.tensor(mine, dtype=torch.int64, device=dev), group=pg)
    _check_meta(meta, mine, "all_reduce_compressed")

    c, elems, spans = _chunking(numel, block, p)
    cap = payload_bytes(fmt, elems)  # elems is a multiple of 16: whole bytes, 4-byte aligned
    rec = cap + 4 * c

    def pb(e):  # byte offset of element e in the payload (int4: 2 per byte; e even here)
        return payload_bytes(fmt, e) if fmt != "int4" else e // 2

    send = torch.zeros(p, rec, dtype=torch.uint8, device=dev)
    for r, (lo, hi) in enumerate(spans):
        if hi > lo:
            nb = num_blocks(hi - lo, block)
            nbytes = payload_bytes(fmt, hi - lo)
            send[r, :nbytes] = payload[pb(lo): pb(lo) + nbytes]
            send[r, cap: cap + 4 * nb] = scales[lo // block: lo // block + nb].view(torch.uint8)
    recv = torch.empty_like(send)
    if p > 1:
        dist.all_to_all_single(recv, send, group=pg)
    else:
        recv.copy_(send)

    lo, hi = spans[me]
    n_me = hi - lo
    out = torch.zeros(rec, dtype=torch.uint8, device=dev)
    if n_me > 0:
        nb = num_blocks(n_me, block)
        payloads = recv[:, : payload_bytes(fmt, n_me)].contiguous()
        rscales = recv[:, cap: cap + 4 * nb].contiguous().view(torch.float32)
        factor = 1.0 / p if op == dist.ReduceOp.AVG else 1.0
        impl, _ = _reduce_impl(dev)
        q, s = impl(payloads, rscales, fmt, n_me, block, factor, seed, lo)
        out[: q.numel()] = q
        out[cap: cap + 4 * nb] = s.view(torch.uint8)
    gathered = torch.empty(p * rec, dtype=torch.uint8, device=dev)
    if p > 1:
        _all_gather(gathered, out, group=pg)
    else:
        gathered.copy_(out)
    g = gathered.view(p, rec)
    for r, (lo, hi) in enumerate(spans):
        if hi > lo:
            nb = num_blocks(hi - lo, block)
            nbytes = payload_bytes(fmt, hi - lo)
            payload[pb(lo): pb(lo) + nbytes] = g[r, :nbytes]
            scales[lo // block: lo // block + nb] = g[r, cap: cap + 4 * nb].view(torch.float32)
    # Per rank: p-1 records out in each phase, plus the header to p-1 peers.
    sent = (p - 1) * (2 * rec + 8 * _META_WORDS)
    with _py_stats_lock:
        st = _py_stats.setdefault(_group_key(pg), _empty_py_stats())
        st["bytes_sent"] += sent
        st["bytes_received"] += sent
        st["compressed_calls"] += 1
        st["last_format"] = fmt
        st["last_path_is_python"] = True


def all_reduce_compressed(payload: torch.Tensor, scales: torch.Tensor, numel: int, fmt: str,
                          block_size: Optional[int] = None, group=None, op=dist.ReduceOp.AVG,
                          async_op: bool = False, seed: Optional[int] = None):
    """All-reduce a tensor that the caller already compressed (``functional.quantize`` layout).

    Runs the quantized all-reduce without quantizing again: all-to-all of the compressed
    chunks, fp32 dequantize + sum (+ 1/p for AVG) + requantize of the owned chunk, all-gather.
    The reduced result, in the same contiguous layout, replaces ``payload``/``scales`` in place
    and is byte-identical on every rank. ``seed`` selects stochastic rounding for the requantize.

    On a ``"localsgd"`` group the C++ backend runs it (in order with the group's other
    collectives); on any other group (e.g. gloo) it is composed in Python from the group's
    all_to_all_single / all_gather_into_tensor and gives the same bytes. Which path ran:
    ``get_backend_stats(group)["last_path"]``.

    Returns a Work when ``async_op`` (the Python path runs synchronously and returns a completed
    Work), else None.
    """
    block = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    _check_compressed_args(payload, scales, numel, fmt, block, op)
    # A negative seed would round to nearest on the C++ path while the Python path rounds
    # stochastically (different bytes for the same call).
    torch._check(seed is None or _is_seed(seed),
                 lambda: f"seed must be None or an int in [0, 2**63), got {seed!r}")
    pg = group if group is not None else dist.group.WORLD
    backend = _localsgd_backend(pg, payload.device)
    if backend is not None:
        work = backend.allreduce_compressed(payload, scales, numel, _FORMAT_CODES[fmt], block,
                                            op == dist.ReduceOp.AVG, -1 if seed is None else int(seed))
        with _py_stats_lock:
            st = _py_stats.setdefault(_group_key(pg), _empty_py_stats())
            st["last_path_is_python"] = False
        if async_op:
            return work
        work.wait()
        return None
    _all_reduce_compressed_python(payload, scales, numel, fmt, block, pg, op, seed)
    if async_op:
        fut = torch.futures.Future()
        fut.set_result([payload, scales])
        return torch._C._distributed_c10d._create_work_from_future(fut)
    return None


# ---- registration --------------------------------------------------------------------------------
#: What every rank of a group must agree on at init (checked in one store exchange).
_AGREED = ("version", "world_size", "format", "block_size", "threshold_bytes", "cuda_inner", "seed", "check_calls")


def _publish_init(store, rank: int, size: int, mine: Dict[str, Any], error: Optional[str]) -> int:
    """This rank's resolved options (or the error it failed with) under the init's generation."""
    # A generation per init: the same store may serve several incarnations of a group (destroy,
    # then init again); inits of one group are collective, so every rank draws the same number.
    gen = (store.add("localsgd/init/count", 1) - 1) // size
    store.set(f"localsgd/init/{gen}/{rank}", json.dumps({"options": mine, "error": error}))
    return gen


def _agree_at_init(store, rank: int, size: int, mine: Dict[str, Any]) -> None:
    """One exchange through the group's store: every rank publishes its resolved options, reads
    every other rank's (or the error a rank failed with), and raises the same message on every
    rank when they differ. So a bad option on one rank fails the whole group within the
    rendezvous instead of leaving its peers blocked until the group timeout, and mismatched
    formats or thresholds (which the per-call header cannot see) never reach a collective."""
    gen = _publish_init(store, rank, size, mine, None)
    peers = [json.loads(store.get(f"localsgd/init/{gen}/{r}")) for r in range(size)]
    failed = [(r, v["error"]) for r, v in enumerate(peers) if v["error"] is not None]
    if failed:
        r, msg = failed[0]
        raise RuntimeError(f"localsgd backend: rank {r} failed to initialize the group ({msg})")
    diffs = []
    for k in _AGREED:
        vals = [v["options"].get(k) for v in peers]
        if any(x != vals[0] for x in vals):
            diffs.append(f"{k}: " + ", ".join(f"rank {r} {x!r}" for r, x in enumerate(vals)))
    if diffs:
        raise RuntimeError("localsgd backend: ranks disagree on the backend options at init (" + "; ".join(diffs)
                           + "); every rank must create the group with the same BackendOptions / LOCALSGD_COMM_* "
                           "environment and the same localsgd_comm version")


def _create_backend(dist_opts, backend_options):
    store, rank, size, timeout = dist_opts.store, dist_opts.group_rank, dist_opts.group_size, dist_opts.timeout
    try:
        if backend_options is None:
            opts = BackendOptions()
        elif isinstance(backend_options, BackendOptions):
            opts = backend_options
        else:
            raise TypeError("pg_options for the localsgd backend must be localsgd_comm.BackendOptions, "
                            f"got {type(backend_options).__name__}")
        opts = opts.resolved()
        if opts.cuda_inner == "nccl" and torch.cuda.is_available() and not dist.is_nccl_available():
            raise RuntimeError("BackendOptions.cuda_inner='nccl' but this torch has no NCCL; use cuda_inner='gloo'")
    except Exception as exc:
        _publish_init(store, rank, size, {}, f"{type(exc).__name__}: {exc}")  # the peers raise it too
        raise
    return _make_backend(store, rank, size, timeout, opts)


def _make_backend(store, rank: int, size: int, timeout, opts: "BackendOptions"):
    """A LocalSGDBackend for ``rank`` of ``size`` on ``store`` with resolved ``opts``, after the
    init agreement; also used for groups built outside ``init_process_group`` (elastic DiLoCo)."""
    from . import _C, __version__
    mine = {"version": __version__, "world_size": size, "format": opts.format, "block_size": opts.block_size,
            "threshold_bytes": opts.threshold_bytes, "cuda_inner": opts.cuda_inner, "seed": opts.seed,
            "check_calls": opts.check_calls}
    _agree_at_init(store, rank, size, mine)
    # The inner groups get their own key prefixes so they never collide with ours or each other.
    gloo = dist.ProcessGroupGloo(dist.PrefixStore("localsgd/gloo/", store), rank, size, timeout)
    cuda_inner = None
    if torch.cuda.is_available():
        if opts.cuda_inner == "nccl":
            nccl_opts = dist.ProcessGroupNCCL.Options()
            nccl_opts._timeout = timeout
            cuda_inner = dist.ProcessGroupNCCL(dist.PrefixStore("localsgd/nccl/", store), rank, size, nccl_opts)
        else:
            cuda_inner = gloo  # gloo handles CUDA tensors through host staging
    timeout_ms = int(timeout.total_seconds() * 1000) if isinstance(timeout, timedelta) else int(timeout)
    return _C.LocalSGDBackend(rank, size, gloo, cuda_inner, _FORMAT_CODES[opts.format], opts.block_size,
                              opts.threshold_bytes, -1 if opts.seed is None else opts.seed, timeout_ms,
                              opts.check_calls)


#: How long exit waits for collectives still in flight (they finish when every rank exits alike).
EXIT_GRACE_MS = 3000


#: Backends made by _make_backend outside torch's group registry (elastic DiLoCo's groups): the
#: exit handler must reach them too. Their owner removes them when it closes them.
_unregistered_backends: list = []


def _live_backends():
    """The localsgd backends of every process group not destroyed yet (torch's group registry),
    and those created outside it."""
    out = list(_unregistered_backends)
    try:
        groups = list(dist.distributed_c10d._world.pg_map.keys())
    except Exception:  # noqa: BLE001 - torch internals moved: nothing to do at exit
        return out
    for pg in groups:
        out += [b for b in _localsgd_backends(pg) if all(b is not x for x in out)]
    return out


@atexit.register
def _shut_down_at_exit() -> None:
    """Finish or abort every live backend's work while the interpreter is still whole: a worker
    thread that touches a Python object (it drops tensors) after finalization has begun is ended
    by CPython with a forced unwind, which aborts the process. Measured before this handler: a
    job exiting with a collective in flight died with SIGABRT in about half of the runs
    (tests/test_backend_exit.py)."""
    for b in _live_backends():
        try:
            b.exit_shutdown(EXIT_GRACE_MS)
        except Exception:  # noqa: BLE001 - exit goes on
            pass


# ---- for the DiLoCo engine and elastic DiLoCo (package-internal; not in __all__) ----------------
def localsgd_backend_of(group, device: torch.device):
    """The C++ backend serving ``device`` in ``group`` when it is a "localsgd" group, else None."""
    return _localsgd_backend(group, device)


def bytes_sent_on(group) -> Optional[int]:
    """Bytes this rank sent on ``group`` as counted by its "localsgd" backend (None: not one)."""
    if not _localsgd_backends(group):
        return None
    return int(get_backend_stats(group)["bytes_sent"])


def format_code(fmt: str) -> int:
    """The wire format's code in the C++ backend's calls."""
    return _FORMAT_CODES[fmt]


def detached_backend(store, rank: int, size: int, timeout, opts: "BackendOptions"):
    """A localsgd backend outside torch's group registry (elastic DiLoCo's per-attempt groups),
    after the init agreement on ``store``; the exit handler reaches it until
    :func:`release_detached_backend`."""
    b = _make_backend(store, rank, size, timeout, opts)
    _unregistered_backends.append(b)
    return b


def release_detached_backend(b) -> None:
    """Shut a detached backend down (abort it when it failed) and forget it."""
    try:
        b.abort() if b.failure() else b.shutdown()
    except Exception:  # noqa: BLE001 - a failed group tears down as it can
        pass
    if b in _unregistered_backends:
        _unregistered_backends.remove(b)


def _register() -> None:
    if BACKEND_NAME.upper() in dist.Backend._plugins:
        return
    dist.Backend.register_backend(BACKEND_NAME, _create_backend, extended_api=True, devices=["cpu", "cuda"])


if dist.is_available():
    _register()


__all__ = ["BackendOptions", "DEFAULT_THRESHOLD_BYTES", "all_reduce_compressed", "ddp_bytes_per_rank",
           "get_backend_stats", "reset_backend_stats", "traffic_report"]
