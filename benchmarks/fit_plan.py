"""Refit the planner's own measurements from the committed results and write
localsgd_comm/plan_fit.json.

    python benchmarks/fit_plan.py            # fit, write, print
    python benchmarks/fit_plan.py --check    # exit 1 when plan_fit.json is not the current fit
    python benchmarks/fit_plan.py --compare  # the planner next to the published tables (docs/planner.md)

CPU_PROFILE: the costs of gloo and the localsgd backend on this project's CPU machine, from
benchmarks/results/collectives.json (``localsgd-bench collectives``); used only with
``localsgd-plan --profile cpu-gloo``.
PROJECT_STUDY: DiLoCo's gap and token efficiency for small models, from
benchmarks/results/scaling.json (``localsgd-bench scaling``).
The published laws are not fitted here: localsgd_comm/plan/laws.py holds them with their sources.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _md(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def compare() -> str:
    """Markdown tables: the planner next to the published numbers and this project's study."""
    from localsgd_comm import plan
    from localsgd_comm.plan import laws
    levels = laws.UTILIZATION_LEVELS
    parts = []
    rows = []
    for N, (dp, dil) in {**laws.TABLE4, **laws.TABLE5}.items():
        cells = [f"{N:.3g}"]
        for M in (2, 4, 8):
            if M not in dil:
                cells.append("-")
                continue
            job = plan.Job(params=int(N), tokens=20 * N, tokens_per_step=4096, workers=M, step_time_s=1.0)
            p = plan.predict(job, plan.Network(), plan.Candidate("diloco", M, 30, "int8"))
            cells.append(f"{100 * (dil[M] / dp - 1):+.2f} / {p.gap_pct:+.2f}")
        rows.append(cells)
    parts.append("Loss gap of DiLoCo to data-parallel at H = 30, D = 20 N, % (published / planner), "
                 "Charles et al. 2025 Tables 4 (35M-2.4B) and 5 (4B, 10B):\n\n"
                 + _md(["N", "M = 2", "M = 4", "M = 8"], rows))
    from localsgd_comm.plan.model import simulator_setting
    rows = []
    for h, pub in laws.TABLE6_10B.items():
        job, net, o, c = simulator_setting(10e9, 0.8, "ddp" if h == "ddp" else "vanilla", H=100 if h == "ddp" else h)
        got = [plan.bandwidth_for_utilization(job, net, c, u, o) / 1000 for u in levels]
        rows.append(["data-parallel" if h == "ddp" else f"DiLoCo H={h}"] + [f"{a:g} / {b:.3g}" for a, b in zip(pub, got)])
    parts.append("Gbit/s for a compute utilisation, 10B Chinchilla, step 0.8 s (published / planner), Charles et al. "
                 "2025 Table 6:\n\n" + _md(["method", "50%", "80%", "90%", "95%", "99%"], rows))
    names = {"ddp": "data-parallel", "vanilla": "DiLoCo", "streaming": "streaming",
             "overlapped": "streaming, overlapped", "fp4": "streaming, overlapped, 4-bit"}
    rows = []
    for (n, layers, st), table in laws.STREAMING_TABLE4.items():
        for name, pub in table.items():
            job, net, o, c = simulator_setting(n, st, name, H=100, fragments=layers // 3)
            got = [plan.bandwidth_for_utilization(job, net, c, u, o) / 1000 for u in levels]
            rows.append([f"{n:.3g}", names[name]] + [f"{a:g} / {b:.3g}" for a, b in zip(pub, got)])
    parts.append("Gbit/s for a compute utilisation, H = 100, fragments of 3 layers, tau = 1 (published / planner), "
                 "Streaming DiLoCo Table 4:\n\n" + _md(["N", "method", "50%", "80%", "90%", "95%", "99%"], rows))
    other = []
    net = plan.Network()

    def gap(N, M, H, D, tau=0.0):
        job = plan.Job(params=int(N), tokens=D, tokens_per_step=4096, workers=M, step_time_s=1.0)
        p = plan.predict(job, net, plan.Candidate("diloco", M, H, "int4" if tau else "none", overlap_steps=tau))
        flag = "" if p.convergence_in_range else " (extrapolated)"
        return ("<= " if p.gap_bound else "") + f"{p.gap_pct:+.2f}{flag}"
    for N, M, H, D, pub, src in (
            (150e6, 8, 500, 268e9, "-0.7 (ppl 15.02 vs 15.30)", "DiLoCo Table 2 (from a 24k-step pretrained model)"),
            (1e9, 2, 30, 25e9, f"{100 * (2.48 / 2.49 - 1):+.1f}", "Streaming DiLoCo Table 5 (2.48 vs 2.49)"),
            (1e9, 2, 100, 25e9, f"{100 * (2.50 / 2.49 - 1):+.1f}", "Streaming DiLoCo Table 5 (2.50 vs 2.49)"),
            (1e9, 2, 100, 100e9, f"{100 * (2.51 / 2.52 - 1):+.1f}", "Streaming DiLoCo Table 7, Dolma (2.51 vs 2.52)"),
            (1e9, 4, 100, 100e9, f"{100 * (2.54 / 2.52 - 1):+.1f}", "Streaming DiLoCo Table 7, Dolma (2.54 vs 2.52)"),
            (1e9, 2, 100, 250e9, f"{100 * (2.45 / 2.45 - 1):+.1f}", "Streaming DiLoCo Table 7, Dolma (2.45 vs 2.45)"),
            (500e6, 2, 100, 11e9, f"{100 * (2.69 / 2.67 - 1):+.1f}", "Streaming DiLoCo Table 5 (2.69 vs 2.67)")):
        other.append([f"{N:.3g}", M, H, f"{D:.3g}", pub, gap(N, M, H, D), src])
    parts.append("Other published points, gap % (the planner's M, H, tokens as published; '<=' a bound):\n\n"
                 + _md(["N", "M", "H", "tokens", "published", "planner", "source"], other))
    with open(os.path.join(ROOT, "benchmarks", "results", "scaling.json")) as f:
        sc = json.load(f)
    rows = []
    for g in sorted(sc["gaps"], key=lambda g: (g["n_params"], g["workers"], g["H"], g["format"])):
        if g["format"] != "int8":
            continue
        tokens = next(r["tokens"] for r in sc["runs"] if r["spec"]["size"] == g["size"]
                      and r["spec"]["workers"] == g["workers"] and r["spec"]["kind"] == "ddp")
        law = laws.published(g["n_params"], g["workers"], g["H"], tokens)
        study = plan.project.study_convergence(g["n_params"], g["workers"], g["H"], tokens, "int8")
        rows.append([g["size"], g["n_params"], g["workers"], g["H"], f"{g['gap_pct']:+.1f}", f"{study.gap_pct:+.1f}",
                     f"{law.gap_pct:+.2f}"])
    parts.append("This project's scaling study (int8; byte-level GPTs, 600 steps, far under 20 tokens per parameter), "
                 "gap %: measured, the study's own fit (what the planner uses for these sizes), and the published "
                 "laws extrapolated down to these sizes:\n\n"
                 + _md(["size", "params", "M", "H", "measured", "study fit", "laws (extrapolated)"], rows))
    rows = []
    for n in (1e9, 10e9):
        for gbit in (1, 10, 100, 400):
            b = 2 * 7 / 8 * n * 2
            hand = b * 8 / (gbit * 1e9)
            t = plan.allreduce_time("bf16", int(n), 8, gbit * 1000)
            rows.append([f"{n:.0e}", gbit, f"{b / 1e9:.2f}", f"{hand:.3g}", f"{t:.3g}"])
    parts.append("Ring all-reduce of bf16 gradients over 8 workers on an ideal link: hand arithmetic "
                 "(2 x 7/8 x 2 bytes x N; bytes x 8 / rate) and the planner:\n\n"
                 + _md(["N", "Gbit/s", "GB per worker", "hand s", "planner s"], rows))
    derived = [
        ["H slope s_2, s_4 (% per decade; Streaming DiLoCo Table 6, mean of six sizes)",
         f"{laws.H_SLOPE[2]:.2f}, {laws.H_SLOPE[4]:.2f}"],
        ["gap uncertainty (RMS, laws vs Charles Table 4, points)", f"{laws.GAP_SD:.2f}"],
        ["DiLoCo / DP optimal batch, M = 2 at 35M, 1B, 10B (Charles Table 9)",
         ", ".join(f"{laws.batch_ratio(n, 2):.2f}" for n in (35e6, 1e9, 10e9))],
        ["critical batch, tokens per step, at 3.07B / 20B / 200B tokens (Zhang et al.)",
         " / ".join(f"{laws.critical_batch_tokens(d):.3g}" for d in (3.072e9, 20e9, 200e9))],
        ["Zhang et al.'s critical batch extrapolated to the project's 1.31M tokens", f"{laws.critical_batch_tokens(1.31072e6):.3g}"],
        ["the project's study: critical batch at 1.31M tokens, gap residual (points)",
         f"{plan.PROJECT_STUDY['cbs']['ref_batch_tokens']:g}, {plan.PROJECT_STUDY['gap_pct']['residual_sd']:.2f}"],
    ]
    parts.append("Derived constants:\n\n" + _md(["quantity", "value"], derived))
    return "\n\n".join(parts) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare only; write nothing")
    ap.add_argument("--compare", action="store_true",
                    help="print the planner next to the published tables and the project's study (markdown)")
    a = ap.parse_args()
    if a.compare:
        print(compare())
        return 0
    from localsgd_comm import plan
    fit = plan.fit_from_results(os.path.join(ROOT, "benchmarks", "results"))
    text = json.dumps(fit, indent=1, sort_keys=True) + "\n"
    if a.check:
        with open(plan.FIT_PATH) as f:
            same = json.load(f) == fit
        print("plan_fit.json is the fit of benchmarks/results" if same else "plan_fit.json is out of date")
        return 0 if same else 1
    with open(plan.FIT_PATH, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
