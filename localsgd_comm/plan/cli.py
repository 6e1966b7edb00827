"""``localsgd-plan``: the command line. Every flag is checked before anything is predicted; a bad
value stops with one line naming the flag."""
from __future__ import annotations

import argparse
import json
import math
import re
from typing import List, Optional

from .._ops import DEFAULT_BLOCK_SIZE
from .comm import FORMATS, IDEAL, load_profile
from .inputs import Job, Network, Options
from .recommend import DEFAULT_FORMATS, DEFAULT_H, UTILIZATION_LEVELS, _fmt_s, _gb, _rate, recommend

_SI = {"k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
_FLAG_OF = {"params": "--params", "tokens": "--tokens", "tokens_per_step": "--tokens-per-step", "workers": "--workers",
            "clusters": "--clusters", "step_time_s": "--step-time", "flops": "--flops", "inter_mbit": "--inter-mbit",
            "intra_mbit": "--intra-mbit", "inter_latency_ms": "--inter-latency-ms",
            "intra_latency_ms": "--intra-latency-ms", "speeds": "--straggler", "H": "--H", "formats": "--formats",
            "fragments": "--fragments", "overlap_steps": "--overlap-steps", "max_gap_pct": "--max-gap",
            "utilization": "--utilization", "max_comm_share": "--max-comm-share", "efficiency": "--link-efficiency",
            "ddp_overlap": "--ddp-overlap", "critical_batch": "--critical-batch-tokens", "block_size": "--block-size",
            "device_memory_gib": "--device-memory-gib", "ddp_format": "--ddp-dtype", "profile": "--profile"}


def _parse_number(s: str, si: bool) -> float:
    t = s.strip()
    mult = 1.0
    if si and t and t[-1] in _SI:
        t, mult = t[:-1], _SI[t[-1]]
    if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", t):
        raise ValueError
    return float(t) * mult


def number(lo: float = 0.0, lo_ok: bool = False, hi: Optional[float] = None, hi_ok: bool = True,
           integer: bool = False, si: bool = False, unit: str = ""):
    """An argparse type: a finite number in a range (an integer; with SI suffixes k M B T)."""
    example = " such as 1e9, 350M or 2.5B" if si else ""

    def conv(s: str):
        try:
            v = _parse_number(s, si)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number{example}, got {s!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
        if integer:
            if v != int(v):
                raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}")
            v = int(v)
        if v < lo or (v == lo and not lo_ok) or (hi is not None and (v > hi or (v == hi and not hi_ok))):
            rng = f"{'>=' if lo_ok else '>'} {lo:g}" + ("" if hi is None else f" and {'<=' if hi_ok else '<'} {hi:g}")
            raise argparse.ArgumentTypeError(f"expected a value {rng}{unit}, got {s!r}")
        return v
    return conv


def number_list(**kw):
    one = number(**kw)

    def conv(s: str):
        parts = [p for p in s.split(",")]
        if not s.strip() or any(not p.strip() for p in parts):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {s!r}")
        return [one(p) for p in parts]
    return conv


def format_list(s: str) -> List[str]:
    parts = [p.strip() for p in s.split(",")]
    bad = [p for p in parts if p not in FORMATS]
    if bad or not s.strip():
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(FORMATS)}, got {s!r}")
    return parts


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="localsgd-plan", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Plan a data-parallel run: DDP or DiLoCo (flat, hierarchical, streaming), how many workers,\n"
                    "which H, wire format and fragments. Predicts each candidate's time per step and round,\n"
                    "communication share, bytes on the slow link, total time, loss gap to DDP and time to DDP's\n"
                    "loss; answers what bandwidth a compute utilisation needs, which H keeps communication under a\n"
                    "share, memory per worker and the learning rates the published laws suggest.\n"
                    "Models, sources and their ranges: docs/planner.md.",
        epilog="examples:\n"
               "  localsgd-plan --params 1B --tokens 20B --tokens-per-step 256k --step-time 0.5 --workers 8 \\\n"
               "      --clusters 2 --inter-gbit 1 --intra-gbit 400\n"
               "  localsgd-plan --params 350M --tokens 7B --tokens-per-step 64k --flops 4e14 --workers 16 \\\n"
               "      --clusters 4 --inter-gbit 10 --inter-latency-ms 20 --fragments 4 --overlap-steps 1\n"
               "  localsgd-plan ... --profile cpu-gloo    # the costs measured on this project's CPU machine\n"
               "Numbers take the suffixes k, M, B (or G) and T: 350M = 3.5e8.")
    job = ap.add_argument_group("the job")
    job.add_argument("--params", metavar="N", required=True, type=number(integer=True, si=True),
                     help="model parameters, e.g. 350M or 1.3B (required)")
    job.add_argument("--tokens", metavar="D", required=True, type=number(si=True),
                     help="planned training tokens, all workers together, e.g. 20B (required; at least one step of "
                          "all workers)")
    job.add_argument("--tokens-per-step", metavar="T", required=True, type=number(integer=True, si=True),
                     help="tokens in one inner step of one worker, i.e. its batch x sequence length, e.g. 256k "
                          "(required)")
    g = job.add_mutually_exclusive_group(required=True)
    g.add_argument("--step-time", metavar="S", type=number(unit=" s"),
                   help="seconds of one inner step of one worker, compute only (forward, backward, optimizer)")
    g.add_argument("--flops", metavar="F", type=number(si=True),
                   help="sustained FLOP/s of one worker; the step then takes 6 x params x tokens-per-step / flops")
    job.add_argument("--workers", metavar="W", required=True, type=number(integer=True, lo=1, lo_ok=True),
                     help="data-parallel workers available (required)")
    job.add_argument("--clusters", metavar="C", type=number(integer=True, lo=1, lo_ok=True), default=1,
                     help="clusters the workers are split into, equal sizes, consecutive workers (default 1)")
    job.add_argument("--straggler", metavar="SPEED", type=number(hi=1.0),
                     help="relative compute speed of one slow worker, in (0, 1] (e.g. 0.5: half speed; default none)")
    net = ap.add_argument_group("the links (rates in Mbit/s or Gbit/s, latency per message in ms)")
    gi = net.add_mutually_exclusive_group()
    gi.add_argument("--inter-mbit", metavar="MBIT", type=number(unit=" Mbit/s"),
                    help="link between clusters, per cluster (its workers share it); required with --clusters > 1. "
                         "With --clusters 1 it is taken as the link between the workers")
    gi.add_argument("--inter-gbit", metavar="GBIT", type=number(unit=" Gbit/s"), help="the same in Gbit/s")
    ga = net.add_mutually_exclusive_group()
    ga.add_argument("--intra-mbit", metavar="MBIT", type=number(unit=" Mbit/s"),
                    help="link between the workers of one cluster, per worker (default 100000 = 100 Gbit/s)")
    ga.add_argument("--intra-gbit", metavar="GBIT", type=number(unit=" Gbit/s"), help="the same in Gbit/s")
    net.add_argument("--inter-latency-ms", metavar="MS", type=number(lo_ok=True, unit=" ms"), default=0.0,
                     help="latency between clusters per message, ms (default 0)")
    net.add_argument("--intra-latency-ms", metavar="MS", type=number(lo_ok=True, unit=" ms"), default=0.0,
                     help="latency inside a cluster per message, ms (default 0)")
    net.add_argument("--link-efficiency", metavar="E", type=number(hi=1.0),
                     help="goodput over link rate, in (0, 1] (default: the profile's; 1 without a profile)")
    net.add_argument("--profile", metavar="FILE|NAME",
                     help="measured costs: a profile JSON (written by localsgd-bench collectives or linkcheck), a "
                          "collectives results JSON, or 'cpu-gloo' (this project's 2-core CPU machine over gloo, "
                          "shaped 100-1000 Mbit/s links). Default: none, an ideal link with no per-call or "
                          "per-element cost")
    cand = ap.add_argument_group("the candidates")
    cand.add_argument("--H", metavar="H[,H...]", type=number_list(integer=True, lo=1, lo_ok=True), default=list(DEFAULT_H),
                      help=f"inner steps per sync to try (default {','.join(map(str, DEFAULT_H))})")
    cand.add_argument("--formats", metavar="F[,F...]", type=format_list, default=list(DEFAULT_FORMATS),
                      help=f"DiLoCo wire formats to try, of {', '.join(FORMATS)} (default "
                           f"{','.join(DEFAULT_FORMATS)}; none = fp32; bf16 is modelled only, not a wire format of "
                           "the localsgd backend)")
    cand.add_argument("--ddp-dtype", choices=("bf16", "fp32"), default="bf16",
                      help="DDP's gradient all-reduce dtype, also hierarchical DiLoCo's DDP inside a cluster "
                           "(default bf16)")
    cand.add_argument("--ddp-overlap", metavar="FRACTION", type=number(lo_ok=True, hi=1.0),
                      help="fraction of a step's compute DDP's all-reduce hides, in [0, 1] (default: the backward, "
                           "2/3, less the last 25 MB bucket; 0 with one bucket)")
    cand.add_argument("--fragments", metavar="P", type=number(integer=True, lo=1, lo_ok=True), default=1,
                      help="streaming DiLoCo: the model synced in P fragments, one every H/P steps (default 1)")
    cand.add_argument("--overlap-steps", metavar="TAU", type=number(lo_ok=True, integer=True), default=0,
                      help="streaming DiLoCo's tau: inner steps a sync may run behind, at most H (default 0: "
                           "blocking; DiLoCo(overlap=True) is tau = H)")
    cand.add_argument("--block-size", metavar="B", type=number(integer=True, lo=1, lo_ok=True), default=DEFAULT_BLOCK_SIZE,
                      help=f"quantization block size (default {DEFAULT_BLOCK_SIZE}, the library's)")
    cand.add_argument("--error-feedback", action="store_true", help="DiLoCo keeps a residual (4 bytes per parameter)")
    cand.add_argument("--state-device", choices=("device", "cpu"), default="device",
                      help="where DiLoCo's fp32 anchor and momentum live (default device)")
    cand.add_argument("--device-memory-gib", metavar="GIB", type=number(unit=" GiB"),
                      help="memory per worker, GiB: warns when the training and DiLoCo state exceed it")
    ask = ap.add_argument_group("the choice and the answers")
    ask.add_argument("--max-gap", metavar="PCT", type=number(lo_ok=True, unit=" %"),
                     help="only candidates whose expected loss gap to DDP at equal tokens is at most this, %% "
                          "(default: no limit; the time to DDP's loss already charges the gap)")
    ask.add_argument("--critical-batch-tokens", metavar="T", type=number(si=True),
                     help="your measured critical batch, tokens per step (default: Zhang et al. 2024's law)")
    ask.add_argument("--utilization", metavar="PCT[,PCT...]", type=number_list(hi=100.0, hi_ok=False), default=[100 * u for u in UTILIZATION_LEVELS],
                     help="compute utilisations (%%) to give the needed bandwidth for (default 50,80,90,95,99)")
    ask.add_argument("--max-comm-share", metavar="PCT", type=number(hi=100.0, hi_ok=False, unit=" %"), default=10.0,
                     help="communication share (%%) to find the smallest H for (default 10)")
    ask.add_argument("--top", metavar="K", type=number(integer=True, lo=1, lo_ok=True), default=8,
                     help="candidates listed (default 8)")
    ask.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    return ap


