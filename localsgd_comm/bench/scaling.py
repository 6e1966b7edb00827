"""Scaling study: DiLoCo's loss gap to DDP against model size and H, and the critical batch size.

Two questions, each answered at small scale on CPU:

1. **Local SGD against data parallelism at equal tokens and compute** (the question of He et al.,
   2024, "Exploring Scaling Laws for Local SGD in Large Language Model Training"). For byte-level
   GPTs of four sizes (``xs`` 0.09M to ``medium`` 1.9M parameters, 20x), M = 2 and 4 workers:
   DDP (one model, global batch M x b per step) against DiLoCo (M replicas, batch b each, H = 10
   or 50 inner steps, int8 or int4 pseudo-gradients; fp32 at M = 4, H = 50 as the reference
   without quantization); the largest size runs the M = 4 grid only (time). Every run sees the same tokens (worker w's batch at step t is
   ``ByteData.batch(w, t, b)``) and the same number of gradient evaluations, with the same inner
   AdamW and schedule. The gap is the final validation loss of DiLoCo's anchor over DDP's, in %.
2. **Critical batch size at fixed tokens** (Zhang et al., 2024, "How Does Critical Batch Size
   Scale in Pre-training?", arXiv 2410.21676): DDP with a growing global batch (1 to 32 worker
   batches) at two token budgets 4x apart, best of two learning rates per point (``xs`` model). The CBS here
   is the largest global batch whose loss is within ``CBS_TOLERANCE`` of the best batch's at
   the same tokens (interpolated in log batch); the paper's finding to compare with is that it
   grows with the amount of data.

How the workers are run. Convergence does not depend on the link, so the M workers of a run
are simulated in one process, one after another, with the library's own kernels doing what
the distributed path does, on DiLoCo's flat layout (every parameter block-aligned):
``compress_delta`` of each worker's pseudo-gradient, the owner's
``dequantize_reduce_requantize`` (sum in rank order, times 1/M), and
``outer_nesterov_step_compressed``. That is the arithmetic of ``DiLoCo`` over the ``localsgd``
backend (the chunks of the real all-reduce are block-aligned, and block-wise quantization of a
chunk equals that of the whole buffer); ``tests/test_scaling.py`` checks the simulated anchor
against two real ``DiLoCo`` processes bitwise. A run is one process with one thread;
``--jobs`` runs several at once. Each finished run is a JSON file under
``<out>/scaling_runs/``; an interrupted study resumes where it stopped.

Entry point: ``localsgd-bench scaling`` (the driver) and ``python -m localsgd_comm.bench.scaling
--run SPEC --result FILE`` (one run).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

from .time_to_loss import lr_factor  # the main job's schedule, shared by every suite

#: study-specific sizes (n_layer, n_head, d_model); tiny/small/medium are the main job's
SIZES = {"xs": (2, 2, 56), "tiny": (2, 4, 64), "small": (4, 4, 128), "medium": (6, 5, 160)}
#: CBS: a global batch is "critical" while its loss stays within this fraction of the best one
CBS_TOLERANCE = 0.01

FULL = dict(sizes=["xs", "tiny", "small", "medium"], steps=600, batch=8, seq=64, lr=2e-3, weight_decay=0.01,
            outer_lr=0.7, outer_momentum=0.6, workers=[2, 4], sync_every=[10, 50], formats=["int8", "int4"],
            fp32_reference=[4, 50], noise_seeds=[1], noise_sizes=["xs", "tiny", "small"], eval_every=100,
            val_batches=16, val_batch=16,
            # the largest model runs the M = 4 grid only (its M = 2 runs would add ~25 min on 2 cores)
            largest_workers_only=["medium"],
            cbs=dict(size="xs", token_batches=[640, 2560], global_batches=[1, 2, 4, 8, 16, 32],
                     lrs=[2e-3, 6e-3]))
QUICK = dict(FULL, sizes=["xs", "tiny"], steps=60, workers=[2], sync_every=[10, 30], formats=["int8"],
             fp32_reference=[2, 30], noise_seeds=[], eval_every=30, val_batches=4, val_batch=8,
             cbs=dict(size="xs", token_batches=[32, 128], global_batches=[1, 4, 16], lrs=[3e-3]))


# ------------------------------------------------------------------------------------------
# the run list
# ------------------------------------------------------------------------------------------
def run_specs(cfg: dict) -> List[dict]:
    base = {k: cfg[k] for k in ("steps", "batch", "seq", "lr", "weight_decay", "eval_every", "val_batches",
                                "val_batch")}
    specs = []
    for size in cfg["sizes"]:
        for m in cfg["workers"]:
            if size in cfg.get("largest_workers_only", ()) and m != max(cfg["workers"]):
                continue
            seeds = [0] + (list(cfg["noise_seeds"]) if size in cfg["noise_sizes"] and m == max(cfg["workers"])
                           else [])
            for seed in seeds:
                specs.append(dict(base, kind="ddp", size=size, workers=m, seed=seed,
                                  name=f"{size}-ddp-M{m}-s{seed}"))
            for h in cfg["sync_every"]:
                fmts = list(cfg["formats"]) + (["none"] if [m, h] == list(cfg["fp32_reference"]) else [])
                for fmt in fmts:
                    specs.append(dict(base, kind="diloco", size=size, workers=m, sync_every=h, format=fmt,
                                      outer_lr=cfg["outer_lr"], outer_momentum=cfg["outer_momentum"], seed=0,
                                      name=f"{size}-diloco-M{m}-H{h}-{fmt}-s0"))
    c = cfg["cbs"]
    for d in c["token_batches"]:
        for g in c["global_batches"]:
            if d // g < 4:
                continue
            for lr in c["lrs"]:
                specs.append(dict(base, kind="ddp", size=c["size"], workers=g, seed=0, steps=d // g, lr=lr,
                                  eval_every=0, study="cbs", token_batches=d,
                                  name=f"cbs-{c['size']}-D{d}-G{g}-lr{lr:g}"))
    return specs


def _cost(spec: dict) -> float:
    """Relative cost (worker batches x model width^2 x layers), to start the longest runs first."""
    n_layer, _, d = SIZES[spec["size"]]
    return spec["steps"] * spec["workers"] * (n_layer * d * d + 256 * d)


# ------------------------------------------------------------------------------------------
# one run (in its own process)
# ------------------------------------------------------------------------------------------
def _model(spec: dict):
    import torch
    from localsgd_comm.model import GPT, GPTConfig
    n_layer, n_head, d = SIZES[spec["size"]]
    torch.manual_seed(spec["seed"])
    return GPT(GPTConfig(n_layer=n_layer, n_head=n_head, d_model=d, seq_len=spec["seq"]))


def _adamw(params, spec: dict):
    import torch
    return torch.optim.AdamW(params, lr=spec["lr"], weight_decay=spec["weight_decay"], betas=(0.9, 0.95))


def _val_loss(model, val) -> float:
    import torch
    was = model.training
    model.eval()
    with torch.no_grad():
        loss = sum(float(model(x, y)) for x, y in val) / len(val)
    model.train(was)
    return loss


def simulate(spec: dict, data=None, val=None, log=None) -> dict:
    """Train one configuration; returns its validation curve and (for DiLoCo) the final anchor."""
    import torch
    from torch.nn.utils import parameters_to_vector

    from localsgd_comm import DEFAULT_BLOCK_SIZE

    from localsgd_comm import functional as F
    from localsgd_comm.data import ByteData, load_corpus

    if data is None:
        data = ByteData(load_corpus(), spec["seq"], seed=spec["seed"])
    if val is None:
        val = data.val_batches(spec["val_batches"], spec["val_batch"])
    steps, b, m = spec["steps"], spec["batch"], spec["workers"]
    model = _model(spec)
    n_params = sum(p.numel() for p in model.parameters())
    curve, train = [], []
    t0 = time.perf_counter()

    def record(step, net):
        curve.append({"step": step, "tokens": step * m * b * spec["seq"], "val_loss": _val_loss(net, val)})

    if spec["kind"] == "ddp":
        opt = _adamw(model.parameters(), spec)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, steps))
        for step in range(steps):
            xs, ys = zip(*(data.batch(w, step, b) for w in range(m)))
            loss = model(torch.cat(xs), torch.cat(ys))  # mean over M x b sequences: DDP's averaged gradient
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            train.append(loss.item())
            if spec["eval_every"] and (step + 1) % spec["eval_every"] == 0 and step + 1 < steps:
                record(step + 1, model)
        record(steps, model)
        anchor = parameters_to_vector(model.parameters()).detach()
    elif spec["kind"] == "diloco":
        import copy
        h, fmt = spec["sync_every"], spec["format"]
        if steps % h:
            raise ValueError(f"steps ({steps}) must be a multiple of sync_every ({h}): the run ends on a sync")
        replicas = [copy.deepcopy(model) for _ in range(m)]
        opts = [_adamw(r.parameters(), spec) for r in replicas]
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: lr_factor(i, steps)) for o in opts]
        # DiLoCo's flat layout: every parameter starts on a quantization-block boundary (zero
        # padding between them) when the format quantizes, packed for fp32
        align = DEFAULT_BLOCK_SIZE if fmt != "none" else 1
        offsets, off = [], 0
        for p in model.parameters():
            offsets.append(off)
            off += -(-p.numel() // align) * align
        n = offsets[-1] + list(model.parameters())[-1].numel()

        def flat_of(net):
            v = torch.zeros(n)
            for p, o in zip(net.parameters(), offsets):
                v[o:o + p.numel()] = p.detach().reshape(-1)
            return v

        def write(net, v):
            with torch.no_grad():
                for p, o in zip(net.parameters(), offsets):
                    p.copy_(v[o:o + p.numel()].view_as(p))
        anchor = flat_of(model)
        momentum = torch.zeros_like(anchor)
        for step in range(steps):
            tl = 0.0
            for w, (r, o, s) in enumerate(zip(replicas, opts, scheds)):
                x, y = data.batch(w, step, b)
                loss = r(x, y)
                o.zero_grad(set_to_none=True)
                loss.backward()
                o.step()
                s.step()
                tl += loss.item() / m
            train.append(tl)
            if (step + 1) % h:
                continue
            vecs = [flat_of(r) for r in replicas]
            if fmt == "none":
                g = anchor - vecs[0]
                for v in vecs[1:]:
                    g += anchor - v
                g /= m
                F.outer_nesterov_step(anchor, momentum, None, g, spec["outer_lr"], spec["outer_momentum"], True)
            else:
                enc = [F.compress_delta(anchor, v, None, fmt) for v in vecs]
                p, sc = F.dequantize_reduce_requantize(torch.stack([e[0] for e in enc]),
                                                       torch.stack([e[1] for e in enc]), fmt, n, None, 1.0 / m)
                F.outer_nesterov_step_compressed(anchor, momentum, None, p, sc, fmt, None, 1.0,
                                                 spec["outer_lr"], spec["outer_momentum"], True)
            for r in replicas:
                write(r, anchor)
            if spec["eval_every"] and (step + 1) % spec["eval_every"] == 0 and step + 1 < steps:
                record(step + 1, replicas[0])
        record(steps, replicas[0])
        anchor = parameters_to_vector(replicas[0].parameters()).detach()  # packed, as DiLoCo's params
    else:
        raise ValueError(f"kind: expected 'ddp' or 'diloco', got {spec['kind']!r}")
    secs = time.perf_counter() - t0
    # ring volume per worker: 2 (M-1)/M of the buffer (bytes on the wire are measured in
    # ``localsgd-bench collectives``; this is the count those measurements match within 0.4%)
    ring = 2 * (m - 1) / m
    if spec["kind"] == "ddp":
        sent = ring * 4 * n_params * steps
    else:
        sent = ring * F.compressed_nbytes(spec["format"], n_params) * (steps // spec["sync_every"])
    out = {"name": spec["name"], "spec": spec, "n_params": n_params, "val_curve": curve,
           "final_val_loss": curve[-1]["val_loss"], "train_loss_last10pct": sum(train[-max(1, steps // 10):]) /
           max(1, min(len(train), steps // 10)), "seconds": secs, "bytes_sent_per_worker": sent,
           "tokens": steps * m * b * spec["seq"]}
    out["_anchor"] = anchor
    return out


def _run_one(spec_json: str, result: str) -> None:
    import torch
    torch.set_num_threads(1)
    spec = json.loads(spec_json)
    out = simulate(spec)
    out.pop("_anchor")
    from .report import write_json
    write_json(result, out)


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------
def run_suite(out_dir: str, quick: bool = False, log=print, jobs: int = 2, sizes=None) -> dict:
    from . import report
    cfg = dict(QUICK if quick else FULL)
    if sizes:
        bad = [s for s in sizes if s not in SIZES]
        if bad:
            raise ValueError(f"scaling sizes: expected a subset of {sorted(SIZES)}, got {bad}")
        cfg["sizes"] = list(sizes)
    env = report.environment()
    runs_dir = os.path.join(out_dir, "scaling_runs" + ("_quick" if quick else ""))
    os.makedirs(runs_dir, exist_ok=True)
    specs = sorted(run_specs(cfg), key=_cost, reverse=True)
    log(f"[scaling] {len(specs)} runs, {jobs} at a time, results in {runs_dir}")
    t0 = time.time()
    failed = []

    def one(spec):
        path = os.path.join(runs_dir, spec["name"] + ".json")
        if os.path.exists(path):
            return
        t = time.time()
        env_ = dict(os.environ, OMP_NUM_THREADS="1")
        p = subprocess.run([sys.executable, "-m", "localsgd_comm.bench.scaling", "--run", json.dumps(spec),
                            "--result", path], env=env_, capture_output=True, text=True, timeout=4 * 3600)
        if p.returncode != 0:
            failed.append({"name": spec["name"], "reason": p.stderr[-3000:]})
            log(f"[scaling] FAILED {spec['name']}: {p.stderr[-2000:]}")
            return
        with open(path) as f:
            r = json.load(f)
        log(f"[scaling] {spec['name']:<32} final val loss {r['final_val_loss']:.4f}  {time.time() - t:6.0f} s "
            f"(elapsed {time.time() - t0:.0f} s)")

    with ThreadPoolExecutor(max(1, jobs)) as ex:
        list(ex.map(one, specs))
    runs = []
    for spec in specs:
        path = os.path.join(runs_dir, spec["name"] + ".json")
        if os.path.exists(path):
            with open(path) as f:
                runs.append(json.load(f))
    out = {"benchmark": "scaling", "quick": quick, "config": cfg, "environment": env,
           "wall_s": time.time() - t0, "runs": runs, "failed": failed}
    out.update(analyse(runs, cfg))
    name = "scaling_quick" if quick else "scaling"
    report.write_artifacts(out_dir, name, out, markdown(out), plot)
    log(f"[scaling] done in {time.time() - t0:.0f} s")
    return out


def _fit_line(xs: List[float], ys: List[float]):
    """Least squares y = a + b x; returns (a, b, standard error of b) (se None below 3 points)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return my, 0.0, None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    if n < 3:
        return a, b, None
    res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return a, b, math.sqrt(res / (n - 2) / sxx)


