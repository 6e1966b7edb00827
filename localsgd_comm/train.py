"""Train a small byte-level GPT with DiLoCo on local CPU workers and compare its traffic with DDP's.

The main job (``localsgd-train``, also ``python -m localsgd_comm.train``). With no arguments it spawns 2 local CPU workers over the ``"localsgd"`` backend and trains a
small byte-level GPT (:mod:`localsgd_comm.model`) with DiLoCo on an embedded corpus
(:mod:`localsgd_comm.data`), shows a progress bar, prints a summary and writes
``metrics.json`` and ``loss.png`` to ``--out`` (default ``./localsgd_runs/<timestamp>``).
``--baseline ddp`` also trains plain DDP (gloo, fp32 gradients) on the same data.

Reusable API (benchmarks)::

    from localsgd_comm.train import TrainConfig, run_training
    metrics = run_training(TrainConfig(mode="diloco", workers=2, sync_every=25, steps=200))
    metrics["records"]  # per step: step, wall_s, tokens, bytes_sent, loss (+ val_loss at evals),
                        # cross_cluster_bytes, intra_cluster_bytes (bytes_sent is their sum)

Modes: ``"diloco"`` (DiLoCo over the default "localsgd" group), ``"ddp"`` (DDP over a gloo
group: fp32 gradient all-reduce every step), ``"ddp-localsgd"`` (DDP over the "localsgd" group:
its quantized all-reduce compresses the gradients every step).

Topologies of the DiLoCo run (``--clusters C``, ``--fsdp``; the ddp baselines stay flat DDP over
every worker): with ``clusters=C`` the workers form C clusters of ``workers / C`` consecutive
ranks. Inside a cluster the replica is trained as one: DDP over the cluster's fp32 (gloo) group
all-reduces the gradients every step (hierarchical DiLoCo, ``new_hierarchical_groups``), or with
``fsdp=True`` FSDP2 (``fully_shard`` on the "shard" dimension of a ``(C, workers / C)`` mesh)
shards it across the cluster's workers (``ShardedDiLoCo``). DiLoCo syncs across the clusters only
(the slow link). ``clusters == workers`` is one worker per cluster: plain DiLoCo. The metrics
report the bytes across clusters and inside them apart (a flat run's bytes all count as across);
under torchrun the world size is the worker count the clusters must divide.

Launching ranks yourself (network namespaces, several machines): run
``python -m localsgd_comm.train [options]`` once per rank with the torchrun environment
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, plus e.g. ``GLOO_SOCKET_IFNAME``);
each process then runs as one worker and rank 0 writes the outputs. From Python the same entry
is :func:`worker_main`. With :func:`run_training` the rendezvous is ``TrainConfig.master_addr``/
``master_port`` and ``TrainConfig.rank_env`` sets extra environment variables per rank.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
from multiprocessing import connection as mp_connection
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

# the outputs (summary table, metrics.json, loss.png, link estimates) live in train_report;
# importable from here as before
from .train_report import link_estimates, summary_table, write_outputs
from .train_topology import _Topology

MODES = ("diloco", "ddp", "ddp-localsgd")

__all__ = ["TrainConfig", "run_training", "run_modes", "worker_main", "main", "MODES", "mode_config"]


@dataclasses.dataclass
class TrainConfig:
    mode: str = "diloco"
    workers: int = 2
    sync_every: int = 25
    compression: str = "int8"
    outer_lr: float = 0.7
    # Not the DiLoCo paper's 0.9 (DiLoCo's own default, made for thousands of outer steps): this
    # job's default run has 8 outer steps, and with tens of outer steps 0.6 trained better in
    # benchmarks/results/diloco_tuning.md; measured on the default run: validation loss 2.25
    # with 0.6 against 2.36 with 0.9 (DDP at equal tokens: 2.20).
    outer_momentum: float = 0.6
    error_feedback: bool = False
    overlap: bool = False
    fragments: Optional[int] = None            # streaming DiLoCo (None: not streaming)
    overlap_steps: int = 0
    # Topology (mode "diloco"): None is one worker per replica (plain DiLoCo); C splits the workers
    # into C clusters of workers / C consecutive ranks, DDP inside each and DiLoCo across them.
    clusters: Optional[int] = None
    fsdp: bool = False                         # with clusters: FSDP2 inside each cluster instead of DDP
    model_size: str = "small"
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    seed: int = 0
    device: str = "cpu"
    data: Optional[str] = None
    eval_every: int = 50
    eval_batches: int = 4
    threads: int = 1
    backend: str = "localsgd"                  # default group; "gloo" runs DiLoCo's Python-composed path
    master_addr: str = "127.0.0.1"
    master_port: Optional[int] = None          # None: a free port on master_addr
    rank_env: Optional[List[Dict[str, str]]] = None  # per-rank extra environment (spawn mode)
    timeout_s: float = 1800.0
    progress: bool = True

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.workers

    @property
    def topology(self) -> str:
        """``"flat"`` (one worker per replica: plain DiLoCo, and the ddp modes), ``"hierarchical"``
        (DDP inside each cluster, DiLoCo across) or ``"fsdp"`` (FSDP2 inside, DiLoCo across)."""
        if self.mode != "diloco" or self.clusters is None:
            return "flat"
        if self.fsdp:
            return "fsdp"
        return "flat" if self.clusters == self.workers else "hierarchical"

    @property
    def cluster_size(self) -> int:
        """Workers per cluster (1 in a flat run)."""
        return 1 if self.topology == "flat" else self.workers // self.clusters

    def validate(self) -> None:
        from ._ops import FORMATS
        from .model import MODEL_SIZES
        checks = [
            (self.mode in MODES, f"mode: expected one of {MODES}, got {self.mode!r}"),
            (self.workers >= 1, f"workers: expected >= 1, got {self.workers}"),
            (self.sync_every >= 1, f"sync_every: expected >= 1, got {self.sync_every}"),
            (self.compression in FORMATS, f"compression: expected one of {FORMATS}, got {self.compression!r}"),
            (self.model_size in MODEL_SIZES, f"model_size: expected one of {sorted(MODEL_SIZES)}, got {self.model_size!r}"),
            (self.steps >= 1, f"steps: expected >= 1, got {self.steps}"),
            (self.batch_size >= 1 and self.seq_len >= 8, f"batch_size/seq_len: expected >= 1 / >= 8, got "
             f"{self.batch_size} / {self.seq_len}"),
            (self.backend in ("localsgd", "gloo", "nccl"), f"backend: expected localsgd, gloo or nccl, got {self.backend!r}"),
            (self.mode != "ddp-localsgd" or self.backend == "localsgd",
             f"mode ddp-localsgd: expected backend 'localsgd', got {self.backend!r}"),
            (self.device in ("cpu", "cuda"), f"device: expected 'cpu' or 'cuda', got {self.device!r}"),
            (self.rank_env is None or len(self.rank_env) == self.workers,
             f"rank_env: expected one dict per worker ({self.workers}), got {None if self.rank_env is None else len(self.rank_env)}"),
            (math.isfinite(self.lr) and self.lr > 0, f"lr: expected a finite number > 0, got {self.lr}"),
            (math.isfinite(self.outer_lr) and self.outer_lr > 0, f"outer_lr: expected a finite number > 0, got {self.outer_lr}"),
            (0.0 <= self.outer_momentum < 1.0, f"outer_momentum: expected a number in [0, 1), got {self.outer_momentum}"),
            (not (self.error_feedback and self.compression == "none"),
             "error_feedback: expected a quantizing compression (int8, int4 or fp8), got compression 'none'"),
            (self.eval_every >= 1, f"eval_every: expected >= 1, got {self.eval_every}"),
            (self.seed >= 0, f"seed: expected >= 0, got {self.seed}"),
            (self.fragments is None or 1 <= self.fragments <= self.sync_every,
             f"fragments: expected an integer in [1, sync_every={self.sync_every}], got {self.fragments}"),
            (self.fragments is not None or self.overlap_steps == 0,
             f"overlap_steps: expected --fragments with it (streaming DiLoCo), got {self.overlap_steps} without"),
            (0 <= self.overlap_steps <= self.sync_every,
             f"overlap_steps: expected an integer in [0, sync_every={self.sync_every}], got {self.overlap_steps}"),
            (self.fragments is None or not self.overlap,
             "overlap/fragments: expected one of the two (overlap is fragments 1 with overlap_steps = sync_every), "
             "got both"),
        ] + self._topology_checks()
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.fragments is not None and self.mode == "diloco":
            from .model import GPT, config_for
            n = len(list(GPT(config_for(self.model_size, self.seq_len)).parameters()))
            if self.fragments > n:  # the library's fragment rule refuses it inside the workers
                raise ValueError(f"fragments: expected at most the number of parameters of the {self.model_size} "
                                 f"GPT ({n}: a fragment holds whole parameters or parts of them), got {self.fragments}")
        if self.data is not None:
            if not os.path.isfile(self.data):
                raise ValueError(f"data: expected a readable file, got {self.data!r}")
            need = min_data_bytes(self.seq_len)
            size = os.path.getsize(self.data)
            if size < need:
                raise ValueError(f"data: {self.data!r} has {size} bytes; a run with seq_len {self.seq_len} needs at "
                                 f"least {need} (training and validation windows)")
        if self.device == "cuda":
            if torch.version.cuda is None:
                raise ValueError(f"device: 'cuda' needs a CUDA build of torch; torch {torch.__version__} is a CPU "
                                 "build (use device 'cpu')")
            if not torch.cuda.is_available():
                raise ValueError(f"device: 'cuda' but no CUDA device is visible (torch {torch.__version__}, "
                                 "CUDA_VISIBLE_DEVICES={!r})".format(os.environ.get("CUDA_VISIBLE_DEVICES")))
        if self.backend == "nccl":
            if not dist.is_nccl_available():
                raise ValueError(f"backend: 'nccl' is not available in torch {torch.__version__} "
                                 f"({'a CPU build' if torch.version.cuda is None else 'built without NCCL'}); "
                                 "use backend 'localsgd' or 'gloo'")
            if self.device != "cuda":
                raise ValueError("backend: 'nccl' carries CUDA tensors only; use device 'cuda' or backend 'localsgd'")


    def _topology_check_world(self) -> None:
        """The topology checks alone (a worker started by torchrun learns the world size late)."""
        for ok, msg in self._topology_checks():
            if not ok:
                raise ValueError(msg)

    def _topology_checks(self) -> list:
        c, w = self.clusters, self.workers
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            return [(False, f"clusters: expected an integer >= 1, got {c!r}")]
        return [
            (c is None or self.mode == "diloco",
             f"clusters: expected mode 'diloco' (clusters set the DiLoCo run's topology; the ddp modes are flat DDP "
             f"over every worker), got mode {self.mode!r}"),
            (not self.fsdp or self.mode == "diloco",
             f"fsdp: expected mode 'diloco' (FSDP2 inside clusters, DiLoCo across), got mode {self.mode!r}"),
            (c is None or w % c == 0,
             f"clusters: expected a divisor of workers={w} (clusters of workers / clusters consecutive ranks), "
             f"got {c}"),
            (not self.fsdp or c is not None,
             "fsdp: expected --clusters C with it (FSDP2 shards the model across the workers of each cluster), "
             "got no clusters"),
            (not self.fsdp or c is None or w % c or w // c >= 2,
             f"fsdp: expected clusters of at least 2 workers to shard the model across, got {w} workers in {c} "
             "clusters (1 each: leave --fsdp out for plain DiLoCo)"),
            # DiLoCo(hierarchy=..., overlap=True) raises; streaming is its background form
            (not (self.topology == "hierarchical" and self.overlap),
             f"overlap: not supported with clusters of several workers (hierarchical DiLoCo, --clusters {c}); "
             f"--fragments 1 --overlap-steps {self.sync_every} runs its sync in the background instead"),
        ]


def mode_config(cfg: TrainConfig, mode: str) -> TrainConfig:
    """The configuration of one run of ``run_modes``: ``cfg`` for ``cfg.mode`` itself, and for the
    other modes (the baselines) the same without a topology (flat DDP over every worker)."""
    if mode == cfg.mode:
        return cfg
    return dataclasses.replace(cfg, mode=mode, clusters=None, fsdp=False)


def min_data_bytes(seq_len: int) -> int:
    """The smallest --data file a run can use: load_corpus's floor, and enough bytes for one
    training window after ByteData sets aside the validation tail (5%, at least a window)."""
    from .data import MIN_DATA_BYTES
    need = MIN_DATA_BYTES
    while need - max(need // 20, seq_len + 2) < seq_len + 2:
        need += seq_len
    return need


def _check_port_free(addr: str, port: int) -> None:
    """--master-port must be bindable on --master-addr before workers start (they would fail
    with a rendezvous traceback each)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((addr, port))
    except OSError as e:
        raise ValueError(f"master_port: port {port} on {addr} cannot be used ({e.strerror or e}); pass a free port "
                         "or leave --master-port out to take one") from None