def _flagged(msg: str) -> str:
    field, sep, rest = msg.partition(":")
    return f"{_FLAG_OF[field]}:{rest}" if sep and field in _FLAG_OF else msg


def _build(a, ap):
    if a.clusters > a.workers or a.workers % a.clusters:
        ap.error(f"--workers: expected a multiple of --clusters ({a.clusters}), got {a.workers}")
    inter = a.inter_mbit if a.inter_mbit is not None else (a.inter_gbit * 1000 if a.inter_gbit is not None else None)
    intra = a.intra_mbit if a.intra_mbit is not None else (a.intra_gbit * 1000 if a.intra_gbit is not None else None)
    inter_flag = "--inter-mbit" if a.inter_mbit is not None else "--inter-gbit"
    notes = []
    if a.clusters == 1 and inter is not None:
        if intra is not None:
            ap.error(f"{inter_flag}: with --clusters 1 there is no link between clusters, and the link between the "
                     "workers is already given (--intra-mbit/--intra-gbit): give one of them")
        intra, inter = inter, None
        notes.append(f"one cluster: {inter_flag} is taken as the link between its {a.workers} workers")
        if a.inter_latency_ms:
            a.intra_latency_ms, a.inter_latency_ms = a.inter_latency_ms, 0.0
    if a.clusters > 1 and inter is None:
        ap.error(f"--inter-mbit: expected the link between the {a.clusters} clusters (--inter-mbit or --inter-gbit)")
    if a.overlap_steps > max(a.H):
        ap.error(f"--overlap-steps: expected at most the largest --H ({max(a.H)}), got {a.overlap_steps}")
    try:
        profile = load_profile(a.profile) if a.profile else IDEAL
    except ValueError as e:
        ap.error(f"--profile: {e}")
    try:
        speeds = None if a.straggler is None else [1.0] * (a.workers - 1) + [a.straggler]
        job = Job(params=a.params, tokens=a.tokens, tokens_per_step=a.tokens_per_step, workers=a.workers,
                  clusters=a.clusters, step_time_s=a.step_time, flops=a.flops, speeds=speeds)
        net = Network(inter_mbit=inter, inter_latency_ms=a.inter_latency_ms,
                      intra_mbit=100_000.0 if intra is None else intra, intra_latency_ms=a.intra_latency_ms)
        opts = Options(profile=profile, efficiency=a.link_efficiency,
                       ddp_format="none" if a.ddp_dtype == "fp32" else "bf16", ddp_overlap=a.ddp_overlap,
                       block_size=a.block_size, critical_batch=a.critical_batch_tokens,
                       error_feedback=a.error_feedback, state_device=a.state_device,
                       device_memory_gib=a.device_memory_gib)
        plan = recommend(job, net, a.H, a.formats, a.max_gap, options=opts, fragments=a.fragments,
                         overlap_steps=float(a.overlap_steps), utilization=[u / 100 for u in a.utilization],
                         max_comm_share=a.max_comm_share / 100)
    except ValueError as e:
        ap.error(_flagged(str(e)))
    return job, net, opts, plan, notes


