"""Streaming DiLoCo on shaped links: compute utilisation, bytes, peak bytes per sync event, loss.

Methods (4 workers, one network namespace each, the same model, data, inner optimizer, steps):

* ``local``                  no communication at all (each worker trains alone): the ceiling of the
  in-loop compute utilisation (the loop's own bookkeeping is not compute);
* ``ddp``                    torch DDP over gloo, fp32 gradients every step;
* ``diloco-<fmt>``           ``DiLoCo(sync_every=H, compression=fmt)``: one whole-model sync every H steps;
* ``stream-<fmt>-P<p>-T<t>`` ``DiLoCo(..., fragments=p, overlap_steps=t)`` (mixing: the default,
  0.5 when t > 0, 0 when t = 0).

DiLoCo and streaming run on a "localsgd" default group: there the compressed all-reduce runs on
the backend's worker thread, so a reduce started with ``overlap_steps > 0`` really proceeds
during the next inner steps (on a plain gloo group it is composed in Python and runs at once).

Figures per run:

* compute utilisation = compute-only step time x steps / loop wall time. The compute-only step
  time is the median of 10 forward/backward/AdamW steps of a fresh copy of the model, measured by
  every rank at the same time just before the loop (so under the run's own CPU sharing); the
  loop wall time is the slowest rank's. On a machine whose load changes during a run this ratio
  drifts (it can exceed 100%), so a second figure is measured inside the loop:
* in-loop compute utilisation = the time each rank spent in forward, backward and the inner
  optimizer's step during the loop / its loop time (the lowest rank's; DiLoCo and streaming only);
* time in sync: what ``step()`` and the closing ``flush()`` spent besides the inner optimizer's
  step (compressing, waiting for reduces, outer steps, merges), over the loop time: the
  communication the inner steps did not hide, the most direct of the three figures;
* total bytes: the rank's namespace interface tx (headers included) and DiLoCo's own count;
* peak bytes per sync event: the largest fragment's wire bytes (DiLoCo's count of one fragment's
  all-reduce), against model/P (the whole model's wire bytes / P);
* the largest tx of one step (interface counter), where an event's bytes land;
* final loss (mean over ranks, moving average) at equal tokens, and the time to DDP's final loss.

Rank entry point: ``python -m localsgd_comm.bench.streaming --worker ...``.
"""
from __future__ import annotations

import argparse
import os
import re
import time
from typing import List, Optional

from .time_to_loss import lr_schedule, measure_compute, smooth

FULL_METHODS = (["local", "ddp", "diloco-int8", "diloco-int4"]
                + [f"stream-{f}-P{p}-T{t}" for f in ("int8", "int4") for p in (2, 4) for t in (0, 1, 2)])
# Quick: no DDP (its fp32 all-reduce of the small GPT takes ~4 s per step at 10 Mbit/s)
QUICK_METHODS = ["local", "diloco-int4", "stream-int4-P2-T1", "stream-int4-P4-T0", "stream-int4-P4-T1", "stream-int4-P4-T2",
                 "diloco-int8", "stream-int8-P4-T1"]
NETS = [("100mbit", 100), ("10mbit", 10)]
_STREAM = re.compile(r"^stream-(int8|int4|fp8|none)-P(\d+)-T(\d+)$")


def parse_method(m: str) -> dict:
    """-> {"kind": "local"|"ddp"|"diloco", "fmt", "fragments", "overlap_steps"}; ValueError if unknown."""
    if m in ("ddp", "local"):
        return {"kind": m}
    if m.startswith("diloco-") and m[7:] in ("int8", "int4", "fp8", "none"):
        return {"kind": "diloco", "fmt": m[7:], "fragments": None, "overlap_steps": 0}
    s = _STREAM.match(m)
    if s:
        return {"kind": "diloco", "fmt": s.group(1), "fragments": int(s.group(2)), "overlap_steps": int(s.group(3))}
    raise ValueError(f"streaming method: expected local, ddp, diloco-<fmt> or stream-<fmt>-P<p>-T<tau>, got {m!r}")


