"""Hyperparameter sweep behind the time-to-loss benchmark's DiLoCo settings.

The training loss as a function of the step does not depend on the link (the link changes only
the time a step takes), so the settings are chosen on the host's loopback, with the same rank
code, model, data, schedule and 4 workers as ``localsgd-bench time-to-loss``
(``localsgd_comm.bench.time_to_loss``). Every point is one full training run; the table gives
the final smoothed loss (moving average of 20 steps, as the benchmark uses at 240 steps).

The grid covers what a user would tune: DDP's lr (the baseline gets the same care), DiLoCo's
sync interval H, the outer momentum and outer lr, the inner lr, and the number of steps
(DiLoCo past DDP's tokens: time to DDP's loss is what the benchmark's target asks about).

    python benchmarks/diloco_tuning.py [--out-dir benchmarks/results] [--quick]

Writes ``diloco_tuning.json`` (every run: configuration, smoothed curve every 10 steps) and
``diloco_tuning.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from localsgd_comm.bench import report  # noqa: E402
from localsgd_comm.bench.launch import RankFailure, run_ranks  # noqa: E402
from localsgd_comm.bench.time_to_loss import smooth  # noqa: E402

WINDOW = 20
D4 = "diloco-int4"

# (method, steps, H, outer lr, outer momentum, inner lr); H and the outer values only for DiLoCo.
GRID = [
    ("ddp-gloo", 240, None, None, None, 1e-3),
    ("ddp-gloo", 240, None, None, None, 2e-3),
    ("ddp-gloo", 240, None, None, None, 3e-3),
    ("ddp-gloo", 240, None, None, None, 4e-3),
    # the DiLoCo paper's outer optimizer (lr 0.7, Nesterov momentum 0.9): H and steps
    (D4, 240, 10, 0.7, 0.9, 2e-3),
    (D4, 240, 20, 0.7, 0.9, 2e-3),
    (D4, 240, 40, 0.7, 0.9, 2e-3),
    (D4, 480, 10, 0.7, 0.9, 2e-3),
    (D4, 480, 20, 0.7, 0.9, 2e-3),
    (D4, 480, 40, 0.7, 0.9, 2e-3),
    (D4, 480, 80, 0.7, 0.9, 2e-3),
    (D4, 480, 20, 1.0, 0.9, 2e-3),
    (D4, 480, 40, 0.5, 0.9, 2e-3),
    (D4, 480, 20, 0.7, 0.9, 3e-3),
    # outer momentum: with tens of outer steps, 0.9 carries a ~10-step memory
    (D4, 240, 20, 0.7, 0.6, 2e-3),
    (D4, 240, 20, 0.7, 0.3, 2e-3),
    (D4, 240, 10, 0.7, 0.6, 2e-3),
    (D4, 360, 20, 0.7, 0.6, 2e-3),
    (D4, 480, 20, 0.7, 0.6, 2e-3),
    (D4, 480, 20, 0.7, 0.3, 2e-3),
    (D4, 480, 10, 0.7, 0.6, 2e-3),
    (D4, 480, 40, 0.7, 0.6, 2e-3),
    (D4, 480, 20, 1.0, 0.6, 2e-3),
]
QUICK = [GRID[1], (D4, 240, 20, 0.7, 0.9, 2e-3), (D4, 240, 20, 0.7, 0.6, 2e-3)]


def run_point(method, steps, H, olr, mom, lr) -> dict:
    args = ["--worker", f"--method={method}", f"--steps={steps}", f"--lr={lr}"]
    if H is not None:
        args += [f"--sync-every={H}", f"--outer-lr={olr}", f"--outer-momentum={mom}"]
    t0 = time.time()
    r = run_ranks(4, "localsgd_comm.bench.time_to_loss", args, timeout_s=1200)
    sl = smooth(r["loss_mean"], WINDOW)
    return {"method": method, "steps": steps, "sync_every": H, "outer_lr": olr, "outer_momentum": mom, "lr": lr,
            "final_loss": sl[-1], "loss_at_240": sl[min(239, len(sl) - 1)], "run_s": time.time() - t0,
            "curve_every_10": [round(v, 4) for v in sl[9::10]]}


def markdown(out: dict) -> str:
    e = out["environment"]
    head = (f"DiLoCo/DDP tuning on loopback: 4 workers, GPT 'tiny', seq 64, batch 8/worker, AdamW "
            f"(betas 0.9/0.95, wd 0.01, warm-up + cosine to 10% over each run's steps); loss = mean over "
            f"ranks, moving average of {WINDOW} steps. {e['machine']['cpu_model']}, torch "
            f"{e['versions']['torch']}, commit {str(e['git_commit'])[:10]}.\n\n")
    rows = [(r["method"], r["steps"], r["lr"], r["sync_every"] or "-", r["outer_lr"] or "-",
             "-" if r["outer_momentum"] is None else r["outer_momentum"], r["loss_at_240"], r["final_loss"])
            for r in out["runs"]]
    fails = "".join(f"\nFailed once and retried: {f['point']}: {f['error'].strip().splitlines()[-1]}\n"
                    for f in out.get("failures", []))
    return head + report.md_table(["method", "steps", "inner lr", "H", "outer lr", "outer momentum",
                                   "loss at step 240", "final loss"], rows) + "\n" + fails


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--quick", action="store_true", help="3 points (a smoke run)")
    a = ap.parse_args(argv)
    os.makedirs(a.out_dir, exist_ok=True)
    out = {"benchmark": "diloco_tuning", "environment": report.environment(), "window": WINDOW, "runs": []}
    name = "diloco_tuning_quick" if a.quick else "diloco_tuning"
    out["failures"] = []
    for pt in (QUICK if a.quick else GRID):
        try:
            r = run_point(*pt)
        except RankFailure as exc:
            # Recorded, then retried once: the loss of a point is deterministic, so a retry that
            # succeeds gives the same numbers; a second failure stops the sweep.
            out["failures"].append({"point": list(pt), "error": str(exc)[-3000:]})
            print(f"FAILED {pt}, retrying once: {str(exc)[-500:]}", flush=True)
            r = run_point(*pt)
        out["runs"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "curve_every_10"}), flush=True)
        report.write_json(os.path.join(a.out_dir, name + ".json"), out)  # partial results survive
    with open(os.path.join(a.out_dir, name + ".md"), "w") as f:
        f.write(markdown(out))


if __name__ == "__main__":
    main()
