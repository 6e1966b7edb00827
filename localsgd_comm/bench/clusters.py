"""Multi-cluster and edge training on shaped links, launched the way users launch them.

Multi-cluster: 2 clusters x 2 workers. Each cluster is one network namespace (its 2 workers
talk over the namespace's own address, i.e. the kernel's local path: fast and unshaped); the
clusters are joined by a shaped link (``--inter-mbit``, each namespace's uplink). Each cluster
is started with its own ``torchrun --nnodes 2 --node-rank C --nproc-per-node 2 --master-addr
<cluster 0's address>`` inside its namespace, as two clusters would be. Methods:

* ``flat-ddp``     DDP over gloo across all 4 workers (fp32 ring; two ring edges cross the slow link);
* ``flat-diloco``  DiLoCo over the ``localsgd`` backend across all 4 workers (4 replicas);
* ``hier-diloco``  DDP inside each cluster (gloo, fp32, every step), DiLoCo between the clusters
  (``new_hierarchical_groups(2)``: 2 replicas; each worker syncs its half of the model).

Sharded replicas (``localsgd-bench clusters-fsdp``), same 2 x 2 layout on a 2-D mesh
``("replicate", "shard")`` whose shard dimension is a cluster:

* ``hsdp-ddp``     FSDP2's HSDP (``fully_shard`` on the 2-D mesh, gloo): reduce-scatter inside the
  cluster and an fp32 all-reduce of each gradient shard across the clusters, every step;
* ``fsdp-diloco``  ``fully_shard`` on ``mesh["shard"]`` inside each cluster, DiLoCo across the
  clusters over ``mesh.get_group("replicate")`` (each worker syncs its shard, compressed).

Edge: 4 workers, each behind its own slow link (``--edge-mbit``), one at half the compute speed
(after each step it sleeps for its own measured step time): DDP and DiLoCo, with and without
that straggler.

Every run first times 10 compute-only steps on every worker at once (the compute time the
planner is given), then trains. Measured: loss per step (mean over workers), the slowest
worker's elapsed time, and the tx bytes of every namespace's uplink (real bytes on the slow
link). The planner's prediction of each run's time per step is stored next to the measurement.

Rank entry point: ``python -m localsgd_comm.bench.clusters --worker ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import List

MULTI = ["flat-ddp", "flat-diloco", "hier-diloco"]
EDGE = ["edge-ddp", "edge-diloco"]
FSDP = ["hsdp-ddp", "fsdp-diloco"]


# ------------------------------------------------------------------------------------------
# rank side
# ------------------------------------------------------------------------------------------
def _worker(a) -> None:
    import torch
    import torch.distributed as dist
    from datetime import timedelta

    from .launch import write_result
    from .netns import read_iface_bytes
    from .time_to_loss import lr_schedule, measure_compute

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    m = a.method
    ddp_like = m in ("flat-ddp", "edge-ddp", "hsdp-ddp")
    import localsgd_comm
    backend = "gloo" if ddp_like else "localsgd"
    dist.init_process_group(backend, timeout=timedelta(seconds=a.timeout))
    side = dist.new_group(backend="gloo")  # results only, after training
    from torch.nn.parallel import DistributedDataParallel as DDP

    from localsgd_comm.data import ByteData, load_corpus
    from localsgd_comm.model import GPT, config_for

    torch.manual_seed(0)
    model = GPT(config_for(a.model, seq_len=a.seq))
    n_params = sum(p.numel() for p in model.parameters())
    data = ByteData(load_corpus(), a.seq, seed=0)
    batches = [data.batch(rank, i, a.batch) for i in range(a.steps)]
    slow = rank == a.slow_rank

    # compute-only calibration, every worker at once (the planner's "step time")
    dist.barrier(side)
    compute_s = measure_compute(config_for(a.model, seq_len=a.seq), batches, a.lr)
    sleep_s = compute_s if slow else 0.0

    bucket = max(25, 4 * n_params / 2**20 + 1)  # one bucket: one all-reduce per step
    if m in ("flat-ddp", "edge-ddp"):
        net = DDP(model, bucket_cap_mb=bucket)
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))
        stepper = opt
    elif m in ("flat-diloco", "edge-diloco"):
        net = model
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))
        stepper = localsgd_comm.DiLoCo(model, opt, sync_every=a.sync_every, compression=a.format,
                                       outer_lr=0.7, outer_momentum=0.6)
    elif m == "hier-diloco":
        h = localsgd_comm.new_hierarchical_groups(a.cluster_size, intra_backend="gloo")
        net = DDP(model, process_group=h.intra, bucket_cap_mb=bucket)
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))
        stepper = localsgd_comm.DiLoCo(net, opt, sync_every=a.sync_every, compression=a.format,
                                       outer_lr=0.7, outer_momentum=0.6, hierarchy=h)
    elif m in FSDP:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world // a.cluster_size, a.cluster_size),
                                mesh_dim_names=("replicate", "shard"))
        on = mesh if m == "hsdp-ddp" else mesh["shard"]  # HSDP: gradients all-reduced across clusters
        for blk in model.blocks:
            fully_shard(blk, mesh=on)
        fully_shard(model, mesh=on)
        net = model
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))
        stepper = opt if m == "hsdp-ddp" else localsgd_comm.DiLoCo(
            model, opt, sync_every=a.sync_every, compression=a.format, outer_lr=0.7, outer_momentum=0.6,
            group=mesh.get_group("replicate"))
    else:
        raise ValueError(f"method: expected one of {MULTI + EDGE + FSDP}, got {m!r}")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(a.steps))
    losses, times = [], []
    dist.barrier(side)
    c0 = read_iface_bytes(a.ifname) if a.ifname else None
    t0 = time.perf_counter()
    for step in range(a.steps):
        if sleep_s:
            time.sleep(sleep_s)  # the straggler: half the compute speed
        x, y = batches[step]
        loss = net(x, y)
        loss.backward()
        stepper.step()
        stepper.zero_grad()
        sched.step()
        losses.append(float(loss.detach().full_tensor() if hasattr(loss, "full_tensor") else loss.detach()))
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - t0
    c1 = read_iface_bytes(a.ifname) if a.ifname else None
    tx = (c1["tx_bytes"] - c0["tx_bytes"]) if c0 and c1 else -1.0
    # one reading per namespace: local rank 0 of a cluster (its ranks share the uplink); every
    # rank on the edge (one namespace each)
    leader = 1.0 if (local_rank == 0 or a.cluster_size == 1) else 0.0
    rec = torch.tensor(losses + times + [compute_s + sleep_s, tx, leader], dtype=torch.float64)
    allrec = [torch.empty_like(rec) for _ in range(world)]
    dist.all_gather(allrec, rec, group=side)
    if rank == 0:
        A = torch.stack(allrec)
        s = a.steps
        write_result(a.result, {
            "method": m, "world": world, "n_params": n_params, "steps": s, "sync_every": a.sync_every,
            "format": a.format, "slow_rank": a.slow_rank,
            "loss_mean": A[:, :s].mean(0).tolist(), "elapsed_s_max": A[:, s:2 * s].max(0).values.tolist(),
            "compute_s_per_rank": A[:, 2 * s].tolist(),
            "uplink_tx_bytes": [float(A[r, 2 * s + 1]) for r in range(world) if int(A[r, 2 * s + 2]) == 1],
            "total_s": total,
        })
    dist.barrier(side)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------
# driver side
# ------------------------------------------------------------------------------------------
def config(quick: bool) -> dict:
    c = dict(model="tiny", seq=64, batch=8, lr=2e-3, steps=240, sync_every=20, format="int8", inter_mbit=100,
             edge_mbit=50, edge_steps=160, diloco_factor=2, timeout=300)
    if quick:
        c.update(steps=40, sync_every=10, edge_steps=40, diloco_factor=1)
    return c


def _args(cfg: dict, method: str, steps: int, ifname: str, slow_rank: int = -1, cluster_size: int = 2) -> List[str]:
    return ["--worker", "--method", method, "--ifname", ifname, "--model", cfg["model"], "--seq", str(cfg["seq"]),
            "--batch", str(cfg["batch"]), "--lr", str(cfg["lr"]), "--steps", str(steps),
            "--sync-every", str(cfg["sync_every"]), "--format", cfg["format"], "--slow-rank", str(slow_rank),
            "--cluster-size", str(cluster_size), "--timeout", str(cfg["timeout"])]


def run_torchrun_clusters(net, clusters: int, per_cluster: int, args: List[str], timeout_s: float) -> dict:
    """One ``torchrun`` per cluster inside that cluster's namespace, static rendezvous at cluster
    0's address; returns rank 0's result. Any failure or timeout kills every process."""
    from .launch import _PKG_PARENT, free_port, kill_all, supervise
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="lsgdb-") as tmp:
        result = os.path.join(tmp, "result.json")
        procs, logs = [], []
        try:
            for c in range(clusters):
                env = dict(os.environ, GLOO_SOCKET_IFNAME=net.ifname, OMP_NUM_THREADS="1",
                           PYTHONPATH=_PKG_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))
                cmd = net.exec_prefix(c) + [
                    sys.executable, "-m", "torch.distributed.run", "--nnodes", str(clusters), "--node-rank", str(c),
                    "--nproc-per-node", str(per_cluster), "--master-addr", net.addr(0), "--master-port", str(port),
                    "--max-restarts", "0", "-m", "localsgd_comm.bench.clusters", *args, "--result", result]
                log = open(os.path.join(tmp, f"cluster{c}.log"), "w+")
                logs.append(log)
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            supervise(procs, logs, timeout_s, " ".join(args), "torchrun of cluster")
            with open(result) as f:
                return json.load(f)
        finally:
            kill_all(procs, logs)


def plan_inputs(cfg: dict, r: dict, clusters: int, rate: float):
    """``(Job, Network, Candidate)`` a user would give the planner for run ``r``: its model,
    workers, clusters, link rate and the compute time it measured (with a straggler: the
    nominal workers' time and every worker's relative speed)."""
    from localsgd_comm import plan
    comp = r["compute_s_per_rank"]
    nominal = sorted(comp)[len(comp) // 2 - 1] if r["slow_rank"] >= 0 else sum(comp) / len(comp)
    speeds = [nominal / c for c in comp] if r["slow_rank"] >= 0 else None
    world = r["world"]
    job = plan.Job(params=r["n_params"], tokens=float(r["steps"] * world * cfg["batch"] * cfg["seq"]),
                   tokens_per_step=cfg["batch"] * cfg["seq"], workers=world, clusters=clusters,
                   step_time_s=nominal, speeds=speeds)
    net = plan.Network(inter_mbit=float(rate), intra_mbit=10_000.0)
    method = {"flat-ddp": "ddp", "edge-ddp": "ddp", "flat-diloco": "diloco", "edge-diloco": "diloco",
              "hier-diloco": "hierarchical"}.get(r["method"])
    if method is None:
        return None
    cand = plan.Candidate(method, world, 1 if method == "ddp" else r["sync_every"],
                          "none" if method == "ddp" else r["format"])
    return job, net, cand


def _predict(cfg: dict, r: dict, clusters: int, rate: float) -> dict:
    """The planner's step time for this run, from the compute time the run measured."""
    from localsgd_comm import plan

    from .plan_check import options  # the measured CPU profile, fp32 DDP: as plan-check predicts
    inputs = plan_inputs(cfg, r, clusters, rate)
    if inputs is None:  # the planner does not model FSDP (yet)
        return {"step_s": None, "total_s": None, "comm_share": None, "slow_link_bytes_total": None,
                "compute_s_given": r["compute_s_per_rank"][0]}
    job, net, cand = inputs
    p = plan.predict(job, net, cand, options())
    return {"step_s": p.step_s, "total_s": p.step_s * r["steps"], "comm_share": p.comm_share,
            "slow_link_bytes_total": p.slow_link_bytes_per_round * (r["steps"] // cand.H),
            "compute_s_given": job.compute_s}


def analyse(runs: List[dict], window: int = 20) -> List[dict]:
    from .time_to_loss import smooth
    out = []
    targets = {}
    for r in runs:
        if r["method"] in ("flat-ddp", "edge-ddp", "hsdp-ddp") and r["slow_rank"] < 0:
            targets[r["setting"]] = smooth(r["loss_mean"], window)[-1]
    for r in runs:
        sm = smooth(r["loss_mean"], window)
        tgt = targets.get(r["setting"])
        hit = next((i for i, v in enumerate(sm) if tgt is not None and v <= tgt), None)
        t_hit = r["elapsed_s_max"][hit] if hit is not None else None
        pred = r["prediction"]["step_s"]
        pred_mb = r["prediction"]["slow_link_bytes_total"]
        out.append({"setting": r["setting"], "method": r["method"], "straggler": r["slow_rank"] >= 0,
                    "steps": r["steps"], "final_loss": sm[-1], "target_loss": tgt,
                    "steps_to_target": None if hit is None else hit + 1, "time_to_target_s": t_hit,
                    "total_s": r["total_s"], "ms_per_step": 1e3 * r["total_s"] / r["steps"],
                    "predicted_ms_per_step": None if pred is None else 1e3 * pred,
                    "prediction_error_pct": None if pred is None else 100 * (pred / (r["total_s"] / r["steps"]) - 1),
                    "predicted_time_to_target_s": None if hit is None or pred is None else pred * (hit + 1),
                    "slow_link_mb": sum(r["uplink_tx_bytes"]) / 1e6,
                    "predicted_slow_link_mb": None if pred_mb is None else pred_mb * r["clusters"] / 1e6,
                    "compute_ms": 1e3 * r["prediction"]["compute_s_given"]})
    ddp_t = {(o["setting"], o["straggler"]): o["time_to_target_s"] for o in out if o["method"].endswith("ddp")}
    for o in out:
        base = ddp_t.get((o["setting"], False))
        o["speedup_to_ddp_loss"] = (base / o["time_to_target_s"]) if base and o["time_to_target_s"] else None
    return out


def run_suite(out_dir: str, quick: bool = False, log=print, fsdp: bool = False) -> dict:
    """``fsdp``: the sharded-replica pair (``FSDP``) on the multi-cluster layout only."""
    from . import report
    from .launch import RankFailure, run_ranks
    from .netns import ShapedNetwork, availability

    cfg = config(quick)
    env = report.environment()
    name = ("clusters_fsdp" if fsdp else "clusters") + ("_quick" if quick else "")
    why = availability()
    if why:
        log(f"[clusters] SKIP: {why}")
        out = {"benchmark": "clusters", "quick": quick, "skipped": why, "environment": env}
        report.write_artifacts(out_dir, name, out, f"clusters skipped: {why}\n")
        return out
    runs, failed = [], []
    log(f"[clusters] config {cfg}")
    with ShapedNetwork(2, cfg["inter_mbit"]) as net:
        for m in (FSDP if fsdp else MULTI):
            steps = cfg["steps"] * (1 if m.endswith("ddp") else cfg["diloco_factor"])
            try:
                r = run_torchrun_clusters(net, 2, 2, _args(cfg, m, steps, net.ifname), timeout_s=900)
            except RankFailure as exc:
                log(f"[clusters] FAILED {m}: {str(exc)[-3000:]}")
                failed.append({"method": m, "reason": str(exc)[-4000:]})
                continue
            r.update(setting="multi-cluster", clusters=2, rate_mbit=cfg["inter_mbit"])
            r["prediction"] = _predict(cfg, r, 2, cfg["inter_mbit"])
            runs.append(r)
            pred = r["prediction"]["step_s"]
            log(f"[clusters] 2x2 {m:<12} {r['total_s']:6.1f} s  {1e3 * r['total_s'] / steps:6.1f} ms/step "
                f"(planner {'-' if pred is None else f'{1e3 * pred:.1f}'})  "
                f"slow link {sum(r['uplink_tx_bytes']) / 1e6:.2f} MB")
    with ShapedNetwork(4, cfg["edge_mbit"]) as net:
        for m in ([] if fsdp else EDGE):
            for slow in (-1, 3):
                steps = cfg["edge_steps"]
                try:
                    r = run_ranks(4, "localsgd_comm.bench.clusters",
                                  _args(cfg, m, steps, net.ifname, slow_rank=slow, cluster_size=1)[0:] , net=net,
                                  timeout_s=900)
                except RankFailure as exc:
                    log(f"[clusters] FAILED {m} straggler={slow}: {str(exc)[-3000:]}")
                    failed.append({"method": m, "slow_rank": slow, "reason": str(exc)[-4000:]})
                    continue
                r.update(setting="edge", clusters=4, rate_mbit=cfg["edge_mbit"])
                r["prediction"] = _predict(cfg, r, 4, cfg["edge_mbit"])
                runs.append(r)
                log(f"[clusters] edge {m:<12} straggler={'yes' if slow >= 0 else 'no '} {r['total_s']:6.1f} s  "
                    f"{1e3 * r['total_s'] / steps:6.1f} ms/step (planner {1e3 * r['prediction']['step_s']:.1f})")
    table = analyse(runs)
    out = {"benchmark": "clusters-fsdp" if fsdp else "clusters", "quick": quick, "config": cfg, "environment": env,
           "runs": runs, "table": table, "failed": failed}
    report.write_artifacts(out_dir, name, out, markdown(out), plot)
    return out


def markdown(out: dict) -> str:
    e, c = out["environment"], out["config"]
    if out["benchmark"] == "clusters-fsdp":
        head = (f"Sharded replicas ({'quick' if out['quick'] else 'full'}): GPT '{c['model']}', seq {c['seq']}, batch "
                f"{c['batch']}/worker, 2 clusters x 2 workers on a 2-D mesh (replicate, shard), {c['inter_mbit']} "
                f"Mbit/s between clusters, torchrun per cluster. hsdp-ddp: fully_shard on the 2-D mesh (gloo; "
                f"gradient shards all-reduced in fp32 across clusters every step), {c['steps']} steps; fsdp-diloco: "
                f"fully_shard on mesh['shard'], DiLoCo over mesh.get_group('replicate') (H={c['sync_every']}, "
                f"{c['format']}, outer lr 0.7 momentum 0.6), {c['steps'] * c['diloco_factor']} steps. "
                f"{e['machine']['cpu_model']}, {e['machine']['cores']} cores, torch {e['versions']['torch']}, commit "
                f"{str(e['git_commit'])[:10]}. Command: `localsgd-bench clusters-fsdp{' --quick' if out['quick'] else ''}`"
                "\n\nTarget = hsdp-ddp's final loss (moving average of 20 steps); slow-link MB = tx bytes of both "
                "clusters' uplinks. The planner does not model FSDP yet ('-').\n\n")
        return head + _md_rows(out)
    head = (f"Multi-cluster and edge ({'quick' if out['quick'] else 'full'}): GPT '{c['model']}', seq {c['seq']}, "
            f"batch {c['batch']}/worker, DDP {c['steps']} steps, DiLoCo {c['steps'] * c['diloco_factor']} steps "
            f"(H={c['sync_every']}, {c['format']}, outer lr 0.7 momentum 0.6); multi-cluster: 2 clusters x 2 workers, "
            f"{c['inter_mbit']} Mbit/s between clusters, torchrun per cluster; edge: 4 workers each behind "
            f"{c['edge_mbit']} Mbit/s, {c['edge_steps']} steps, straggler = worker 3 at half speed. "
            f"{e['machine']['cpu_model']}, {e['machine']['cores']} cores, torch {e['versions']['torch']}, commit "
            f"{str(e['git_commit'])[:10]}. Command: `localsgd-bench {out['benchmark']}{' --quick' if out['quick'] else ''}`\n\n"
            "Target = DDP's final loss (moving average of 20 steps) in the same setting, without straggler. "
            "'planner' columns: `localsgd_comm.plan.predict` given the compute time each run measured.\n\n")
    return head + _md_rows(out)


def _md_rows(out: dict) -> str:
    from .report import md_table
    rows = [(t["setting"], t["method"], "yes" if t["straggler"] else "no", t["steps"], t["final_loss"],
             t["steps_to_target"], t["time_to_target_s"], t["predicted_time_to_target_s"], t["speedup_to_ddp_loss"],
             t["total_s"], t["ms_per_step"], t["predicted_ms_per_step"],
             None if t["prediction_error_pct"] is None else round(t["prediction_error_pct"], 1),
             t["slow_link_mb"], t["predicted_slow_link_mb"], t["compute_ms"]) for t in out["table"]]
    return md_table(["setting", "method", "straggler", "steps", "final loss", "steps to target",
                            "time to target s", "planner s", "speedup to DDP loss", "total s", "ms/step",
                            "planner ms/step", "planner error %", "slow-link MB (all uplinks)", "planner MB",
                            "compute ms/step"], rows) + "\n"


def plot(out: dict, path: str) -> None:
    from .report import plt as _plt
    from .time_to_loss import smooth
    pyplot = _plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(13, 4.5))
    for ax, setting in zip(axes, ("multi-cluster", "edge")):
        for r in out["runs"]:
            if r["setting"] != setting:
                continue
            ax.plot(r["elapsed_s_max"], smooth(r["loss_mean"], 20),
                    label=r["method"] + (" (straggler)" if r["slow_rank"] >= 0 else ""))
        ax.set_xlabel("wall time (s, slowest worker)")
        ax.set_ylabel("training loss (moving average)")
        ax.set_title(setting)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", required=True)
    ap.add_argument("--method", required=True, choices=MULTI + EDGE + FSDP)
    ap.add_argument("--ifname", default="")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--sync-every", type=int, default=20)
    ap.add_argument("--format", default="int8")
    ap.add_argument("--slow-rank", type=int, default=-1)
    ap.add_argument("--cluster-size", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--result", required=True)
    _worker(ap.parse_args(argv))


if __name__ == "__main__":
    main()