def _print(job, net, opts, plan, notes, top):
    eff = opts.profile.efficiency if opts.efficiency is None else opts.efficiency
    links = (f"{_rate(net.inter_mbit)} between clusters ({net.inter_latency_ms:g} ms), " if net.inter_mbit else "") + \
        f"{_rate(net.intra_mbit)} between a cluster's workers ({net.intra_latency_ms:g} ms)"
    print(f"model {job.params:.3g} params, {job.tokens:.3g} tokens, {job.workers} workers in {job.clusters} cluster(s), "
          f"{_fmt_s(job.compute_s)} compute per step at {job.tokens_per_step} tokens")
    prof = ("none (an ideal link: no per-call or per-element cost)" if opts.profile is IDEAL
            else f"{opts.profile.name}, measured on {opts.profile.measured_on}")
    print(f"links: {links}; efficiency {eff:g}; profile {prof}")
    for n in notes:
        print(f"note: {n}")
    b, d = plan.best, plan.ddp
    print()
    print(f"recommended: {b.candidate.label()}")
    for r in plan.reasons:
        print(f"  - {r}")
    lr = plan.learning_rates
    s = (f"  - learning rates: inner {lr['inner_lr']:.3g} ({lr['inner_source']})" if lr["inner_lr"] is not None
         else f"  - learning rates: {lr['inner_source']}")
    if "outer_lr" in lr:
        s += f"; outer {lr['outer_lr']:g} Nesterov, momentum 0.9 ({lr['outer_source']})"
    print(s)
    for w in plan.warnings:
        print(f"warning: {w}")
    print()
    print(f"{'candidate':<34} {'step':>9} {'comm':>5} {'slow-link MB/round':>18} {'total':>9} {'gap %':>8} "
          f"{'to DDP loss':>11} {'vs DDP':>7}  notes")
    shown = plan.candidates[:top]
    if d not in shown:
        shown.append(d)
    for p in shown:
        gap = ("<=" if p.gap_bound else "") + f"{p.gap_pct:+.2f}"
        tags = ([] if p.convergence_in_range else ["not ranked: extrapolated"]) + \
               (["batch > CBS"] if p.cbs_exceeded else []) + p.notes
        print(f"{p.candidate.label():<34} {_fmt_s(p.step_s):>9} {100 * p.comm_share:>4.0f}% "
              f"{p.slow_link_bytes_per_round / 1e6:>18.1f} {_fmt_s(p.total_s):>9} {gap:>8} "
              f"{_fmt_s(p.time_to_ddp_loss_s):>11} {p.speedup_vs_ddp:>6.2f}x  {'; '.join(tags)}")
    if plan.bandwidth:
        levels = list(plan.bandwidth[0]["mbit"])
        print()
        print("bandwidth for a compute utilisation (the candidate's slowest link, everything else as given):")
        print(f"{'candidate':<34} {'link':>6} " + " ".join(f"{lv + '%':>11}" for lv in levels))
        for row in plan.bandwidth:
            cells = [("unreachable" if v is None else _rate(v)) for v in row["mbit"].values()]
            print(f"{row['label']:<34} {row['link']:>6} " + " ".join(f"{c:>11}" for c in cells))
    if plan.comm_share["rows"]:
        print()
        print(f"smallest H keeping communication under {100 * plan.comm_share['share']:g}% (of "
              f"{', '.join(str(h) for h in (1, 2, 5, 10, 20, 30, 50, 100, 200, 300, 500, 1000, 2000, 5000))}):")
        for r in plan.comm_share["rows"]:
            what = (f"{'hier. ' if r['method'] == 'hierarchical' else ''}DiLoCo x{r['workers']} {r['format']}"
                    + (f" P={r['fragments']} tau={r['overlap_steps']:g}" if r["fragments"] > 1 else ""))
            if r["H"] is None:
                print(f"  {what:<40} none")
            else:
                gap = ("<=" if r["gap_bound"] else "") + f"{r['gap_pct']:+.2f}%"
                print(f"  {what:<40} H={r['H']:<5} comm {100 * r['comm_share']:.0f}%, gap {gap}"
                      + ("" if r["in_range"] else " (extrapolated)"))
    m = b.memory
    if b.candidate.method == "ddp":
        ref = next((p for p in plan.candidates if p.candidate.method != "ddp"), None)
        if ref is not None:
            m = ref.memory
            print()
            print(f"DiLoCo would add per worker: {_gb(m['diloco_device_bytes'])} on the device, {_gb(m['diloco_host_bytes'])} "
                  f"on the CPU, {_gb(m['sync_buffer_bytes'])} during a sync (training state {_gb(m['base_bytes'])})")


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    job, net, opts, plan, notes = _build(a, ap)
    if a.json:
        d = plan.as_dict()
        d["notes"] = notes
        d["profile"] = opts.profile.as_dict()
        print(json.dumps(d, indent=1))
        return 0
    _print(job, net, opts, plan, notes, a.top)
    return 0