def analyse(runs: List[dict], cfg: dict) -> dict:
    by = {r["name"]: r for r in runs}
    gaps = []
    for r in runs:
        s = r["spec"]
        if s["kind"] != "diloco":
            continue
        ddp = by.get(f"{s['size']}-ddp-M{s['workers']}-s0")
        if ddp is None:
            continue
        gaps.append({"size": s["size"], "n_params": r["n_params"], "workers": s["workers"], "H": s["sync_every"],
                     "format": s["format"], "outer_steps": s["steps"] // s["sync_every"],
                     "ddp_loss": ddp["final_val_loss"], "diloco_loss": r["final_val_loss"],
                     "gap_pct": 100 * (r["final_val_loss"] / ddp["final_val_loss"] - 1),
                     "bytes_ratio_ddp_over_diloco": ddp["bytes_sent_per_worker"] / r["bytes_sent_per_worker"]})
    noise = []
    for r in runs:
        s = r["spec"]
        if s["kind"] == "ddp" and s.get("study") != "cbs" and s["seed"] != 0:
            ref = by.get(f"{s['size']}-ddp-M{s['workers']}-s0")
            if ref:
                noise.append({"size": s["size"], "workers": s["workers"], "seed": s["seed"],
                              "diff_pct": 100 * (r["final_val_loss"] / ref["final_val_loss"] - 1)})
    # gap against log10(params), per (M, H, format)
    trends = []
    for key in sorted({(g["workers"], g["H"], g["format"]) for g in gaps}):
        pts = sorted((g["n_params"], g["gap_pct"]) for g in gaps if (g["workers"], g["H"], g["format"]) == key)
        if len(pts) >= 2:
            a, b, se = _fit_line([math.log10(n) for n, _ in pts], [y for _, y in pts])
            trends.append({"workers": key[0], "H": key[1], "format": key[2], "points": len(pts),
                           "gap_at_smallest_pct": pts[0][1], "gap_at_largest_pct": pts[-1][1],
                           "slope_pct_per_decade": b, "slope_se": se})
    # critical batch size at fixed tokens
    cbs = []
    for d in sorted({r["spec"]["token_batches"] for r in runs if r["spec"].get("study") == "cbs"}):
        best = {}
        for r in runs:
            s = r["spec"]
            if s.get("study") == "cbs" and s["token_batches"] == d:
                g = s["workers"]
                if g not in best or r["final_val_loss"] < best[g]["loss"]:
                    best[g] = {"loss": r["final_val_loss"], "lr": s["lr"]}
        gs = sorted(best)
        lmin = min(best[g]["loss"] for g in gs)
        thr = lmin * (1 + CBS_TOLERANCE)
        crit = None
        for g0, g1 in zip(gs, gs[1:]):
            l0, l1 = best[g0]["loss"], best[g1]["loss"]
            if l0 <= thr < l1:  # first crossing above the threshold: interpolate in log2(batch)
                f = (thr - l0) / (l1 - l0)
                crit = 2 ** (math.log2(g0) + f * (math.log2(g1) - math.log2(g0)))
        beyond = crit is None and best[gs[-1]]["loss"] <= thr  # never left the band: CBS >= largest tried
        seq_tokens = runs[0]["spec"]["seq"] * runs[0]["spec"]["batch"]
        cbs.append({"token_batches": d, "tokens": d * seq_tokens, "points": [
            {"global_batches": g, "global_batch_tokens": g * seq_tokens, "steps": d // g, **best[g]} for g in gs],
            "critical_global_batches": crit, "beyond_largest_tried": beyond,
            "critical_batch_tokens": None if crit is None else crit * seq_tokens})
    return {"gaps": gaps, "trends": trends, "seed_noise": noise, "cbs": cbs}


def markdown(out: dict) -> str:
    from .report import md_table
    e, c = out["environment"], out["config"]
    head = (f"Scaling study ({'quick' if out['quick'] else 'full'}): byte-level GPTs, seq {c['seq']}, batch "
            f"{c['batch']}/worker, {c['steps']} steps per run, AdamW lr {c['lr']} (warm-up + cosine to 10%), "
            f"outer Nesterov lr {c['outer_lr']} momentum {c['outer_momentum']}; "
            f"{e['machine']['cpu_model']}, {e['machine']['cores']} cores, torch {e['versions']['torch']}, "
            f"commit {str(e['git_commit'])[:10]}; {len(out['runs'])} runs, {out['wall_s']:.0f} s wall. "
            f"Command: `localsgd-bench scaling{' --quick' if out['quick'] else ''}`\n\n")
    parts = [head, "## DiLoCo vs DDP at equal tokens and compute (final validation loss)\n\n",
             md_table(["size", "params", "M", "H", "format", "outer steps", "DDP loss", "DiLoCo loss", "gap %",
                       "DDP bytes / DiLoCo bytes"],
                      [(g["size"], g["n_params"], g["workers"], g["H"], g["format"], g["outer_steps"], g["ddp_loss"],
                        g["diloco_loss"], round(g["gap_pct"], 2), round(g["bytes_ratio_ddp_over_diloco"], 1))
                       for g in sorted(out["gaps"], key=lambda g: (g["workers"], g["H"], g["format"], g["n_params"]))]),
             "\n\n## Gap against model size (least-squares slope of gap % over log10 params)\n\n",
             md_table(["M", "H", "format", "sizes", "gap smallest %", "gap largest %", "slope %/decade", "+-"],
                      [(t["workers"], t["H"], t["format"], t["points"], round(t["gap_at_smallest_pct"], 2),
                        round(t["gap_at_largest_pct"], 2), round(t["slope_pct_per_decade"], 2),
                        None if t["slope_se"] is None else round(t["slope_se"], 2)) for t in out["trends"]])]
    if out["seed_noise"]:
        parts += ["\n\n## Seed noise (DDP, another model/data seed, same configuration)\n\n",
                  md_table(["size", "M", "seed", "loss difference %"],
                           [(n["size"], n["workers"], n["seed"], round(n["diff_pct"], 2)) for n in out["seed_noise"]])]
    for cb in out["cbs"]:
        crit = cb["critical_global_batches"]
        parts += [f"\n\n## Critical batch size at {cb['tokens']} tokens (DDP, best lr per batch; CBS = largest batch "
                  f"within {100 * CBS_TOLERANCE:.0f}% of the best loss): "
                  f"{'not reached (>= largest tried)' if cb['beyond_largest_tried'] else ('-' if crit is None else f'{crit:.1f} worker batches')}\n\n",
                  md_table(["global batch (worker batches)", "tokens/step", "steps", "best lr", "val loss"],
                           [(p["global_batches"], p["global_batch_tokens"], p["steps"], p["lr"], p["loss"])
                            for p in cb["points"]])]
    if out.get("failed"):
        parts += ["\n\nFailed runs: " + ", ".join(f["name"] for f in out["failed"])]
    return "".join(parts) + "\n"


def plot(out: dict, path: str) -> None:
    from .report import plt as _plt
    pyplot = _plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    for key in sorted({(g["workers"], g["H"], g["format"]) for g in out["gaps"]}):
        pts = sorted((g["n_params"], g["gap_pct"]) for g in out["gaps"] if (g["workers"], g["H"], g["format"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"M={key[0]} H={key[1]} {key[2]}")
    ax.set_xscale("log")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("parameters")
    ax.set_ylabel("final val loss gap to DDP (%)")
    ax.set_title("DiLoCo vs DDP, equal tokens and compute")
    ax.legend(fontsize=7)
    ax = axes[1]
    for key in sorted({(g["size"], g["workers"], g["format"]) for g in out["gaps"] if g["format"] != "none"}):
        pts = sorted((g["H"], g["gap_pct"]) for g in out["gaps"] if (g["size"], g["workers"], g["format"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} M={key[1]} {key[2]}")
    ax.set_xscale("log")
    ax.set_xlabel("H (inner steps per sync)")
    ax.set_ylabel("gap to DDP (%)")
    ax.set_title("gap against H")
    ax.legend(fontsize=6, ncol=2)
    ax = axes[2]
    for cb in out["cbs"]:
        ax.plot([p["global_batch_tokens"] for p in cb["points"]], [p["loss"] for p in cb["points"]], marker="o",
                label=f"{cb['tokens']} tokens")
        if cb["critical_batch_tokens"]:
            ax.axvline(cb["critical_batch_tokens"], ls="--", lw=0.8, color=ax.lines[-1].get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch (tokens per step)")
    ax.set_ylabel("final val loss (best lr)")
    ax.set_title("critical batch size at fixed tokens (dashed: CBS)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot.close(fig)


def rerender(json_path: str) -> dict:
    """Recompute tables and figures of a saved study (analysis changes need no rerun)."""
    from .report import rerender as _rerender
    return _rerender(json_path, lambda out: analyse(out["runs"], out["config"]), markdown, plot)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="one run of the scaling study (the driver is localsgd-bench scaling)")
    ap.add_argument("--run", required=True, help="the run's spec, JSON")
    ap.add_argument("--result", required=True, help="where to write the run's result, JSON")
    a = ap.parse_args(argv)
    _run_one(a.run, a.result)


if __name__ == "__main__":
    main()
