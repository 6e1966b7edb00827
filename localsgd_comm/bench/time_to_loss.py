"""Time to loss: DDP vs DiLoCo on shaped links, at equal tokens.

Methods (4 workers, one namespace each, the same model, data, inner optimizer and steps):

* ``ddp-gloo``       torch DDP over gloo, fp32 gradients all-reduced every step;
* ``ddp-localsgd``   torch DDP over the ``localsgd`` backend (int8, compressed every step);
* ``diloco-fp32`` / ``diloco-int8`` / ``diloco-int4``  ``localsgd_comm.DiLoCo`` over gloo,
  ``sync_every`` H inner steps, outer Nesterov SGD (lr 0.7, momentum ``outer_momentum``);
* ``diloco-int4-2x``  the same as ``diloco-int4`` for twice the steps (twice DDP's tokens, its
  own schedule over its own length): the question the target asks is when DiLoCo reaches DDP's
  final loss, and at equal tokens it does not (fewer, noisier updates of a 4x smaller batch).

The DiLoCo settings come from ``benchmarks/diloco_tuning.py`` (results in
``benchmarks/results/diloco_tuning.md``): loss against steps does not depend on the link, so
they were tuned on loopback. The DiLoCo paper's outer momentum 0.9 suits thousands of outer
steps; with 12-24 outer steps its ~10-step memory overshoots, and 0.6 gave a lower loss at every
H and length tried. DDP's lr was tuned on the same grid (2e-3 was best).

Model and data are the main job's (``localsgd-train``): ``localsgd_comm.model.GPT`` (byte-level,
size "tiny" = 2 layers, 4 heads, d_model 64, 0.13M parameters, tied head) and
``localsgd_comm.data.ByteData`` over the embedded standard-library text corpus; batches are
seeded by (rank, step), so every method sees the same tokens.

Measurement: no extra collective during training (it would be communication the method does
not need). Every rank records, per step, its training loss, its elapsed wall time and the
tx bytes of its own namespace interface (real bytes on the shaped link, headers included).
At the end rank 0 gathers them: the loss curve is the mean over ranks, smoothed with a
moving average; the time axis is the slowest rank's elapsed time; bytes are per rank.
"Time to target" is the first step whose smoothed loss is <= the target; the target is DDP
(gloo)'s final smoothed loss on the same link.

Rank entry point: ``python -m localsgd_comm.bench.time_to_loss --worker ...``.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import List, Optional

METHODS = ["ddp-gloo", "ddp-localsgd", "diloco-fp32", "diloco-int8", "diloco-int4", "diloco-int4-2x"]
# DiLoCo runs with this many times the steps (and tokens) of the others
LONG_FACTOR = {"diloco-int4-2x": 2}


def lr_factor(i: int, steps: int) -> float:
    """The main job's schedule: linear warm-up over 5% of the steps, cosine decay to 10%."""
    warm = max(1, steps // 20)
    if i < warm:
        return (i + 1) / warm
    t = (i - warm) / max(1, steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def lr_schedule(steps: int):
    """``LambdaLR`` factor function of :func:`lr_factor` over ``steps`` steps."""
    return lambda i: lr_factor(i, steps)


def measure_compute(model_cfg, batches, lr: float, steps: int = 12) -> float:
    """Median seconds of one compute-only training step (forward, backward, AdamW) of a fresh
    copy of the model, after 2 warm-up steps. Every rank calls it at the same time, so it is
    the compute time under the run's own CPU sharing: the step time the planner is given."""
    import torch

    from localsgd_comm.model import GPT
    model = GPT(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ts = []
    for i in range(steps):
        t = time.perf_counter()
        x, y = batches[i % len(batches)]
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
        ts.append(time.perf_counter() - t)
    ts = sorted(ts[2:])
    return ts[len(ts) // 2]


# ------------------------------------------------------------------------------------------
# rank side
# ------------------------------------------------------------------------------------------
def _worker(a) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as Fn
    from datetime import timedelta

    from .launch import write_result
    from .netns import read_iface_bytes

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    m = a.method
    kwargs = {}
    backend = "gloo"
    if m == "ddp-localsgd":
        import localsgd_comm
        backend = "localsgd"
        kwargs["pg_options"] = localsgd_comm.BackendOptions(format=a.ddp_format)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=a.timeout), **kwargs)
    from localsgd_comm.data import ByteData, load_corpus
    from localsgd_comm.model import GPT, config_for

    torch.manual_seed(0)  # same init everywhere (DDP and DiLoCo also broadcast from rank 0)
    model = GPT(config_for(a.model, seq_len=a.seq))
    n_params = sum(p.numel() for p in model.parameters())
    data = ByteData(load_corpus(), a.seq, seed=0)
    if m.startswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel as DDP
        # One bucket for the whole (small) model: one all-reduce per step, as a tuned DDP would.
        net = DDP(model, bucket_cap_mb=max(25, 4 * n_params / 2**20 + 1))
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, betas=(0.9, 0.95))
        step_fn = opt
    else:
        import localsgd_comm
        net = model
        inner = torch.optim.AdamW(model.parameters(), lr=a.inner_lr or a.lr, weight_decay=a.weight_decay,
                                  betas=(0.9, 0.95))
        fmt = {"fp32": "none", "int8": "int8", "int4": "int4"}[m.split("-")[1]]
        step_fn = localsgd_comm.DiLoCo(model, inner, sync_every=a.sync_every, compression=fmt,
                                       outer_lr=a.outer_lr, outer_momentum=a.outer_momentum)
    # The main job's schedule (AdamW betas 0.9/0.95, linear warm-up, cosine decay to 10%), for
    # every method: with a constant lr the final loss is set by gradient noise, which favours
    # DDP's 4x larger per-step batch and hides the effect of communication.
    inner_opt = opt if m.startswith("ddp") else inner
    sched = torch.optim.lr_scheduler.LambdaLR(inner_opt, lr_schedule(a.steps))
    losses, times, tx = [], [], []
    # pre-generate the batches: data generation is not what we time
    batches = [data.batch(rank, i, a.batch) for i in range(a.steps)]
    dist.barrier()
    compute_s = measure_compute(config_for(a.model, seq_len=a.seq), batches, a.lr)
    dist.barrier()
    c0 = read_iface_bytes(a.ifname) if a.ifname else None
    t0 = time.perf_counter()
    for step in range(a.steps):
        x, y = batches[step]
        logits = net(x)
        loss = Fn.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        step_fn.step()
        step_fn.zero_grad()
        sched.step()
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
        if c0 is not None:
            c = read_iface_bytes(a.ifname)
            tx.append(c["tx_bytes"] - c0["tx_bytes"])
    total = time.perf_counter() - t0
    # gather per-rank logs (after the timed loop)
    rec = torch.tensor([losses, times, tx if tx else [0.0] * a.steps], dtype=torch.float64)
    comp = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(comp, torch.tensor([compute_s], dtype=torch.float64))
    allrec = [torch.empty_like(rec) for _ in range(world)]
    dist.all_gather(allrec, rec)
    extra = {}
    if m.startswith("diloco"):
        extra["diloco_stats"] = {k: v for k, v in step_fn.stats.items()}
    if m == "ddp-localsgd":
        import localsgd_comm
        st = localsgd_comm.get_backend_stats(dist.group.WORLD)
        extra["backend_stats"] = {k: v for k, v in st.items() if isinstance(v, (int, float, str)) or v is None}
    if rank == 0:
        A = torch.stack(allrec)  # [rank, 3, steps]
        write_result(a.result, {
            "method": m, "world": world, "n_params": n_params, "steps": a.steps,
            "tokens_per_step_global": world * a.batch * a.seq,
            "loss_mean": A[:, 0].mean(0).tolist(),
            "elapsed_s_max": A[:, 1].max(0).values.tolist(),
            "tx_bytes_per_rank_mean": A[:, 2].mean(0).tolist() if tx else None,
            "total_s": total, "compute_s_per_rank": [float(c) for c in comp], **extra,
        })
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------
# driver side
# ------------------------------------------------------------------------------------------
def config(quick: bool, steps: Optional[int] = None, sync_every: Optional[int] = None) -> dict:
    """Model/steps chosen for 2 cores and 4 workers. Full: the 0.12M-parameter "tiny" GPT, 240 steps:
    compute ~45 ms/step/worker when 4 workers share 2 cores, fp32 gradient all-reduce
    ~0.5 MB -> ~0.6 s/step at 10 Mbit/s, so DDP is communication-bound on the slow links and
    compute-bound at 1 Gbit/s (the whole time-to-loss run measured 573 s, budget ~15 min)."""
    c = dict(model="tiny", seq=64, batch=8, lr=2e-3, weight_decay=0.01, sync_every=20, outer_lr=0.7,
             outer_momentum=0.6, steps=240, ddp_format="int8", world=4)
    if quick:
        c.update(steps=40, sync_every=10)
    if steps is not None:
        c["steps"] = steps
    if sync_every is not None:
        c["sync_every"] = sync_every
    return c


def rank_args(cfg: dict, method: str, ifname: str) -> List[str]:
    """Command line of one rank of ``method`` (the -2x runs get LONG_FACTOR times the steps)."""
    run_cfg = dict(cfg, steps=cfg["steps"] * LONG_FACTOR.get(method, 1))
    return ["--worker", "--method", method, "--ifname", ifname] + [
        f"--{k.replace('_', '-')}={v}" for k, v in run_cfg.items() if k != "world"]


NETS = [("1gbit", 1000), ("100mbit", 100), ("10mbit", 10)]


def smooth(xs: List[float], w: int) -> List[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def analyse(runs: List[dict], window: int) -> List[dict]:
    """Per link: DDP-gloo's final smoothed loss is the target; time/bytes for each method to
    reach it, and the speedup vs DDP-gloo's own time to reach it (its last step)."""
    rows = []
    for net in sorted({r["net"] for r in runs}, key=lambda n: -dict(NETS).get(n, 0)):
        rs = {r["method"]: r for r in runs if r["net"] == net}
        base = rs.get("ddp-gloo")
        if base is None:
            continue
        sb = smooth(base["loss_mean"], window)
        target = sb[-1]
        # DDP's own time to its final loss: its first step at or below it (the smoothed curve
        # is not monotone), so DDP's speedup is exactly 1
        t_base = base["elapsed_s_max"][next(i for i, v in enumerate(sb) if v <= target)]
        for m, r in rs.items():
            sl = smooth(r["loss_mean"], window)
            hit = next((i for i, v in enumerate(sl) if v <= target), None)
            t_hit = r["elapsed_s_max"][hit] if hit is not None else None
            b = r.get("tx_bytes_per_rank_mean")
            # Common loss: the higher of the two final losses, which both runs reach; the
            # speedup there still counts when a method ends above DDP's final loss.
            common = max(target, sl[-1])
            i_m = next(i for i, v in enumerate(sl) if v <= common)
            i_d = next(i for i, v in enumerate(sb) if v <= common)
            sp_common = base["elapsed_s_max"][i_d] / r["elapsed_s_max"][i_m]
            rows.append({
                "net": net, "rate_mbit": r["rate_mbit"], "method": m, "final_loss": sl[-1],
                "target_loss": target, "steps_to_target": None if hit is None else hit + 1,
                "time_to_target_s": t_hit, "total_time_s": r["elapsed_s_max"][-1],
                "mean_step_s": r["elapsed_s_max"][-1] / r["steps"], "steps": r["steps"],
                "tx_mb_per_rank_total": None if not b else b[-1] / 1e6,
                "tx_mb_to_target": None if (not b or hit is None) else b[hit] / 1e6,
                "speedup_to_ddp_final_loss": None if t_hit is None else t_base / t_hit,
                "common_loss": common, "speedup_at_common_loss": sp_common,
            })
    return rows


def run_suite(out_dir: str, quick: bool = False, log=print, only_nets=None, methods=None,
              steps: Optional[int] = None, sync_every: Optional[int] = None) -> dict:
    from . import report
    from .collectives import localsgd_available
    from .launch import RankFailure, run_ranks
    from .netns import ShapedNetwork, availability

    cfg = config(quick, steps, sync_every)
    env = report.environment()
    why = availability()
    name = "time_to_loss_quick" if quick else "time_to_loss"
    methods = list(methods or METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"time-to-loss methods: expected a subset of {METHODS}, got {bad}")
    skipped = []
    if why:
        log(f"[time-to-loss] SKIP: {why}")
        out = {"benchmark": "time_to_loss", "quick": quick, "skipped": why, "environment": env}
        report.write_artifacts(out_dir, name, out, f"time-to-loss skipped: {why}\n")
        return out
    no_ls = localsgd_available()
    if no_ls and "ddp-localsgd" in methods:
        log(f"[time-to-loss] ddp-localsgd skipped: {no_ls}")
        methods.remove("ddp-localsgd")
        skipped.append({"method": "ddp-localsgd", "reason": no_ls})
    nets = [(n, r) for n, r in NETS if not only_nets or n in only_nets]
    if quick and not only_nets:
        nets = [("100mbit", 100)]
    runs = []
    log(f"[time-to-loss] config {cfg}")
    for net_name, rate in nets:
        with ShapedNetwork(cfg["world"], rate) as net:
            for m in methods:
                args = rank_args(cfg, m, net.ifname)
                load0 = report.load_snapshot()
                try:
                    r = run_ranks(cfg["world"], "localsgd_comm.bench.time_to_loss", args, net=net,
                                  timeout_s=1200)
                except RankFailure as exc:
                    log(f"[time-to-loss] FAILED {net_name} {m}: {str(exc)[-3000:]}")
                    skipped.append({"net": net_name, "method": m, "reason": str(exc)[-4000:]})
                    continue
                r.update(net=net_name, rate_mbit=rate, load_before=load0, load_after=report.load_snapshot())
                runs.append(r)
                b = r["tx_bytes_per_rank_mean"]
                log(f"[time-to-loss] {net_name:>8} {m:<13} {r['total_s']:7.1f} s  "
                    f"{1e3 * r['total_s'] / r['steps']:7.1f} ms/step  final loss {r['loss_mean'][-1]:.3f}  "
                    f"tx {0 if not b else b[-1] / 1e6:.2f} MB/rank  (params {r['n_params']})")
    window = max(5, cfg["steps"] // 12)
    table = analyse(runs, window)
    out = {"benchmark": "time_to_loss", "quick": quick, "config": cfg, "smoothing_window": window, "environment": env, "runs": runs, "table": table,
           "skipped": skipped}
    report.write_artifacts(out_dir, name, out, markdown(out), plot)
    return out


def markdown(out: dict) -> str:
    from .report import md_table
    e, c = out["environment"], out["config"]
    head = (f"Time to loss ({'quick' if out['quick'] else 'full'}): {c['world']} workers, "
            f"GPT '{c['model']}' ({out['runs'][0]['n_params'] if out['runs'] else '?'} params), "
            f"seq {c['seq']}, batch {c['batch']}/worker, "
            f"{c['steps']} steps (diloco-int4-2x: {2 * c['steps']}), H={c['sync_every']}, "
            f"outer Nesterov SGD lr {c.get('outer_lr', 0.7)} momentum {c.get('outer_momentum', 0.9)}, "
            f"AdamW lr {c['lr']} wd {c['weight_decay']} cosine; "
            f"{e['machine']['cpu_model']}, {e['machine']['cores']} cores, torch {e['versions']['torch']}, "
            f"commit {str(e['git_commit'])[:10]}; loss = mean over ranks, moving average of "
            f"{out['smoothing_window']} steps\n\n")
    rows = [(r["net"], r["method"], r.get("steps"), r["final_loss"], r["target_loss"], r["steps_to_target"],
             r["time_to_target_s"], r["total_time_s"], 1e3 * r["mean_step_s"], r["tx_mb_per_rank_total"],
             r["speedup_to_ddp_final_loss"] if r["speedup_to_ddp_final_loss"] else "not reached",
             r.get("common_loss"), r.get("speedup_at_common_loss")) for r in out["table"]]
    return head + md_table(["link", "method", "steps", "final loss", "target (DDP final)", "steps to target",
                            "time to target s", "total s", "ms/step", "MB sent/rank", "speedup to DDP loss",
                            "common loss", "speedup at common loss"],
                           rows) + "\n"


def rerender(json_path: str) -> dict:
    """Recompute the table, Markdown and PNG of a saved run (analysis changes need no rerun)."""
    from .report import rerender as _rerender
    return _rerender(json_path, lambda out: {"table": analyse(out["runs"], out["smoothing_window"])}, markdown, plot)


def plot(out: dict, path: str) -> None:
    from .report import plt as _plt
    runs = out["runs"]
    if not runs:
        return
    plt = _plt()
    nets = [n for n, _ in NETS if any(r["net"] == n for r in runs)]
    fig, axes = plt.subplots(2, len(nets) + 1, figsize=(4.6 * (len(nets) + 1), 7.6), squeeze=False)
    w = out["smoothing_window"]
    for j, net in enumerate(nets):
        for r in (r for r in runs if r["net"] == net):
            sl = smooth(r["loss_mean"], w)
            axes[0, j].plot(r["elapsed_s_max"], sl, label=r["method"])
            if r.get("tx_bytes_per_rank_mean"):
                axes[1, j].plot([max(b, 1) / 1e6 for b in r["tx_bytes_per_rank_mean"]], sl, label=r["method"])
        axes[0, j].set_xscale("log")
        axes[0, j].set_title(f"{net}: loss vs wall-clock")
        axes[0, j].set_xlabel("seconds (slowest rank)")
        axes[1, j].set_xscale("log")
        axes[1, j].set_title(f"{net}: loss vs bytes sent")
        axes[1, j].set_xlabel("MB sent per rank (interface tx)")
        for ax in axes[:, j]:
            ax.set_ylabel("train loss (smoothed)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    # speedup vs link bandwidth
    ax = axes[0, -1]
    for k, m in enumerate(METHODS):
        color = f"C{k}"
        pts = sorted((r["rate_mbit"], r["speedup_to_ddp_final_loss"]) for r in out["table"]
                     if r["method"] == m and r["speedup_to_ddp_final_loss"])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color,
                    label=f"{m}: to DDP's final loss")
        pts = sorted((r["rate_mbit"], r["speedup_at_common_loss"]) for r in out["table"]
                     if r["method"] == m and r.get("speedup_at_common_loss"))
        if pts and m != "ddp-gloo":
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="x", ls="--", color=color,
                    label=f"{m}: at common loss")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link rate (Mbit/s)")
    ax.set_ylabel("wall-clock speedup to DDP's final loss")
    ax.set_title("speedup vs link bandwidth")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    axes[1, -1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="rank side of the time-to-loss benchmark")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--ifname", default="")
    p.add_argument("--model", default="tiny")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--sync-every", type=int, default=20)
    p.add_argument("--inner-lr", type=float, default=0.0, help="DiLoCo's inner AdamW lr (0: --lr)")
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.6)
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--ddp-format", default="int8")
    p.add_argument("--timeout", type=float, default=1200.0)
    p.add_argument("--result", required=True)
    _worker(p.parse_args(argv))


if __name__ == "__main__":
    main()