# ------------------------------------------------------------------------------------------
# rank side
# ------------------------------------------------------------------------------------------
def _worker(a) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as Fn
    from datetime import timedelta

    import localsgd_comm
    from localsgd_comm.data import ByteData, load_corpus
    from localsgd_comm.diloco.engine import wire_bytes
    from localsgd_comm.model import GPT, config_for

    from .launch import write_result
    from .netns import read_iface_bytes

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    spec = parse_method(a.method)
    dist.init_process_group("gloo" if spec["kind"] == "ddp" else "localsgd", rank=rank, world_size=world,
                            timeout=timedelta(seconds=a.timeout))
    torch.manual_seed(a.seed)
    model = GPT(config_for(a.model, seq_len=a.seq))
    n_params = sum(p.numel() for p in model.parameters())
    data = ByteData(load_corpus(), a.seq, seed=a.seed)
    inner = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))
    if spec["kind"] == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        net, step_fn = DDP(model, bucket_cap_mb=max(25, 4 * n_params / 2**20 + 1)), inner
        whole = peak = wire_bytes("none", n_params, 1, world)
    elif spec["kind"] == "local":
        net, step_fn, whole, peak = model, inner, 1, 0
    else:
        net = model
        step_fn = localsgd_comm.DiLoCo(model, inner, sync_every=a.sync_every, compression=spec["fmt"],
                                       outer_lr=a.outer_lr, outer_momentum=a.outer_momentum,
                                       fragments=spec["fragments"], overlap_steps=spec["overlap_steps"])
        blk = step_fn.block_size
        whole = sum(wire_bytes(spec["fmt"], f.numel, blk, world) for f in step_fn._flats)
        peak = whole if step_fn._stream is None else max(
            sum(wire_bytes(spec["fmt"], s.numel, blk, world) for s in segs) for segs in step_fn._stream.segments)
    # time blocked in a reduce's wait (DiLoCo's sync, a fragment's merge): the communication the
    # inner steps did not hide, apart from compression and outer-step compute
    waits = [0.0]
    if spec["kind"] == "diloco":
        from localsgd_comm.diloco.engine import Reduction
        _wait = Reduction.wait

        def timed_wait(red):
            t = time.perf_counter()
            try:
                return _wait(red)
            finally:
                waits[0] += time.perf_counter() - t
        Reduction.wait = timed_wait
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lr_schedule(a.steps))
    batches = [data.batch(rank, i, a.batch) for i in range(a.steps)]
    dist.barrier()
    compute_s = measure_compute(config_for(a.model, seq_len=a.seq), batches, a.lr, steps=10)
    dist.barrier()
    # In-loop compute: forward + backward + the inner optimizer's own step, timed inside the loop
    # (so under the same CPU sharing as the loop itself); what step() adds (a sync start, a
    # merge) is not compute. Not for DDP, whose backward carries its all-reduce.
    inner_s = []
    pre = inner.register_step_pre_hook(lambda *_: inner_s.append(-time.perf_counter()))
    post = inner.register_step_post_hook(lambda *_: inner_s.__setitem__(-1, inner_s[-1] + time.perf_counter()))
    c0 = read_iface_bytes(a.ifname) if a.ifname else None
    losses, times, tx, fb_s, step_s = [], [], [], [], []
    t0 = time.perf_counter()
    for step in range(a.steps):
        x, y = batches[step]
        tf = time.perf_counter()
        logits = net(x)
        loss = Fn.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        fb_s.append(time.perf_counter() - tf)
        ts = time.perf_counter()
        step_fn.step()
        step_s.append(time.perf_counter() - ts)
        step_fn.zero_grad()
        sched.step()
        losses.append(loss.detach().item())
        times.append(time.perf_counter() - t0)
        if c0 is not None:
            tx.append(read_iface_bytes(a.ifname)["tx_bytes"] - c0["tx_bytes"])
    if spec["kind"] == "diloco":
        ts = time.perf_counter()
        step_fn.flush()  # the fragments in flight (timed: the run is not over before they land)
        step_s.append(time.perf_counter() - ts)
    total = time.perf_counter() - t0
    # the interface tx once the closing flush is over (the last fragments' bytes included)
    tx_end = read_iface_bytes(a.ifname)["tx_bytes"] - c0["tx_bytes"] if c0 is not None else 0.0
    pre.remove()
    post.remove()
    in_loop = sum(fb_s) + sum(inner_s)
    # what step() (and the closing flush) spent besides the inner optimizer's step: starting the
    # syncs (compression), waiting for reduces, outer steps and merges
    blocked = sum(step_s) - sum(inner_s)
    rec = torch.tensor([losses, times, tx if tx else [0.0] * a.steps], dtype=torch.float64)
    allrec = [torch.empty_like(rec) for _ in range(world)]
    dist.all_gather(allrec, rec)
    small = torch.tensor([compute_s, total, in_loop, blocked, waits[0]], dtype=torch.float64)
    alls = [torch.empty_like(small) for _ in range(world)]
    dist.all_gather(alls, small)
    tx_ends = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(tx_ends, torch.tensor([float(tx_end)], dtype=torch.float64))
    if rank == 0:
        A = torch.stack(allrec)
        stats = dict(step_fn.stats) if spec["kind"] == "diloco" else {}
        write_result(a.result, {
            "method": a.method, "world": world, "n_params": n_params, "steps": a.steps,
            "loss_mean": A[:, 0].mean(0).tolist(), "elapsed_s_max": A[:, 1].max(0).values.tolist(),
            "tx_bytes_per_rank_mean": A[:, 2].mean(0).tolist() if tx else None,
            "tx_bytes_per_rank_final": [float(t) for t in tx_ends] if tx else None,
            "compute_s_per_rank": [float(s[0]) for s in alls], "total_s_per_rank": [float(s[1]) for s in alls],
            "in_loop_compute_s_per_rank": [float(s[2]) for s in alls],
            "sync_s_per_rank": [float(s[3]) for s in alls], "reduce_wait_s_per_rank": [float(s[4]) for s in alls],
            "whole_model_event_bytes": whole, "peak_event_bytes": peak, "diloco_stats": stats,
        })
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------
# driver side
# ------------------------------------------------------------------------------------------
def config(quick: bool, steps: Optional[int] = None, sync_every: Optional[int] = None) -> dict:
    """The small GPT (0.8M parameters; int4 sync of the whole model ~0.6 MB per rank, ~0.5 s at
    10 Mbit/s), batch 8 x 64 bytes per worker. H = 24: 4 fragments sync every 6 steps. Quick: 72
    steps (3 rounds)."""
    c = dict(model="small", seq=64, batch=8, lr=2e-3, sync_every=24, outer_lr=0.7, outer_momentum=0.6,
             steps=240, world=4)
    if quick:
        c.update(steps=72)
    if steps is not None:
        c["steps"] = steps
    if sync_every is not None:
        c["sync_every"] = sync_every
    return c