# ---------------------------------------------------------------------------------------- worker
def _lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup then cosine decay to 10%: the usual small-GPT schedule."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def _evaluate(model, batches, device) -> float:
    was = model.training
    model.eval()
    tot = 0.0
    for x, y in batches:
        tot += float(model(x.to(device), y.to(device)))
    model.train(was)
    return tot / len(batches)


def _train_one(cfg: TrainConfig, rank: int, world: int, data) -> Optional[dict]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .backend import reset_backend_stats
    from .diloco import DiLoCo
    from .diloco.agreement import agree
    from .model import GPT, config_for

    device = torch.device(cfg.device if cfg.device == "cpu" else f"cuda:{rank % torch.cuda.device_count()}")
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP/DiLoCo broadcast it anyway)
    model = GPT(config_for(cfg.model_size, cfg.seq_len)).to(device)
    nparams = model.num_params()
    topo = _Topology(cfg, world, device)
    group = None
    if cfg.mode == "diloco":
        net = topo.wrap(model)
        # after fully_shard: the inner optimizer holds the sharded (DTensor) parameters
        inner = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
        opt = DiLoCo(net, inner, sync_every=cfg.sync_every, outer_lr=cfg.outer_lr,
                     outer_momentum=cfg.outer_momentum, compression=cfg.compression,
                     error_feedback=cfg.error_feedback, overlap=cfg.overlap, fragments=cfg.fragments,
                     overlap_steps=cfg.overlap_steps, **topo.diloco_kwargs())
    else:
        inner = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
        # plain DDP: fp32 gradients over gloo; ddp-localsgd: over the default (quantizing) group
        group = dist.new_group(backend="gloo" if cfg.device == "cpu" else "nccl") if cfg.mode == "ddp" else None
        net = DDP(model, process_group=group)
        opt = inner
    reset_backend_stats(group)
    topo.reset()
    val = data.val_batches(cfg.eval_batches, cfg.batch_size)
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm
        # A thread lock, not tqdm's default multiprocessing one: a worker stopped on Ctrl-C cannot
        # release a named semaphore, and the resource tracker would warn about it at exit.
        tqdm.set_lock(threading.RLock())
        bar = tqdm(total=cfg.steps, desc=f"{cfg.mode} x{world}", unit="step", dynamic_ncols=True)
    records = []
    dist.barrier()
    t0 = time.perf_counter()
    eval_time = 0.0
    eval_intra = 0  # fsdp: the shard group's bytes of the evaluations' all-gathers (not training traffic)
    for step in range(cfg.steps):
        for g in inner.param_groups:
            g["lr"] = _lr_at(cfg, step)
        x, y = data.batch(rank, step, cfg.batch_size)
        loss = net(x.to(device), y.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = step == cfg.steps - 1
        if cfg.mode == "diloco" and last and cfg.fragments is not None:
            opt.flush()  # streaming: merge the fragments in flight (each synced on its own schedule)
        elif cfg.mode == "diloco" and last:
            if opt.local_step % cfg.sync_every:  # end on a sync: every replica holds the same model
                opt.sync()
            # overlap: apply the last launched reduce (flushing before that sync left it pending
            # and the final partial round was discarded)
            opt.flush()
        evaluate = last or (step + 1) % cfg.eval_every == 0
        if rank == 0:
            lv = loss.item()
            rec = {"step": step + 1, "wall_s": time.perf_counter() - t0 - eval_time,
                   "tokens": (step + 1) * cfg.tokens_per_step, "loss": lv}
            cross, src, intra, intra_src = topo.bytes(cfg, opt, group, nparams, step + 1, eval_intra)
            rec["bytes_sent"] = cross + (intra or 0)
            rec["cross_cluster_bytes"], rec["intra_cluster_bytes"] = cross, intra
            records.append(rec)
        if evaluate and (rank == 0 or topo.kind == "fsdp"):
            # a sharded model's forward needs every worker of the cluster: all evaluate, rank 0 records
            te = time.perf_counter()
            before = topo.intra_counter()
            val_loss = _evaluate(model, val, device)
            topo.reshard(model)
            after = topo.intra_counter()
            eval_intra += (after - before) if before is not None and after is not None else 0
            eval_time += time.perf_counter() - te
            if rank == 0:
                rec["val_loss"] = val_loss
        if bar is not None:
            bar.set_postfix(loss=f"{lv:.3f}", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    # every worker's parameters bitwise equal at the end? (a 16-byte digest per rank, after the
    # last record: not in the byte counts). Streaming runs: no, by design (each fragment has
    # trained locally since its own last merge).
    identical = agree({}, topo.replica_tensors(model), None, device)
    dist.barrier()
    if rank != 0:
        return None
    final = records[-1]
    return {"mode": cfg.mode, "workers": world, "params": nparams, "config": dataclasses.asdict(cfg),
            "final_val_loss": final["val_loss"], "tokens": final["tokens"], "bytes_sent_per_rank": final["bytes_sent"],
            "bytes_source": src if intra_src in (src, "none (one worker per cluster)") else
            f"{src} across clusters, {intra_src} inside", "wall_s": final["wall_s"], "records": records,
            "syncs": opt.sync_count if cfg.mode == "diloco" else None,
            "applied_syncs": opt.stats["syncs"] if cfg.mode == "diloco" else None,
            "topology": topo.kind, "clusters": world // topo.k, "cluster_size": topo.k,
            "cross_cluster_bytes_per_rank": final["cross_cluster_bytes"], "cross_bytes_source": src,
            "intra_cluster_bytes_per_rank": final["intra_cluster_bytes"], "intra_bytes_source": intra_src,
            "replicas_identical": identical,
            "torch": torch.__version__}


def worker_main(cfg: TrainConfig, modes: Optional[List[str]] = None, init: bool = True) -> Optional[List[dict]]:
    """Run ``modes`` (default ``[cfg.mode]``) as one worker of a torchrun-style job.

    Reads ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` from the environment when
    ``init`` (the default group uses the "localsgd" backend). Returns the metrics on rank 0,
    None elsewhere."""
    from . import data as data_mod
    torch.set_num_threads(cfg.threads)
    if init:
        import localsgd_comm  # noqa: F401  registers the backend
        dist.init_process_group(cfg.backend, timeout=datetime.timedelta(seconds=cfg.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    data = data_mod.ByteData(data_mod.load_corpus(cfg.data), cfg.seq_len, cfg.seed)
    out = []
    try:
        for m in modes or [cfg.mode]:
            run_cfg = dataclasses.replace(mode_config(cfg, m), workers=world)
            run_cfg._topology_check_world()  # under torchrun the world size is known only here
            out.append(_train_one(run_cfg, rank, world, data))
    finally:
        if init:
            dist.destroy_process_group()
    return out if rank == 0 else None


def _spawn_entry(cfg: TrainConfig, modes, rank: int, port: int, conn) -> None:
    try:
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(cfg.workers), "LOCAL_RANK": str(rank),
                           "MASTER_ADDR": cfg.master_addr, "MASTER_PORT": str(port),
                           "OMP_NUM_THREADS": str(cfg.threads)})
        if cfg.rank_env is not None:
            os.environ.update(cfg.rank_env[rank])
        out = worker_main(cfg, modes)
        buf = io.BytesIO()
        torch.save(out, buf)
        conn.send((True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent
        conn.send((False, traceback.format_exc()))
    finally:
        conn.close()


def _free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def run_modes(cfg: TrainConfig, modes: List[str]) -> List[dict]:
    """Spawn ``cfg.workers`` local processes and run ``modes`` in them one after the other
    (one spawn + rendezvous for all). Returns rank 0's metrics, one dict per mode."""
    import multiprocessing as mp
    for m in modes:
        mode_config(cfg, m).validate()
    port = cfg.master_port or _free_port(cfg.master_addr)
    ctx = mp.get_context("spawn")
    # One pipe per worker, not a Queue: a Queue's semaphores outlive workers killed on Ctrl-C
    # (the resource tracker then warns about leaked semaphores after our one-line message).
    pipes = [ctx.Pipe(duplex=False) for _ in range(cfg.workers)]
    procs = [ctx.Process(target=_spawn_entry, args=(cfg, modes, r, port, pipes[r][1]), daemon=True)
             for r in range(cfg.workers)]
    # The workers ignore SIGINT (an ignored signal stays ignored across exec): Ctrl-C in a
    # terminal reaches the whole process group, and this process alone answers it, by stopping
    # the workers, instead of every worker printing its own KeyboardInterrupt traceback.
    old_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN) if threading.current_thread() is threading.main_thread() else None
    try:
        for p in procs:
            p.start()
    finally:
        if old_sigint is not None:
            signal.signal(signal.SIGINT, old_sigint)
    for _, send_end in pipes:
        send_end.close()  # the worker holds the only writer: its death closes the pipe
    waiting = {r: pipes[r][0] for r in range(cfg.workers)}
    results, deadline = {}, time.monotonic() + cfg.timeout_s
    interrupted = False
    try:
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(f"training workers did not finish within {cfg.timeout_s:.0f} s")
            for conn in mp_connection.wait(list(waiting.values()), timeout=1.0):
                rank = next(r for r, c in waiting.items() if c is conn)
                del waiting[rank]
                try:
                    ok, payload = conn.recv()
                except EOFError:
                    procs[rank].join(timeout=5)
                    raise RuntimeError(f"training worker {rank} exited with code {procs[rank].exitcode} "
                                       "without a report") from None
                if not ok:
                    raise RuntimeError(f"training worker {rank} failed:\n{payload}")
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        for p in procs:
            p.join(timeout=0 if interrupted else 10)
            if p.is_alive():
                p.kill()
                p.join()
        for conn, _ in pipes:
            conn.close()
    return results[0]


def run_training(cfg: TrainConfig) -> dict:
    """One training run (``cfg.mode``) on ``cfg.workers`` spawned local processes."""
    return run_modes(cfg, [cfg.mode])[0]


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="localsgd-train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Example: localsgd-train --baseline ddp (also trains plain DDP on the same data and compares). "
               "Outputs: a summary on stdout, metrics.json and loss.png in --out.")
    p.add_argument("--mode", choices=MODES, default=d.mode,
                   help="diloco: DiLoCo over the localsgd backend; ddp: plain DDP, fp32 gradients over gloo every "
                        "step; ddp-localsgd: DDP whose gradients the localsgd backend compresses every step")
    p.add_argument("--baseline", choices=["ddp", "ddp-localsgd"], default=None,
                   help="also train this baseline on the same data and compare")
    p.add_argument("--workers", type=int, default=d.workers, help="local worker processes (one CPU thread each)")
    p.add_argument("--sync-every", type=int, default=d.sync_every, help="inner steps between DiLoCo syncs (H)")
    p.add_argument("--compression", default=d.compression, help="pseudo-gradient format: none, int8, int4 or fp8")
    p.add_argument("--outer-lr", type=float, default=d.outer_lr, help="outer SGD learning rate")
    p.add_argument("--outer-momentum", type=float, default=d.outer_momentum,
                   help="outer Nesterov momentum (0.6 trains better than the paper's 0.9 with few outer steps)")
    p.add_argument("--error-feedback", action="store_true", help="carry the quantization error into the next sync")
    p.add_argument("--overlap", action="store_true",
                   help="delayed outer step: each sync's all-reduce runs during the next round")
    p.add_argument("--fragments", type=int, default=None, metavar="P",
                   help="streaming DiLoCo: sync the model in P fragments staggered over the H steps")
    p.add_argument("--overlap-steps", type=int, default=0, metavar="TAU",
                   help="streaming DiLoCo: inner steps each fragment's all-reduce runs in the background (0..H)")
    p.add_argument("--clusters", type=int, default=None, metavar="C",
                   help="split the workers into C clusters of workers/C consecutive ranks: DDP (fp32 gradients every "
                        "step) inside each cluster, DiLoCo across clusters (hierarchical DiLoCo); default: one "
                        "worker per cluster (plain DiLoCo)")
    p.add_argument("--fsdp", action="store_true",
                   help="with --clusters: shard the model with FSDP2 (fully_shard) across each cluster's workers "
                        "instead of DDP; DiLoCo syncs the shards across clusters")
    p.add_argument("--model-size", default=d.model_size, help="GPT size: tiny, small, medium or large")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per worker")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per worker and step")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens (bytes) per sequence")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the inner AdamW (warmup + cosine)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between validation evaluations")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the initialization and the data order")
    p.add_argument("--device", default=d.device, choices=["cpu", "cuda"], help="device of the workers")
    p.add_argument("--data", default=None, help="train on this text file instead of the embedded corpus")
    p.add_argument("--out", default=None, help="output directory (default: ./localsgd_runs/<timestamp>)")
    p.add_argument("--backend", default=d.backend, choices=["localsgd", "gloo", "nccl"],
                   help="backend of the default process group")
    p.add_argument("--master-addr", default=d.master_addr, help="rendezvous address of the spawned workers")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free port)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _flag_error(msg: str) -> str:
    """A TrainConfig message ("sync_every: expected ...") in terms of the command line's flags."""
    field, sep, rest = msg.partition(": ")
    if not sep:
        return msg
    flags = " / ".join("--" + f.replace("_", "-") for f in field.split("/"))
    return f"{flags}: {rest}"


