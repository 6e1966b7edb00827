"""DiLoCo on a GPU: 2 ranks sharing one CUDA device over the "localsgd" backend (its CUDA tensors
travel over gloo through the staged path: NCCL refuses two ranks on one device), training the
byte-level GPT, then the compressed all-reduce of a large CUDA tensor timed against gloo's own
fp32 all-reduce of CUDA tensors.

What it checks and measures (one JSON record, rank 0's):

* replicas bitwise identical after the last sync (SHA-256 of every parameter's bytes, per rank);
* loss at the start and the end, validation loss, and no non-finite loss;
* the time of an inner step and of a sync (a step that syncs minus a step that does not, each
  timed with a device synchronisation around it, medians);
* the staged all-reduce: seconds per call, tensor bytes/s and wire bytes/s (the backend's own
  counters) for int8 and int4 at ``--allreduce-numel`` elements, next to gloo fp32.

Usage::

    python -m localsgd_comm.bench.gpu_train --out gpu_train.json [--steps 60 --sync-every 10]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from datetime import timedelta


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-size", default="small")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--sync-every", type=int, default=10)
    ap.add_argument("--compression", default="int8")
    ap.add_argument("--allreduce-numel", type=int, default=64 << 20)
    ap.add_argument("--allreduce-calls", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: the same run on CPU tensors (to test this script without a GPU)")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--out", help="JSON result file (parent)")
    ap.add_argument("--result", help=argparse.SUPPRESS)  # set by the launcher for rank 0
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.steps % a.sync_every:
        ap.error(f"--steps must be a multiple of --sync-every (the run ends on a sync), got {a.steps} and {a.sync_every}")
    return a


def _sha(model) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _sync(torch, x):
    if x.is_cuda:
        torch.cuda.synchronize()


def _time_allreduce(dist, torch, group, x, calls, stats_fn):
    dist.all_reduce(x, op=dist.ReduceOp.AVG, group=group)  # warm-up: buffers, pinned staging
    _sync(torch, x)
    b0 = stats_fn(group) if stats_fn else None
    times = []
    for _ in range(calls):
        dist.barrier(group=group)
        t = time.perf_counter()
        dist.all_reduce(x, op=dist.ReduceOp.AVG, group=group)
        _sync(torch, x)
        times.append(time.perf_counter() - t)
    wire = (stats_fn(group) - b0) / calls if stats_fn else None
    s = statistics.median(times)
    return {"seconds": s, "tensor_gbytes_per_s": x.numel() * x.element_size() / s / 1e9,
            "wire_bytes_per_call": wire, "wire_gbytes_per_s": None if wire is None else wire / s / 1e9}


def worker(a) -> None:
    import torch
    import torch.distributed as dist

    import localsgd_comm
    from localsgd_comm import BackendOptions
    from localsgd_comm.data import ByteData, load_corpus
    from localsgd_comm.model import GPT, config_for

    rank = int(os.environ["RANK"])
    if a.device == "cuda":
        torch.cuda.set_device(0)  # every rank on the one GPU
        dev = torch.device("cuda", 0)
    else:
        torch.set_num_threads(1)
        dev = torch.device("cpu")
    dist.init_process_group("localsgd", timeout=timedelta(seconds=a.timeout),
                            pg_options=BackendOptions(format=a.compression, cuda_inner="gloo"))
    torch.manual_seed(0)
    model = GPT(config_for(a.model_size, a.seq_len)).to(dev)
    inner = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01, betas=(0.9, 0.95))
    opt = localsgd_comm.DiLoCo(model, inner, sync_every=a.sync_every, compression=a.compression,
                               outer_lr=0.7, outer_momentum=0.6)
    data = ByteData(load_corpus(), a.seq_len, seed=0)
    plain, syncing, losses = [], [], []
    for step in range(a.steps):
        x, y = data.batch(rank, step, a.batch_size)
        _sync(torch, next(model.parameters()))
        t = time.perf_counter()
        loss = model(x.to(dev), y.to(dev))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(torch, loss)
        (syncing if (step + 1) % a.sync_every == 0 else plain).append(time.perf_counter() - t)
        losses.append(float(loss))
    with torch.no_grad():
        val = sum(float(model(x.to(dev), y.to(dev))) for x, y in data.val_batches(4, a.batch_size)) / 4
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, _sha(model))
    rec = {"device": a.device, "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else None, "torch": torch.__version__, "workers": dist.get_world_size(),
           "model_size": a.model_size, "params": model.num_params(), "steps": a.steps, "sync_every": a.sync_every,
           "compression": a.compression, "first_loss": losses[0], "last_loss": losses[-1], "val_loss": val,
           "all_losses_finite": all(l == l and abs(l) != float("inf") for l in losses),
           "replica_sha256": digests, "replicas_identical": len(set(digests)) == 1,
           "step_s_median": statistics.median(plain), "sync_step_s_median": statistics.median(syncing),
           "sync_s_estimate": statistics.median(syncing) - statistics.median(plain),
           "diloco_stats": {k: v for k, v in opt.stats.items() if isinstance(v, (int, float))},
           "cuda_impl": localsgd_comm.cuda_implementation()}
    # ---- the staged path at size: compressed all-reduce vs gloo's fp32 all-reduce of CUDA tensors
    g = torch.Generator(device=dev).manual_seed(rank)
    x = torch.randn(a.allreduce_numel, generator=g, device=dev)
    stats = lambda grp: int(localsgd_comm.get_backend_stats(grp)["bytes_sent"])  # noqa: E731
    rec["allreduce_numel"] = a.allreduce_numel
    rec["allreduce"] = {f"localsgd {a.compression}": _time_allreduce(dist, torch, None, x, a.allreduce_calls, stats)}
    for fmt in ("int4",):
        grp = dist.new_group(backend="localsgd", pg_options=BackendOptions(format=fmt, cuda_inner="gloo"))
        rec["allreduce"][f"localsgd {fmt}"] = _time_allreduce(dist, torch, grp, x, a.allreduce_calls, stats)
    gloo = dist.new_group(backend="gloo")
    rec["allreduce"]["gloo fp32"] = _time_allreduce(dist, torch, gloo, x, a.allreduce_calls, None)
    dist.barrier()
    if rank == 0 and a.result:
        from .launch import write_result
        write_result(a.result, rec)
    dist.destroy_process_group()


def main(argv=None) -> int:
    a = _args(argv)
    if a.worker:
        worker(a)
        return 0
    import torch
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_train: no CUDA device visible", file=sys.stderr)
        return 2
    from .launch import run_ranks
    fwd = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
           if k not in ("out", "result", "worker", "workers") and v is not None]
    t0 = time.perf_counter()
    rec = run_ranks(a.workers, "localsgd_comm.bench.gpu_train", ["--worker", *fwd], timeout_s=a.timeout)
    rec["seconds"] = time.perf_counter() - t0
    text = json.dumps(rec, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    ok = rec["replicas_identical"] and rec["all_losses_finite"] and rec["last_loss"] < rec["first_loss"]
    print(f"gpu_train: replicas {'identical' if rec['replicas_identical'] else 'DIFFER'}, loss "
          f"{rec['first_loss']:.3f} -> {rec['last_loss']:.3f} (val {rec['val_loss']:.3f}), sync "
          f"{1e3 * rec['sync_s_estimate']:.1f} ms, step {1e3 * rec['step_s_median']:.1f} ms")
    for k, v in rec["allreduce"].items():
        wire = "" if v["wire_gbytes_per_s"] is None else f", wire {v['wire_gbytes_per_s']:.2f} GB/s"
        print(f"gpu_train: all-reduce {k}: {1e3 * v['seconds']:.1f} ms, tensor {v['tensor_gbytes_per_s']:.2f} GB/s{wire}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