def analyse(runs: List[dict], window: int) -> List[dict]:
    rows = []
    for net in sorted({r["net"] for r in runs}, key=lambda n: -dict(NETS).get(n, 0)):
        rs = [r for r in runs if r["net"] == net]
        ddp = next((r for r in rs if r["method"] == "ddp"), None)
        target = smooth(ddp["loss_mean"], window)[-1] if ddp else None
        plain = {parse_method(r["method"])["fmt"]: r for r in rs if r["method"].startswith("diloco-")}
        for r in rs:
            spec = parse_method(r["method"])
            sl = smooth(r["loss_mean"], window)
            total = max(r["total_s_per_rank"])
            compute = sorted(r["compute_s_per_rank"])[len(r["compute_s_per_rank"]) // 2]
            tx = r.get("tx_bytes_per_rank_mean")
            steps_tx = [b - a for a, b in zip([0.0] + tx[:-1], tx)] if tx else None
            hit = None if target is None else next((i for i, v in enumerate(sl) if v <= target), None)
            ref = plain.get(spec.get("fmt")) if spec["kind"] == "diloco" else None
            p = spec.get("fragments") or 1
            # per rank: its own in-loop compute over its own loop time; the lowest rank counts
            loop_util = None if spec["kind"] == "ddp" else min(
                c / t for c, t in zip(r["in_loop_compute_s_per_rank"], r["total_s_per_rank"]))
            rows.append({
                "net": net, "rate_mbit": r["rate_mbit"], "method": r["method"],
                "compute_util": compute * r["steps"] / total, "loop_compute_util": loop_util,
                "sync_share": None if spec["kind"] != "diloco" or "sync_s_per_rank" not in r else max(
                    b / t for b, t in zip(r["sync_s_per_rank"], r["total_s_per_rank"])), "total_s": total, "compute_step_s": compute,
                "wait_share": None if not spec.get("overlap_steps") or "reduce_wait_s_per_rank" not in r else max(
                    w / t for w, t in zip(r["reduce_wait_s_per_rank"], r["total_s_per_rank"])),
                "final_loss": sl[-1],
                "loss_vs_diloco": None if ref is None or spec["kind"] == "ddp" else sl[-1] / smooth(
                    ref["loss_mean"], window)[-1],
                "time_to_ddp_loss_s": None if hit is None else r["elapsed_s_max"][hit],
                "bytes_sent_mb": r["diloco_stats"].get("bytes_sent", 0) / 1e6 if r["diloco_stats"] else None,
                "bytes_vs_diloco": None if ref is None or spec["kind"] == "ddp" else
                r["diloco_stats"]["bytes_sent"] / max(ref["diloco_stats"]["bytes_sent"], 1),
                "tx_mb": None if not tx else tx[-1] / 1e6,
                "peak_event_kb": r["peak_event_bytes"] / 1e3,
                "peak_vs_model_over_p": r["peak_event_bytes"] / (r["whole_model_event_bytes"] / p),
                "max_step_tx_kb": None if not steps_tx else max(steps_tx) / 1e3,
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
    name = "streaming_quick" if quick else "streaming"
    methods = list(methods or (QUICK_METHODS if quick else FULL_METHODS))
    for m in methods:
        parse_method(m)
    why = availability() or localsgd_available()
    if why:
        log(f"[streaming] SKIP: {why}")
        out = {"benchmark": "streaming", "quick": quick, "skipped": why, "environment": env}
        report.write_artifacts(out_dir, name, out, f"streaming skipped: {why}\n")
        return out
    nets = [(n, r) for n, r in NETS if not only_nets or n in only_nets]
    if quick and not only_nets:
        nets = [("10mbit", 10)]
    runs, failed = [], []
    log(f"[streaming] config {cfg}; methods {methods}")
    for net_name, rate in nets:
        with ShapedNetwork(cfg["world"], rate) as net:
            for m in methods:
                args = ["--worker", "--method", m, "--ifname", net.ifname] + [
                    f"--{k.replace('_', '-')}={v}" for k, v in cfg.items() if k != "world"]
                load0 = report.load_snapshot()
                try:
                    r = run_ranks(cfg["world"], "localsgd_comm.bench.streaming", args, net=net, timeout_s=1200)
                except RankFailure as exc:
                    log(f"[streaming] FAILED {net_name} {m}: {str(exc)[-3000:]}")
                    failed.append({"net": net_name, "method": m, "reason": str(exc)[-4000:]})
                    continue
                r.update(net=net_name, rate_mbit=rate, load_before=load0, load_after=report.load_snapshot())
                runs.append(r)
                total = max(r["total_s_per_rank"])
                comp = sorted(r["compute_s_per_rank"])[2]
                lu = min(c / t for c, t in zip(r["in_loop_compute_s_per_rank"], r["total_s_per_rank"]))
                log(f"[streaming] {net_name:>8} {m:<18} {total:7.1f} s  util {comp * r['steps'] / total:6.1%} "
                    f"(in-loop {lu:6.1%})  "
                    f"final loss {r['loss_mean'][-1]:.3f}  peak/event {r['peak_event_bytes'] / 1e3:.1f} kB")
    window = max(5, cfg["steps"] // 12)
    out = {"benchmark": "streaming", "quick": quick, "config": cfg, "smoothing_window": window,
           "environment": env, "runs": runs, "table": analyse(runs, window), "failed": failed}
    report.write_artifacts(out_dir, name, out, markdown(out), plot)
    return out


def markdown(out: dict) -> str:
    from .report import md_table
    e, c = out["environment"], out["config"]
    head = (f"Streaming DiLoCo ({'quick' if out['quick'] else 'full'}): {c['world']} workers on one machine "
            f"(each in its own network namespace, shaped link), GPT '{c['model']}' "
            f"({out['runs'][0]['n_params'] if out['runs'] else '?'} params), seq {c['seq']}, "
            f"batch {c['batch']}/worker, "
            f"{c['steps']} steps, H={c['sync_every']}, outer lr {c['outer_lr']} momentum {c['outer_momentum']}, "
            f"AdamW lr {c['lr']} cosine; {e['machine']['cpu_model']}, {e['machine']['cores']} cores, "
            f"torch {e['versions']['torch']}, commit {str(e['git_commit'])[:10]}. Compute utilisation = median "
            "compute-only step (10 steps before the loop) x steps / slowest rank's loop time; in-loop compute "
            "utilisation = the time a rank spent in forward, backward and the inner optimizer's step during the "
            "loop / its loop time (lowest rank; not for DDP, whose backward carries its all-reduce); time in sync = "
            "what step() and the closing flush spent besides the inner optimizer's step (compression, waits, outer "
            "steps, merges) / loop time (highest rank); of which waiting = the part spent blocked on a reduce started "
            "TAU steps earlier (streaming with TAU > 0: the communication the inner steps did not hide; highest "
            "rank); loss = mean "
            "over ranks, moving average of "
            f"{out['smoothing_window']} steps.\n\n")
    has_ddp = any(r["method"] == "ddp" for r in out["table"])
    rows = [(r["net"], r["method"], f"{100 * r['compute_util']:.1f}%",
             "-" if r["loop_compute_util"] is None else f"{100 * r['loop_compute_util']:.1f}%",
             "-" if r.get("sync_share") is None else f"{100 * r['sync_share']:.1f}%",
             "-" if r.get("wait_share") is None else f"{100 * r['wait_share']:.1f}%", r["total_s"], 1e3 * r["compute_step_s"],
             r["final_loss"], r["loss_vs_diloco"],
             (r["time_to_ddp_loss_s"] or "not reached") if has_ddp else "no DDP run", r["bytes_sent_mb"],
             r["bytes_vs_diloco"], r["tx_mb"], r["peak_event_kb"], r["peak_vs_model_over_p"], r["max_step_tx_kb"])
            for r in out["table"]]
    return head + md_table(["link", "method", "compute util", "in-loop compute util", "time in sync", "of which waiting", "loop s", "compute ms/step", "final loss",
                            "loss / DiLoCo's", "time to DDP loss s", "DiLoCo MB/rank", "bytes / DiLoCo's",
                            "tx MB/rank", "peak kB/event", "peak / (model/P)", "max tx kB in a step"], rows) + "\n"


def rerender(json_path: str) -> dict:
    """Recompute the table, Markdown and PNG of a saved run (analysis changes need no rerun)."""
    from .report import rerender as _rerender
    return _rerender(json_path, lambda out: {"table": analyse(out["runs"], out["smoothing_window"])}, markdown, plot)


def plot(out: dict, path: str) -> None:
    """Compute utilisation and final loss per method: against the link rate when several links
    ran, else per method on the one link."""
    from .report import plt as _plt
    t = out["table"]
    if not t:
        return
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    methods = list(dict.fromkeys(r["method"] for r in t))
    nets = sorted({r["rate_mbit"] for r in t})
    if len(nets) == 1:
        x = list(range(len(methods)))
        rows = {r["method"]: r for r in t}
        axes[0].bar([i - 0.2 for i in x], [100 * rows[m]["compute_util"] for m in methods], 0.4,
                    label="compute-only step x steps / loop time")
        axes[0].bar([i + 0.2 for i in x], [100 * (rows[m]["loop_compute_util"] or 0) for m in methods], 0.4,
                    label="in-loop compute / loop time")
        axes[1].bar(x, [rows[m]["final_loss"] for m in methods])
        lo = min(rows[m]["final_loss"] for m in methods)
        axes[1].set_ylim(lo - 0.1, max(rows[m]["final_loss"] for m in methods) + 0.05)
        for ax in axes:
            ax.set_xticks(x)
            ax.set_xticklabels(methods, rotation=35, ha="right", fontsize=7)
            ax.grid(True, axis="y", alpha=0.3)
        axes[0].axhline(95, color="k", lw=0.8, ls="--")
        axes[0].legend(fontsize=7)
        axes[0].set_title(f"compute utilisation at {nets[0]:g} Mbit/s")
        axes[1].set_title(f"final loss at equal tokens, {nets[0]:g} Mbit/s")
    else:
        for k, m in enumerate(methods):
            pts = sorted((r["rate_mbit"], r["loop_compute_util"] or r["compute_util"], r["final_loss"])
                         for r in t if r["method"] == m)
            axes[0].plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", color=f"C{k % 10}", label=m)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", color=f"C{k % 10}", label=m)
        for ax, yl in zip(axes, ("in-loop compute utilisation (%; DDP: pre-measured)", "final loss at equal tokens")):
            ax.set_xscale("log")
            ax.set_xlabel("link rate (Mbit/s)")
            ax.set_ylabel(yl)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="rank side of the streaming benchmark")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--method", required=True)
    p.add_argument("--ifname", default="")
    p.add_argument("--model", default="small")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--sync-every", type=int, default=24)
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.6)
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--timeout", type=float, default=1200.0)
    p.add_argument("--seed", type=int, default=0, help="model init and data seed")
    p.add_argument("--result", required=True)
    _worker(p.parse_args(argv))


if __name__ == "__main__":
    main()