def _check_out_dir(path: str) -> bool:
    """Create the output directory now, so that a bad --out fails before training, not after.
    Returns whether it was created here (a run that ends without writing removes it again)."""
    created = not os.path.exists(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"out: {path!r} exists and is not a directory; pass a new or existing directory")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".localsgd-write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"out: cannot write to {path!r} ({e.strerror or e}); pass a writable directory") from None
    return created


def _remove_if_unused(path: str, created: bool) -> None:
    """Remove an output directory this run created and never wrote to (Ctrl-C, a failed run)."""
    if created:
        try:
            os.rmdir(path)  # only succeeds when empty
        except OSError:
            pass


def _topology_phrase(cfg: TrainConfig) -> str:
    if cfg.clusters is None:
        return ""
    if cfg.topology == "flat":
        return f", {cfg.clusters} clusters of 1 worker: plain DiLoCo"
    inside = "FSDP2 shards" if cfg.topology == "fsdp" else "DDP fp32 gradients"
    return f", {cfg.clusters} clusters of {cfg.cluster_size} workers ({inside} inside, DiLoCo across)"


def _start_line(cfg: TrainConfig, modes: List[str]) -> str:
    from .model import GPT, STEP_SECONDS_2CPU, config_for
    n = GPT(config_for(cfg.model_size, cfg.seq_len)).num_params()
    what = []
    for m in modes:
        if m == "diloco":
            what.append(f"DiLoCo {cfg.compression}, H={cfg.sync_every} ({cfg.steps // cfg.sync_every} syncs)"
                        + (f", streaming {cfg.fragments} fragments, overlap {cfg.overlap_steps} steps"
                           if cfg.fragments is not None else "") + _topology_phrase(cfg))
        else:
            what.append("plain DDP (fp32 over gloo)" if m == "ddp" else "DDP over localsgd (compressed gradients)")
    per_step = STEP_SECONDS_2CPU.get(cfg.model_size, 0.2) * max(1.0, cfg.workers / 2) * cfg.batch_size / 16
    expect = 15 + len(modes) * cfg.steps * per_step
    return (f"localsgd-train: {cfg.workers} workers, {cfg.model_size} GPT ({n:,} params), {cfg.steps} steps of "
            f"{cfg.batch_size}x{cfg.seq_len} tokens per worker: {'; then '.join(what)}. Expected about "
            f"{expect:.0f} s on 2 CPU cores (about 15 s to start the workers).")


