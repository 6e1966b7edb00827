"""The planner against measurements: predicted step time and time to DDP's loss vs measured.

Inputs are the results of ``localsgd-bench time-to-loss`` (4 workers, each behind its own
shaped link of 1 Gbit/s, 100 Mbit/s or 10 Mbit/s) and ``localsgd-bench clusters`` (2 x 2
multi-cluster and 4 edge workers). For every run the planner (:func:`localsgd_comm.plan.predict`)
is given what a user would give it: the parameters, tokens per step, workers and clusters, the
link's rate, the compute time of one step (each run times 10 compute-only steps on all
workers at once before it trains) and the profile measured on this machine (``cpu-gloo``:
gloo's and the localsgd backend's per-call and per-element costs and the links' efficiency,
passed explicitly; DDP there all-reduces fp32 gradients in one bucket). It predicts:

* the wall time per step (the communication model), compared with the run's measured mean;
* the time to DDP's loss: the steps DDP needed to reach its own final (smoothed) loss, which
  stands for the user's planned tokens, divided by the candidate's predicted token efficiency
  and scaled by the batch factor (the convergence model), times the predicted step time;
  compared with the measured time to that loss, for the runs that reach it.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

from localsgd_comm import plan

from .clusters import plan_inputs

_TTL_METHODS = {"ddp-gloo": ("ddp", "none"), "ddp-localsgd": ("ddp", "int8"), "diloco-fp32": ("diloco", "none"),
                "diloco-int8": ("diloco", "int8"), "diloco-int4": ("diloco", "int4"),
                "diloco-int4-2x": ("diloco", "int4")}


#: What a user of this machine passes: its measured profile, fp32 gradients for DDP (gloo), and
#: no overlap (the tiny model's gradients fit one DDP bucket).
OPTIONS = dict(profile="cpu-gloo", ddp_format="none", ddp_overlap=0.0)


def options() -> "plan.Options":
    o = dict(OPTIONS)
    return plan.Options(profile=plan.load_profile(o.pop("profile")), **o)


def _row(source, setting, method, r, job, net, cand, ddp_steps_to_target, measured_tt):
    p = plan.predict(job, net, cand, options())
    measured_step = r["total_s"] / r["steps"]
    pred_tt = None
    if ddp_steps_to_target is not None:
        # DDP's steps to its loss (the user's plan), stretched by this candidate's convergence
        # (1 for DDP), at this candidate's predicted step time
        convergence = p.time_to_ddp_loss_s / p.total_s  # batch factor / token efficiency
        steps = ddp_steps_to_target * (job.workers / cand.workers) * convergence
        pred_tt = steps * p.step_s
    return {"source": source, "setting": setting, "method": method, "steps": r["steps"],
            "compute_ms": 1e3 * job.compute_s, "measured_ms_per_step": 1e3 * measured_step,
            "predicted_ms_per_step": 1e3 * p.step_s, "step_error_pct": 100 * (p.step_s / measured_step - 1),
            "predicted_token_efficiency": p.token_efficiency,
            "measured_time_to_ddp_loss_s": measured_tt, "predicted_time_to_ddp_loss_s": pred_tt,
            "time_to_loss_error_pct": None if (measured_tt is None or pred_tt is None)
            else 100 * (pred_tt / measured_tt - 1)}


def validate(ttl: Optional[dict], clusters: Optional[dict]) -> List[dict]:
    rows = []
    if ttl and ttl.get("runs"):
        cfg = ttl["config"]
        table = {(t["net"], t["method"]): t for t in ttl["table"]}
        for r in ttl["runs"]:
            if "compute_s_per_rank" not in r or r["method"] not in _TTL_METHODS:
                continue
            method, fmt = _TTL_METHODS[r["method"]]
            w = r["world"]
            comp = sum(r["compute_s_per_rank"]) / len(r["compute_s_per_rank"])
            job = plan.Job(params=r["n_params"], tokens=float(r["steps"] * r["tokens_per_step_global"]),
                           tokens_per_step=cfg["batch"] * cfg["seq"], workers=w, clusters=w, step_time_s=comp)
            net = plan.Network(inter_mbit=float(r["rate_mbit"]))  # each worker behind its own link
            cand = plan.Candidate(method, w, 1 if method == "ddp" else cfg["sync_every"], fmt)
            t = table.get((r["net"], r["method"]), {})
            ddp = table.get((r["net"], "ddp-gloo"), {})
            rows.append(_row("time-to-loss", r["net"], r["method"], r, job, net, cand, ddp.get("steps_to_target"),
                             t.get("time_to_target_s")))
    if clusters and clusters.get("runs"):
        cfg = clusters["config"]
        table = {(t["setting"], t["method"], t["straggler"]): t for t in clusters["table"]}
        for r in clusters["runs"]:
            straggler = r["slow_rank"] >= 0
            job, net, cand = plan_inputs(cfg, r, r["clusters"], r["rate_mbit"])
            t = table[(r["setting"], r["method"], straggler)]
            ddp = next((x for x in clusters["table"] if x["setting"] == r["setting"] and x["method"].endswith("ddp")
                        and not x["straggler"]), {})
            rows.append(_row("clusters", r["setting"] + (" straggler" if straggler else ""), r["method"], r, job, net,
                             cand, ddp.get("steps_to_target"), t.get("time_to_target_s")))
    return rows


def markdown(out: dict) -> str:
    from .report import md_table
    e = out["environment"]
    head = ("Planner vs measurements (`localsgd-bench plan-check`, from the committed time_to_loss.json and "
            f"clusters.json; {e['machine']['cpu_model']}, {e['machine']['cores']} cores, torch "
            f"{e['versions']['torch']}, commit {str(e['git_commit'])[:10]}). Planner options: "
            f"{', '.join(f'{k}={v}' for k, v in OPTIONS.items())}. Predicted time to DDP's loss = DDP's "
            "measured steps to its loss x the candidate's predicted convergence factor x its predicted step "
            "time.\n\n")
    rows = [(r["source"], r["setting"], r["method"], r["steps"], r["compute_ms"], r["measured_ms_per_step"],
             r["predicted_ms_per_step"], round(r["step_error_pct"], 1), round(r["predicted_token_efficiency"], 3),
             r["measured_time_to_ddp_loss_s"], r["predicted_time_to_ddp_loss_s"],
             None if r["time_to_loss_error_pct"] is None else round(r["time_to_loss_error_pct"], 1))
            for r in out["rows"]]
    s = out["summary"]
    tail = (f"\n\nStep time: median |error| {s['step_abs_error_median_pct']:.1f}%, max {s['step_abs_error_max_pct']:.1f}% "
            f"({s['step_points']} runs). Time to DDP's loss: median |error| {s['ttl_abs_error_median_pct']:.1f}%, max "
            f"{s['ttl_abs_error_max_pct']:.1f}% ({s['ttl_points']} runs that reach it); within 25%: "
            f"{s['ttl_within_25pct']} of {s['ttl_points']}.\n")
    return head + md_table(["source", "setting", "method", "steps", "compute ms", "measured ms/step",
                            "planner ms/step", "step error %", "planner token eff.", "measured s to DDP loss",
                            "planner s", "error %"], rows) + tail


def _summary(rows: List[dict]) -> dict:
    se = sorted(abs(r["step_error_pct"]) for r in rows)
    te = sorted(abs(r["time_to_loss_error_pct"]) for r in rows if r["time_to_loss_error_pct"] is not None)
    return {"step_points": len(se), "step_abs_error_median_pct": se[len(se) // 2] if se else float("nan"),
            "step_abs_error_max_pct": se[-1] if se else float("nan"), "ttl_points": len(te),
            "ttl_abs_error_median_pct": te[len(te) // 2] if te else float("nan"),
            "ttl_abs_error_max_pct": te[-1] if te else float("nan"),
            "ttl_within_25pct": sum(1 for x in te if x <= 25)}


def plot(out: dict, path: str) -> None:
    from .report import plt as _plt
    pyplot = _plt()
    fig, ax = pyplot.subplots(figsize=(6.5, 5))
    for key, marker in (("step", "o"), ("ttl", "s")):
        xs, ys = [], []
        for r in out["rows"]:
            if key == "step":
                xs.append(r["measured_ms_per_step"] / 1e3), ys.append(r["predicted_ms_per_step"] / 1e3)
            elif r["time_to_loss_error_pct"] is not None:
                xs.append(r["measured_time_to_ddp_loss_s"]), ys.append(r["predicted_time_to_ddp_loss_s"])
        ax.scatter(xs, ys, marker=marker, label="s per step" if key == "step" else "s to DDP's loss")
    lo, hi = 1e-2, 300
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.plot([lo, hi], [1.25 * lo, 1.25 * hi], "k:", lw=0.6)
    ax.plot([lo, hi], [0.75 * lo, 0.75 * hi], "k:", lw=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured")
    ax.set_ylabel("planner")
    ax.set_title("planner vs measured (dotted: +-25%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot.close(fig)


def run_suite(out_dir: str, results_dir: Optional[str] = None, log=print) -> dict:
    from . import report
    src = results_dir or report.committed_results_dir() or out_dir
    loaded = {}
    for name in ("time_to_loss", "clusters"):
        path = os.path.join(src, name + ".json")
        if os.path.exists(path):
            with open(path) as f:
                loaded[name] = json.load(f)
        else:
            log(f"[plan-check] {path} not found: its runs are left out")
    rows = validate(loaded.get("time_to_loss"), loaded.get("clusters"))
    out = {"benchmark": "plan_check", "quick": False, "environment": report.environment(), "rows": rows,
           "summary": _summary(rows)}
    report.write_artifacts(out_dir, "plan_check", out, markdown(out), plot)
    log(markdown(out).strip().splitlines()[-1])
    return out
