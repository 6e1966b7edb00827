"""The recommendation: every candidate predicted, the fastest to DDP's loss among those whose
convergence is inside the published numbers (or the project's study), and the answers around
it (bandwidth for a compute utilisation, H for a communication share, memory, learning rates),
each with its reason."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

from . import laws
from .comm import FORMATS
from .inputs import Candidate, Job, Network, Options, _integer, _number
from .model import (Prediction, bandwidth_for_utilization, critical_batch, h_for_comm_share, learning_rates,
                    predict, slow_link)

DEFAULT_H = (10, 30, 100, 300)
DEFAULT_FORMATS = ("none", "int8", "int4")
UTILIZATION_LEVELS = (0.5, 0.8, 0.9, 0.95, 0.99)
EXAMPLE_FRAGMENTS = 8  # the streaming row of the answers when the user gave no --fragments


@dataclasses.dataclass
class Plan:
    best: Prediction
    ddp: Prediction
    candidates: List[Prediction]
    critical_batch_tokens: float
    critical_batch_source: str
    critical_batch_in_range: bool
    reasons: List[str]
    warnings: List[str]
    bandwidth: List[dict]
    comm_share: dict
    learning_rates: Dict[str, object]

    def as_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("best", "ddp", "candidates")}
        d.update(best=self.best.as_dict(), ddp=self.ddp.as_dict(), candidates=[c.as_dict() for c in self.candidates])
        return d


def worker_counts(workers: int) -> List[int]:
    return sorted({w for w in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if w <= workers} | {workers})


def candidates(job: Job, Hs: Sequence[int], formats: Sequence[str], ddp_format: str, fragments: int = 1,
               overlap_steps: float = 0.0) -> List[Candidate]:
    out = [Candidate("ddp", w, format=ddp_format) for w in worker_counts(job.workers)]
    k = job.per_cluster
    for w in worker_counts(job.workers):
        if w < 2:
            continue
        for h in Hs:
            if overlap_steps > h:
                continue
            for f in formats:
                kw = dict(fragments=min(fragments, h), overlap_steps=overlap_steps)
                out.append(Candidate("diloco", w, h, f, **kw))
                if job.clusters > 1 and k > 1 and w % k == 0 and w // k >= 2:
                    out.append(Candidate("hierarchical", w, h, f, **kw))
    return out


def _fmt_s(s: float) -> str:
    if s < 1:
        return f"{1e3 * s:.1f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _gb(b: float) -> str:
    return f"{b / 2 ** 30:.1f} GiB" if b >= 2 ** 30 else f"{b / 2 ** 20:.1f} MiB"


def _rate(mbit: float) -> str:
    return f"{mbit / 1000:.3g} Gbit/s" if mbit >= 1000 else f"{mbit:.3g} Mbit/s"


def _reasons(job: Job, net: Network, b: Prediction, d: Prediction, cb, o: Options) -> List[str]:
    out = []
    which = slow_link(job, b.candidate)
    mbit = net.inter_mbit if which == "inter" else net.intra_mbit
    where = "between clusters" if which == "inter" else "between workers"
    if b is d:
        out.append(f"time: DDP over all {job.workers} workers reaches its loss in {_fmt_s(d.time_to_ddp_loss_s)}; "
                   "no ranked candidate is faster")
    else:
        out.append(f"time: {_fmt_s(b.time_to_ddp_loss_s)} to the loss DDP x{job.workers} reaches with the planned "
                   f"tokens, {b.speedup_vs_ddp:.2f}x its {_fmt_s(d.time_to_ddp_loss_s)}")
    out.append(f"communication: {100 * b.comm_share:.0f}% of the wall time ({_fmt_s(b.round_s - b.compute_utilization * b.round_s)} "
               f"per {'step' if b.candidate.method == 'ddp' else 'round of ' + str(b.candidate.H) + ' steps'}) on "
               f"{_rate(mbit)} {where}; DDP x{job.workers}: {100 * d.comm_share:.0f}%")
    if b.candidate.method == "ddp":
        out.append("convergence: DDP is the reference (no gap)")
    else:
        rel = "<=" if b.gap_bound else ""
        sd = f" +- {b.gap_sd_pct:.2f}" if b.gap_sd_pct else ""
        out.append(f"convergence: loss gap to DDP at equal tokens {rel}{b.gap_pct:+.2f}%{sd} ({b.gap_source}); DDP "
                   f"reaches that loss with {b.token_efficiency:.2f}x the tokens")
    tol = "" if not b.batch_ratio else f"; DiLoCo tolerates a {b.batch_ratio:.2g}x larger batch (Charles et al. Table 9)"
    out.append(f"batch: {b.global_batch_tokens} tokens per step against a critical batch of ~{cb.tokens:.3g} "
               f"({cb.source}{'' if cb.in_range else ', extrapolated'}): x{b.batch_factor:.2f} the tokens DDP "
               f"x{job.workers} needs at its batch{tol}")
    m = b.memory
    if b.candidate.method != "ddp":
        what = "fp32 anchor, momentum" + (", residual" if o.error_feedback else "")
        state = (f"{_gb(m['diloco_host_bytes'])} DiLoCo state ({what}) on the CPU, {_gb(m['diloco_device_bytes'])} "
                 "of it on the device at a time" if o.state_device == "cpu"
                 else f"{_gb(m['diloco_device_bytes'])} DiLoCo state ({what}) on the device")
        out.append(f"memory per worker: {_gb(m['base_bytes'])} training state + {state} + {_gb(m['sync_buffer_bytes'])} "
                   "during a sync; activations not included")
    else:
        out.append(f"memory per worker: {_gb(m['base_bytes'])} training state (activations not included)")
    return out


def _answers(job: Job, net: Network, plan_best: Prediction, ddp: Prediction, formats: Sequence[str], Hs,
             o: Options, levels: Sequence[float], share: float, fragments: int, overlap_steps: float):
    ref = plan_best.candidate if plan_best.candidate.method != "ddp" else None
    if ref is None and job.workers >= 2:
        ref = Candidate("diloco", job.workers, 30, formats[0] if formats else "int8", fragments=min(fragments, 30),
                        overlap_steps=overlap_steps)
    rows = [ddp.candidate]
    if ref is not None:
        rows += [dataclasses.replace(ref, H=h, fragments=min(ref.fragments, h)) for h in Hs if ref.overlap_steps <= h]
        if ref.fragments == 1 and ref.H >= EXAMPLE_FRAGMENTS:
            rows.append(dataclasses.replace(ref, fragments=EXAMPLE_FRAGMENTS, overlap_steps=1))
    bw = []
    for c in rows:
        if c.workers < 2:
            continue
        bw.append({"label": c.label(), "link": slow_link(job, c),
                   "mbit": {f"{100 * u:g}": bandwidth_for_utilization(job, net, c, u, o) for u in levels}})
    cs = []
    if ref is not None:
        for f in formats:
            for P, tau in ((1, 0.0), (max(fragments, EXAMPLE_FRAGMENTS) if fragments == 1 else fragments,
                                      overlap_steps or 1.0)):
                c = dataclasses.replace(ref, format=f, fragments=P, overlap_steps=tau)
                h = h_for_comm_share(job, net, c, share, o)
                row = {"method": c.method, "workers": c.workers, "format": f, "fragments": P, "overlap_steps": tau,
                       "H": h}
                if h:
                    p = predict(job, net, dataclasses.replace(c, H=h, fragments=min(P, h)), o)
                    row.update(gap_pct=p.gap_pct, gap_bound=p.gap_bound, in_range=p.convergence_in_range,
                               comm_share=p.comm_share)
                cs.append(row)
    return bw, {"share": share, "rows": cs}


def recommend(job: Job, net: Network, Hs: Sequence[int] = DEFAULT_H, formats: Sequence[str] = DEFAULT_FORMATS,
              max_gap_pct: Optional[float] = None, *, options: Optional[Options] = None, fragments: int = 1,
              overlap_steps: float = 0.0, utilization: Sequence[float] = UTILIZATION_LEVELS,
              max_comm_share: float = 0.1) -> Plan:
    """Predict every candidate and pick the one with the shortest time to DDP's loss (which
    already charges a lower token efficiency and a batch past the critical one) among those
    whose convergence is inside the published numbers; with ``max_gap_pct``, only among those
    whose expected gap (or its bound) is at most that."""
    o = options or Options()
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"formats: expected a non-empty subset of {FORMATS}, got {list(formats)}")
    if not Hs:
        raise ValueError("H: expected at least one value")
    for h in Hs:
        _integer("H", h)
    _integer("fragments", fragments)
    _number("overlap_steps", overlap_steps, lo_ok=True)
    if max_gap_pct is not None:
        _number("max_gap_pct", max_gap_pct, lo_ok=True)
    for u in utilization:
        _number("utilization", u, hi=1.0, hi_ok=False)
    _number("max_comm_share", max_comm_share, hi=1.0, hi_ok=False)
    if job.clusters > 1 and net.inter_mbit is None:
        raise ValueError(f"inter_mbit: expected the link between the {job.clusters} clusters")
    preds = [predict(job, net, c, o) for c in candidates(job, Hs, formats, o.ddp_format, fragments, overlap_steps)]
    ddp = next(p for p in preds if p.candidate == Candidate("ddp", job.workers, format=o.ddp_format))
    for p in preds:
        p.speedup_vs_ddp = ddp.time_to_ddp_loss_s / p.time_to_ddp_loss_s
    cb = critical_batch(job, o)
    warnings = []
    ranked = [p for p in preds if p.feasible and p.convergence_in_range]
    allowed = [p for p in ranked if max_gap_pct is None or p.gap_pct <= max_gap_pct]
    # DDP (gap 0, in range) is always there; on a tie, a gap that is a number before a bound, then fewer bytes
    best = min(allowed, key=lambda p: (p.time_to_ddp_loss_s, p.gap_bound, p.slow_link_bytes_per_round))
    faster_out = [p for p in preds if p.feasible and not p.convergence_in_range
                  and p.time_to_ddp_loss_s < best.time_to_ddp_loss_s]
    if faster_out:
        f = min(faster_out, key=lambda p: p.time_to_ddp_loss_s)
        warnings.append(f"{len(faster_out)} candidate(s) would be faster by extrapolated numbers (e.g. {f.candidate.label()}: "
                        f"{_fmt_s(f.time_to_ddp_loss_s)}), not ranked: {'; '.join(f.notes) or 'outside the laws'}")
    if max_gap_pct is not None:
        cut = [p for p in ranked if p.gap_pct > max_gap_pct and p.time_to_ddp_loss_s < best.time_to_ddp_loss_s]
        if cut:
            f = min(cut, key=lambda p: p.time_to_ddp_loss_s)
            warnings.append(f"--max-gap {max_gap_pct:g}%: {len(cut)} faster candidate(s) excluded (fastest: "
                            f"{f.candidate.label()}, gap {f.gap_pct:+.2f}%, {_fmt_s(f.time_to_ddp_loss_s)})"
                            + ("; only DDP meets it" if best.candidate.method == "ddp" else ""))
    if not cb.in_range:
        lo, hi = laws.CBS_TOKENS_RANGE
        warnings.append(f"critical batch ~{cb.tokens:.3g} tokens/step extrapolated from {cb.source} (its runs: "
                        f"{lo:.2g}-{hi:.2g} tokens; planned {job.tokens:.3g}); pass --critical-batch-tokens if you "
                        "measured yours")
    if ddp.cbs_exceeded:
        n_ok = max(1, int(cb.tokens // job.tokens_per_step))
        warnings.append(f"DDP's global batch of all {job.workers} workers ({ddp.global_batch_tokens} tokens/step) exceeds "
                        f"the critical batch (~{cb.tokens:.3g}): at most {n_ok} worker(s) of {job.tokens_per_step} "
                        "tokens stay under it; past it each worker buys less time and costs more tokens")
    pr = o.profile.link_mbit_range
    if pr:
        links = [x for x in (net.inter_mbit if job.clusters > 1 else None,
                             net.intra_mbit if job.per_cluster > 1 else None) if x is not None]
        off = [x for x in links if not (pr[0] / 2 <= x <= pr[1] * 2)]
        if off:
            warnings.append(f"profile {o.profile.name!r} was measured on {pr[0]:g}-{pr[1]:g} Mbit/s links "
                            f"({o.profile.measured_on}); applied here to {', '.join(_rate(x) for x in off)}")
    if o.device_memory_gib is not None:
        m = best.memory
        need = m["base_bytes"] + m["diloco_device_bytes"] + m["sync_buffer_bytes"]
        if need > o.device_memory_gib * 2 ** 30:
            warnings.append(f"{best.candidate.label()} needs {_gb(need)} per worker before activations, more than the "
                            f"{o.device_memory_gib:g} GiB given (--state-device cpu moves DiLoCo's state off the device)")
    bw, cs = _answers(job, net, best, ddp, formats, Hs, o, utilization, max_comm_share, fragments, overlap_steps)
    preds.sort(key=lambda p: (not (p.feasible and p.convergence_in_range), p.time_to_ddp_loss_s))
    return Plan(best=best, ddp=ddp, candidates=preds, critical_batch_tokens=cb.tokens, critical_batch_source=cb.source,
                critical_batch_in_range=cb.in_range, reasons=_reasons(job, net, best, ddp, cb, o), warnings=warnings,
                bandwidth=bw, comm_share=cs, learning_rates=learning_rates(job, best.candidate))