def main(argv: Optional[List[str]] = None) -> int:
    a = _parser().parse_args(argv)
    cfg = TrainConfig(mode=a.mode, workers=a.workers, sync_every=a.sync_every, compression=a.compression,
                      outer_lr=a.outer_lr, outer_momentum=a.outer_momentum, error_feedback=a.error_feedback,
                      overlap=a.overlap, fragments=a.fragments, overlap_steps=a.overlap_steps,
                      clusters=a.clusters, fsdp=a.fsdp, model_size=a.model_size, steps=a.steps, batch_size=a.batch_size,
                      seq_len=a.seq_len, lr=a.lr, eval_every=a.eval_every, seed=a.seed, device=a.device,
                      data=a.data, backend=a.backend, master_addr=a.master_addr, master_port=a.master_port,
                      progress=not a.no_progress, warmup_steps=min(TrainConfig.warmup_steps, max(1, a.steps // 10)))
    modes = [cfg.mode] + ([a.baseline] if a.baseline and a.baseline != cfg.mode else [])
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if under_torchrun and os.environ["WORLD_SIZE"].isdigit():
        cfg.workers = int(os.environ["WORLD_SIZE"])  # one process per rank: the world is the worker count
    out = a.out or os.path.join("localsgd_runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    try:
        for m in modes:
            mode_config(cfg, m).validate()
        if a.master_port is not None and not 0 < a.master_port < 65536:
            raise ValueError(f"master_port: expected a port in 1..65535, got {a.master_port}")
        if a.master_port is not None and not under_torchrun:
            _check_port_free(cfg.master_addr, a.master_port)
        created = False
        if not under_torchrun or os.environ.get("RANK") == "0":
            created = _check_out_dir(out)
    except ValueError as e:
        print(f"localsgd-train: error: {_flag_error(str(e))}", file=sys.stderr)
        return 2
    try:
        return _run_and_report(cfg, modes, out, under_torchrun)
    finally:
        _remove_if_unused(out, created)


def _run_and_report(cfg: TrainConfig, modes: List[str], out: str, under_torchrun: bool) -> int:
    try:
        if under_torchrun:
            results = worker_main(cfg, modes)
            if results is None:
                return 0
        else:
            print(_start_line(cfg, modes), flush=True)
            results = run_modes(cfg, modes)
    except KeyboardInterrupt:
        # after a progress bar, whose line tqdm leaves open, start a new line first
        print(("\n" if cfg.progress else "") + "localsgd-train: interrupted; the workers were stopped and nothing was "
              "written", file=sys.stderr)
        return 130
    paths = write_outputs(results, out)
    print(summary_table(results))
    print(link_estimates(results))
    print(f"metrics: {paths['metrics']}\nloss curves: {paths['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
