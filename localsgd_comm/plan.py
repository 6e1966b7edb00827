"""Planner: workers, H and compression for a user's model, tokens and network (``localsgd-plan``).

Given the model's parameter count, the planned tokens, the workers and how they are grouped into
clusters, the compute time of one inner step and the links (bandwidth and latency inside and
between clusters), :func:`recommend` predicts for every candidate (DDP, flat or hierarchical
DiLoCo with H inner steps and a wire format) the wall time per step and per outer round, the
communication share, the bytes per worker on the slow link, the total time, the expected loss
gap to DDP at equal tokens and the time to DDP's loss (DDP over all workers reaching its loss
with the planned tokens is the target), and picks the fastest candidate whose expected gap is
acceptable. A global batch past the critical batch size needs more tokens for the same loss;
the plan charges for that and warns.

Two models, each fitted to this project's own measurements (the constants below; stored in
``plan_fit.json``; ``python benchmarks/fit_plan.py`` refits them from ``benchmarks/results`` and a
test checks they agree):

* **Communication.** One all-reduce of ``n`` elements costs
  ``a_fmt + k_fmt * n + bytes_out / (eta * rate) + phases * latency``, where ``bytes_out`` is what
  the busiest uplink carries: exact for the formats (payload + fp32 scales + the 64-byte call
  header) and the algorithm (gloo's ring for fp32 DDP: ``2 (p-1)/p`` of the tensor; ours: an
  all-to-all of chunks then an all-gather, ``2 k (p-k)/p`` of the compressed tensor out of a
  cluster of ``k`` workers). ``eta`` (TCP goodput over the shaped rate), ``a`` (fixed cost per
  call) and ``k`` (quantize/dequantize/copy cost per element) are least-squares fits to
  ``localsgd-bench collectives`` on shaped 1 Gbit/s and 100 Mbit/s links, 2 and 4 ranks,
  1-256 MB. Latency is not fitted: the shaped links have no delay emulation here; the term
  uses the algorithm's message rounds (``2 (p-1)``).
* **Convergence.** The loss gap of DiLoCo to DDP at equal tokens and compute, and its token
  efficiency (the fraction of DiLoCo's tokens DDP needs to reach DiLoCo's loss), as linear
  functions of ``log10 H``, ``log10 params``, the workers and the format, fitted to
  ``localsgd-bench scaling`` (byte-level GPTs of 0.09M-1.9M parameters, M = 2 and 4, H = 10 and
  50, 600 steps), with the residual standard deviation as the stated uncertainty; and a
  critical batch size that grows with the planned tokens as a power law, as Zhang et al. (2024,
  arXiv 2410.21676) find, its exponent fitted to the same study's two token budgets. Outside the
  fitted range (models of 0.09M-1.9M parameters, up to 1.2M tokens) these are extrapolations and
  the plan says so; pass ``critical_batch_tokens`` when you have measured your own.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Dict, List, Optional, Sequence

__all__ = ["Job", "Network", "Candidate", "Prediction", "Plan", "predict", "recommend", "allreduce_time",
           "slow_link_bytes", "critical_batch_tokens", "COMM_FIT", "CONVERGENCE_FIT", "fit_comm",
           "fit_convergence", "main"]

FORMATS = ("none", "int8", "int4", "fp8")
_HEADER_BYTES = 64

# ------------------------------------------------------------------------------------------
# fitted constants: plan_fit.json next to this file, written by ``python benchmarks/fit_plan.py``
# from benchmarks/results (a test checks that it is the fit of the committed results)
# ------------------------------------------------------------------------------------------
_FIT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plan_fit.json")
with open(_FIT_PATH) as _f:
    _FIT = json.load(_f)
COMM_FIT: Dict = _FIT["COMM_FIT"]
CONVERGENCE_FIT: Dict = _FIT["CONVERGENCE_FIT"]


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Network:
    """Links. ``inter_*``: between clusters (the slow one); ``intra_*``: inside a cluster. Every
    cluster (or every worker, with one worker per cluster) has an uplink of ``inter_mbit``."""
    inter_mbit: float
    inter_latency_ms: float = 0.0
    intra_mbit: float = 100_000.0
    intra_latency_ms: float = 0.0

    def __post_init__(self):
        for f in ("inter_mbit", "intra_mbit"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{f}: expected a bandwidth in Mbit/s > 0, got {v!r}")
        for f in ("inter_latency_ms", "intra_latency_ms"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ValueError(f"{f}: expected a latency in ms >= 0, got {v!r}")


@dataclasses.dataclass
class Job:
    """What is trained. ``step_time_s``: one inner step of one worker (forward, backward, optimizer)
    at ``tokens_per_step`` tokens; or give ``flops`` (sustained FLOP/s of a worker) and it is
    ``6 * params * tokens_per_step / flops``. ``workers``: the workers available, in ``clusters``
    clusters of equal size. ``speeds``: relative compute speed of each worker (1 = nominal; a
    synchronous method runs at its slowest)."""
    params: int
    tokens: float
    tokens_per_step: int
    workers: int
    clusters: int = 1
    step_time_s: Optional[float] = None
    flops: Optional[float] = None
    speeds: Optional[Sequence[float]] = None

    def __post_init__(self):
        for f in ("params", "tokens_per_step", "workers", "clusters"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f}: expected an integer >= 1, got {v!r}")
        if not (isinstance(self.tokens, (int, float)) and self.tokens > 0 and math.isfinite(self.tokens)):
            raise ValueError(f"tokens: expected a number > 0, got {self.tokens!r}")
        if self.workers % self.clusters:
            raise ValueError(f"workers ({self.workers}) must be a multiple of clusters ({self.clusters})")
        if (self.step_time_s is None) == (self.flops is None):
            raise ValueError("expected exactly one of step_time_s and flops, got "
                             f"{'both' if self.step_time_s is not None else 'neither'}")
        v = self.step_time_s if self.step_time_s is not None else self.flops
        name = "step_time_s" if self.step_time_s is not None else "flops"
        if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise ValueError(f"{name}: expected a number > 0, got {v!r}")
        if self.speeds is not None:
            if len(self.speeds) != self.workers or any(not (s > 0) for s in self.speeds):
                raise ValueError(f"speeds: expected {self.workers} relative speeds > 0, got {list(self.speeds)!r}")

    @property
    def compute_s(self) -> float:
        if self.step_time_s is not None:
            return float(self.step_time_s)
        return 6.0 * self.params * self.tokens_per_step / float(self.flops)

    def slowest_compute_s(self, workers: int) -> float:
        """Compute time of the slowest of the first ``workers`` workers."""
        if not self.speeds:
            return self.compute_s
        return self.compute_s / min(self.speeds[:workers])


@dataclasses.dataclass(frozen=True)
class Candidate:
    """``method``: "ddp" (gradients every step: fp32 over gloo's ring, or with a quantizing
    ``format`` over the localsgd backend), "diloco" (flat) or "hierarchical" (DDP inside each
    cluster, DiLoCo between clusters)."""
    method: str
    workers: int
    H: int = 1
    format: str = "none"

    def label(self) -> str:
        if self.method == "ddp":
            return f"DDP x{self.workers}" + ("" if self.format == "none" else f" ({self.format} every step)")
        return f"{'hier. ' if self.method == 'hierarchical' else ''}DiLoCo x{self.workers} H={self.H} {self.format}"


@dataclasses.dataclass
class Prediction:
    candidate: Candidate
    step_s: float              # mean wall time per inner step (a round divided by H)
    round_s: float             # one outer round (H steps and the sync); DDP: one step
    comm_share: float          # fraction of the wall time spent communicating
    slow_link_bytes_per_round: float  # out of the busiest uplink between clusters, per round
    total_s: float             # the planned tokens
    global_batch_tokens: int
    gap_pct: float             # expected final-loss gap to DDP at equal tokens (0 for DDP)
    gap_sd_pct: Optional[float]
    token_efficiency: float    # DDP reaches this method's loss with this fraction of its tokens
    time_to_ddp_loss_s: float  # time to the loss DDP reaches with the planned tokens
    speedup_vs_ddp: Optional[float] = None
    cbs_exceeded: bool = False
    notes: List[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["candidate"] = dataclasses.asdict(self.candidate)
        d["label"] = self.candidate.label()
        return d


@dataclasses.dataclass
class Plan:
    best: Prediction
    ddp: Prediction
    candidates: List[Prediction]
    critical_batch_tokens: Optional[float]
    warnings: List[str]

    def as_dict(self) -> dict:
        return {"best": self.best.as_dict(), "ddp": self.ddp.as_dict(),
                "critical_batch_tokens": self.critical_batch_tokens, "warnings": self.warnings,
                "candidates": [c.as_dict() for c in self.candidates]}


# ------------------------------------------------------------------------------------------
# communication
# ------------------------------------------------------------------------------------------
def wire_bytes(fmt: str, numel: int, block_size: int = 256) -> int:
    """Bytes of one encoded tensor (payload + fp32 scales), as ``functional.compressed_nbytes``."""
    if fmt == "none":
        return 4 * numel
    blocks = -(-numel // block_size)
    payload = numel if fmt in ("int8", "fp8") else -(-numel // 2)
    return payload + 4 * blocks


def slow_link_bytes(algorithm: str, tensor_bytes: float, world: int, cluster_size: int) -> float:
    """Bytes out of one cluster's uplink for one all-reduce of ``tensor_bytes`` over ``world``
    ranks in clusters of ``cluster_size`` consecutive ranks. ``"ring"``: gloo's ring (one ring
    edge leaves each cluster, carrying ``2 (p-1)/p`` of the tensor); ``"a2a"``: ours (all-to-all
    of chunks, then all-gather of the reduced chunks: ``2 k (p-k)/p``)."""
    p, k = world, cluster_size
    if p <= k:
        return 0.0
    if algorithm == "ring":
        return 2.0 * (p - 1) / p * tensor_bytes
    if algorithm == "a2a":
        return 2.0 * k * (p - k) / p * tensor_bytes
    raise ValueError(f"algorithm: expected 'ring' or 'a2a', got {algorithm!r}")


def allreduce_time(fmt: str, numel: int, world: int, mbit: float, latency_ms: float = 0.0,
                   cluster_size: int = 1, backend: Optional[str] = None, fit: Optional[dict] = None) -> float:
    """Predicted seconds of one all-reduce of ``numel`` fp32 elements. ``backend``: "gloo" (fp32
    ring; the default for ``fmt="none"`` in DDP) or "localsgd" (ours, any format)."""
    if world <= 1:
        return 0.0
    fit = fit or COMM_FIT
    key = "gloo" if backend == "gloo" else fmt
    if backend == "gloo" and fmt != "none":
        raise ValueError(f"backend 'gloo' moves fp32 only, got format {fmt!r}")
    if key not in fit["fixed_s"]:
        key = "int8"  # fp8 has int8's layout and cost
    algo = "ring" if backend == "gloo" else "a2a"
    size = wire_bytes(fmt, numel) + (0 if backend == "gloo" else _HEADER_BYTES * world)
    out = slow_link_bytes(algo, size, world, cluster_size)
    rate = mbit * 1e6 / 8.0
    rounds = 2 * (world - 1)
    return fit["fixed_s"][key] + fit["per_element_s"][key] * numel + out / (fit["eta"] * rate) + \
        rounds * latency_ms / 1e3


# ------------------------------------------------------------------------------------------
# convergence
# ------------------------------------------------------------------------------------------
def _linear(model: dict, H: int, params: int, workers: int, fmt: str) -> float:
    f = model["format"].get(fmt, model["format"].get("int8", 0.0))
    return (model["intercept"] + model["log10_H"] * math.log10(H) + model["log10_params"] * math.log10(params)
            + model["workers"] * workers + f)


def critical_batch_tokens(tokens: float, params: Optional[int] = None, fit: Optional[dict] = None) -> Optional[float]:
    """Estimated critical global batch (tokens per step) after ``tokens`` tokens of training, or
    None where the study says nothing: more than 10x past its largest token budget, or a model
    more than 10x outside its parameter range (then pass your own, ``critical_batch=``)."""
    f = fit or CONVERGENCE_FIT
    c = f["cbs"]
    if not c.get("points"):
        return None
    lo, hi = f["fitted_params_range"]
    if tokens > 10 * f["fitted_tokens_max"] or (params is not None and not (lo / 10 <= params <= 10 * hi)):
        return None
    return c["ref_batch_tokens"] * (tokens / c["ref_tokens"]) ** c["exponent"]


def _convergence(c: Candidate, params: int, fit: dict):
    if c.method == "ddp" or c.workers == 1:
        return 0.0, 0.0, 1.0
    # Not extrapolated along params or H: the study's trends (the gap grows with model size at
    # 600 steps) need not hold outside it, and the published ones at scale go the other way.
    # Outside the fitted range the value at its nearest edge is used (and the plan says so).
    lo, hi = fit["fitted_params_range"]
    params = min(max(params, lo), hi) if hi else params
    h_lo, h_hi = fit["fitted_H"]
    c = dataclasses.replace(c, H=min(max(c.H, h_lo), h_hi)) if h_hi else c
    # hierarchical: the local-SGD replicas are the clusters (DDP inside keeps a cluster one model)
    gap = max(0.0, _linear(fit["gap_pct"], c.H, params, c.workers, c.format))
    eff = min(1.0, math.exp(_linear(fit["log_efficiency"], c.H, params, c.workers, c.format)))
    return gap, fit["gap_pct"]["residual_sd"], eff


# ------------------------------------------------------------------------------------------
# prediction
# ------------------------------------------------------------------------------------------
def batch_token_factor(batch_tokens: float, ref_batch_tokens: float, critical: float) -> float:
    """Tokens a global batch of ``batch_tokens`` needs to reach a loss, relative to a batch of
    ``ref_batch_tokens``: ``(1 + B / B_crit) / (1 + B_ref / B_crit)``, the data-efficiency form of
    McCandlish et al. (2018), with the critical batch size estimate standing in for their noise
    scale (an assumption of this planner, stated in the plan)."""
    return (1 + batch_tokens / critical) / (1 + ref_batch_tokens / critical)


def predict(job: Job, net: Network, cand: Candidate, fit: Optional[dict] = None,
            conv: Optional[dict] = None, ddp_overlap: float = 0.0,
            critical_batch: Optional[float] = None) -> Prediction:
    """Predict one candidate. ``ddp_overlap``: the fraction of the compute that DDP's bucketed
    all-reduce hides (0 for one bucket, as in the validation runs; up to ~2/3, the backward).
    ``critical_batch``: tokens per step (default: the fitted estimate at the planned tokens).
    The time to DDP's loss is relative to DDP over all ``job.workers``: the planned tokens,
    scaled by :func:`batch_token_factor` for this candidate's global batch and divided by its
    token efficiency, at this candidate's throughput."""
    conv = conv or CONVERGENCE_FIT
    cbs = critical_batch if critical_batch is not None else critical_batch_tokens(job.tokens, job.params, conv)
    if cand.method not in ("ddp", "diloco", "hierarchical"):
        raise ValueError(f"method: expected 'ddp', 'diloco' or 'hierarchical', got {cand.method!r}")
    if cand.format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {cand.format!r}")
    if not (1 <= cand.workers <= job.workers):
        raise ValueError(f"workers: expected 1..{job.workers}, got {cand.workers}")
    if cand.H < 1:
        raise ValueError(f"H: expected >= 1, got {cand.H}")
    per_cluster = job.workers // job.clusters
    k = min(per_cluster, cand.workers)  # workers are filled cluster by cluster
    n = job.params
    compute = job.slowest_compute_s(cand.workers)
    notes = []
    intra = lambda fmt, world: allreduce_time(fmt, n, world, net.intra_mbit, net.intra_latency_ms, 1,  # noqa: E731
                                              "gloo", fit)
    if cand.method == "ddp":
        # fp32: torch DDP over gloo (ring); a quantizing format: DDP over the localsgd backend
        be, algo = ("gloo", "ring") if cand.format == "none" else ("localsgd", "a2a")
        if k == cand.workers:  # one cluster: the all-reduce stays on the fast link
            comm = allreduce_time(cand.format, n, cand.workers, net.intra_mbit, net.intra_latency_ms, 1, be, fit)
        else:
            comm = allreduce_time(cand.format, n, cand.workers, net.inter_mbit, net.inter_latency_ms, k, be, fit)
        hidden = min(comm, ddp_overlap * compute)
        round_s = compute + comm - hidden
        step_s, H = round_s, 1
        slow = slow_link_bytes(algo, wire_bytes(cand.format, n), cand.workers, k) if k < cand.workers else 0.0
        comm_s = comm - hidden
    elif cand.method == "diloco":
        H = cand.H
        fast = k == cand.workers
        comm = allreduce_time(cand.format, n, cand.workers, net.intra_mbit if fast else net.inter_mbit,
                              net.intra_latency_ms if fast else net.inter_latency_ms, 1 if fast else k,
                              "localsgd", fit)
        round_s = H * compute + comm
        comm_s = comm
        step_s = round_s / H
        slow = 0.0 if fast else slow_link_bytes("a2a", wire_bytes(cand.format, n), cand.workers, k)
    else:
        H = cand.H
        if cand.workers % per_cluster or cand.workers // per_cluster < 2:
            raise ValueError(f"hierarchical: expected whole clusters of {per_cluster} (>= 2 clusters), got "
                             f"{cand.workers} workers")
        nc = cand.workers // per_cluster
        inner = intra("none", per_cluster)  # fp32 gradients inside a cluster, every step
        # member j of every cluster syncs shard j; the shards share the cluster's uplink
        shard = -(-n // per_cluster)
        cross = allreduce_time(cand.format, shard, nc, net.inter_mbit / per_cluster, net.inter_latency_ms, 1,
                               "localsgd", fit)
        gather = intra("none", per_cluster) / 2  # the anchor all-gather inside the cluster: half a ring
        round_s = H * (compute + inner) + cross + gather
        comm_s = H * inner + cross + gather
        step_s = round_s / H
        slow = per_cluster * slow_link_bytes("a2a", wire_bytes(cand.format, shard), nc, 1)
    steps = job.tokens / (job.tokens_per_step * cand.workers)
    total = steps * step_s
    replicas = cand.workers if cand.method == "diloco" else (cand.workers // per_cluster
                                                             if cand.method == "hierarchical" else 1)
    gap, sd, eff = _convergence(dataclasses.replace(cand, workers=replicas) if cand.method == "hierarchical"
                                else cand, n, conv)
    if cand.method != "ddp" and replicas > 1:
        lo, hi = conv["fitted_params_range"]
        if not (lo <= n <= hi) or not (conv["fitted_H"][0] <= cand.H <= conv["fitted_H"][1]) or \
                job.tokens > conv["fitted_tokens_max"]:
            notes.append("convergence extrapolated beyond the fitted study")
    batch = job.tokens_per_step * cand.workers
    factor = 1.0 if cbs is None else batch_token_factor(batch, job.tokens_per_step * job.workers, cbs)
    return Prediction(candidate=cand, step_s=step_s, round_s=round_s, comm_share=comm_s / round_s,
                      slow_link_bytes_per_round=slow, total_s=total, global_batch_tokens=batch, gap_pct=gap,
                      gap_sd_pct=sd, token_efficiency=eff, time_to_ddp_loss_s=total * factor / eff,
                      cbs_exceeded=cbs is not None and batch > cbs, notes=notes)


def _candidates(job: Job, Hs: Sequence[int], formats: Sequence[str]) -> List[Candidate]:
    counts = sorted({w for w in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024] if w <= job.workers} | {job.workers})
    out = [Candidate("ddp", w) for w in counts]
    per_cluster = job.workers // job.clusters
    for w in counts:
        if w < 2:
            continue
        for h in Hs:
            for f in formats:
                out.append(Candidate("diloco", w, h, f))
                if job.clusters > 1 and per_cluster > 1 and w % per_cluster == 0 and w // per_cluster >= 2:
                    out.append(Candidate("hierarchical", w, h, f))
    return out


def recommend(job: Job, net: Network, Hs: Sequence[int] = (10, 20, 50, 100), formats: Sequence[str] = ("none", "int8", "int4"),
              max_gap_pct: Optional[float] = None, critical_batch: Optional[float] = None,
              ddp_overlap: float = 0.0) -> Plan:
    """Predict every candidate and pick the one with the shortest time to DDP's loss (which
    already charges a candidate's lower token efficiency), optionally only among those whose
    expected gap at equal tokens is at most ``max_gap_pct``. ``critical_batch``: tokens per step (default
    the fitted estimate for the planned tokens); a batch past it is charged more tokens
    (:func:`batch_token_factor`) and flagged."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"formats: expected a subset of {FORMATS}, got {bad}")
    if any((not isinstance(h, int)) or h < 1 for h in Hs):
        raise ValueError(f"H: expected integers >= 1, got {list(Hs)}")
    cbs = critical_batch if critical_batch is not None else critical_batch_tokens(job.tokens, job.params)
    preds = [predict(job, net, c, ddp_overlap=ddp_overlap, critical_batch=cbs) for c in _candidates(job, Hs, formats)]
    ddp_all = job.workers
    ddp = next(p for p in preds if p.candidate == Candidate("ddp", ddp_all))
    warnings = []
    if cbs is None:
        warnings.append("no critical-batch-size estimate at this scale (the study measured it for models of "
                        f"{CONVERGENCE_FIT['fitted_params_range'][0]}-{CONVERGENCE_FIT['fitted_params_range'][1]} "
                        f"parameters on up to {CONVERGENCE_FIT['fitted_tokens_max']:.3g} tokens): larger global "
                        "batches are not charged; pass critical_batch / --critical-batch-tokens if you know yours")
    for p in preds:
        p.speedup_vs_ddp = ddp.time_to_ddp_loss_s / p.time_to_ddp_loss_s
    if ddp.cbs_exceeded:
        n_ok = max(1, int(cbs // job.tokens_per_step))
        warnings.append(f"the global batch of all {job.workers} workers ({ddp.global_batch_tokens} tokens/step) exceeds "
                        f"the critical batch size estimated for {job.tokens:.3g} tokens (~{cbs:.3g} tokens/step; at "
                        f"most {n_ok} worker{'s' if n_ok > 1 else ''} at {job.tokens_per_step} tokens each stay under "
                        "it): past it each extra worker buys less time and costs more tokens for the same loss; "
                        "fewer workers (or a smaller batch per worker) use the compute better")
    ok = [p for p in preds if max_gap_pct is None or p.gap_pct <= max_gap_pct] or preds
    best = min(ok, key=lambda p: p.time_to_ddp_loss_s)
    if any("extrapolated" in n for n in best.notes):
        warnings.append("the convergence model is extrapolated here (fitted on models of "
                        f"{CONVERGENCE_FIT['fitted_params_range'][0]}-{CONVERGENCE_FIT['fitted_params_range'][1]} "
                        f"parameters, H {CONVERGENCE_FIT['fitted_H'][0]}-{CONVERGENCE_FIT['fitted_H'][1]}, up to "
                        f"{CONVERGENCE_FIT['fitted_tokens_max']:.3g} tokens): treat the gap as a direction")
    preds.sort(key=lambda p: p.time_to_ddp_loss_s)
    return Plan(best=best, ddp=ddp, candidates=preds, critical_batch_tokens=cbs, warnings=warnings)


# ------------------------------------------------------------------------------------------
# fitting (from the committed results)
# ------------------------------------------------------------------------------------------
def _lstsq(rows: List[List[float]], ys: List[float]) -> List[float]:
    import torch
    A = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)[:, None]
    return torch.linalg.lstsq(A, y, driver="gelsd").solution[:, 0].tolist()


def fit_comm(collectives: dict) -> dict:
    """Fit ``eta``, then per format the fixed and per-element cost, on the shaped-link points."""
    pts = [r for r in collectives["results"] if r.get("rate_mbit")]
    eta = sum(c["fraction_of_rate"] for c in collectives.get("link_checks", [])) / max(1, len(collectives.get("link_checks", [])))
    fixed, per_el, errs = {}, {}, []
    key_of = {"gloo-fp32": "gloo", "localsgd-none": "none", "localsgd-int8": "int8", "localsgd-int4": "int4"}
    for method, key in key_of.items():
        rows, ys = [], []
        for r in pts:
            if r["method"] != method:
                continue
            fmt = "none" if key == "gloo" else key
            size = wire_bytes(fmt, r["numel"]) + (0 if key == "gloo" else _HEADER_BYTES * r["world"])
            out = slow_link_bytes("ring" if key == "gloo" else "a2a", size, r["world"], 1)
            t_wire = out / (eta * r["rate_mbit"] * 1e6 / 8)
            # relative least squares (each row divided by the measured time): small and large
            # all-reduces count alike
            w = 1.0 / r["time_s_median"]
            rows.append([w, w * float(r["numel"])])
            ys.append(w * (r["time_s_median"] - t_wire))
        a, k = _lstsq(rows, ys)
        fixed[key], per_el[key] = max(0.0, a), max(0.0, k)
    for r in pts:
        fmt = key_of[r["method"]]
        pred = allreduce_time("none" if fmt == "gloo" else fmt, r["numel"], r["world"], r["rate_mbit"],
                              backend="gloo" if fmt == "gloo" else "localsgd",
                              fit={"eta": eta, "fixed_s": fixed, "per_element_s": per_el})
        errs.append(abs(pred / r["time_s_median"] - 1))
    errs.sort()
    return {"source": "benchmarks/results/collectives.json", "eta": round(eta, 4),
            "fixed_s": {k: float(f"{v:.4g}") for k, v in fixed.items()},
            "per_element_s": {k: float(f"{v:.4g}") for k, v in per_el.items()},
            "rel_error_median": round(errs[len(errs) // 2], 4), "rel_error_max": round(errs[-1], 4),
            "points": len(errs)}


def _interp_tokens_for_loss(curve: List[dict], loss: float) -> Optional[float]:
    """Tokens at which a (decreasing) loss curve reaches ``loss``, linear in log tokens; None if
    the curve never gets that low (the ratio is then capped at 1 by the caller)."""
    pts = [(c["tokens"], c["val_loss"]) for c in curve]
    if loss >= pts[0][1]:
        return float(pts[0][0])
    for (t0, l0), (t1, l1) in zip(pts, pts[1:]):
        if l0 >= loss >= l1 and l0 != l1:
            f = (l0 - loss) / (l0 - l1)
            return math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0)))
    return None


def fit_convergence(scaling: dict) -> dict:
    runs = {r["name"]: r for r in scaling["runs"]}
    fmts = ["none", "int8", "int4"]
    rows, gaps, effs = [], [], []
    Hs, Ns, Ms = [], [], []
    for g in scaling["gaps"]:
        ddp = runs.get(f"{g['size']}-ddp-M{g['workers']}-s0")
        dil = next(r for r in scaling["runs"] if r["spec"]["kind"] == "diloco" and r["spec"]["size"] == g["size"]
                   and r["spec"]["workers"] == g["workers"] and r["spec"]["sync_every"] == g["H"]
                   and r["spec"]["format"] == g["format"])
        t = _interp_tokens_for_loss(ddp["val_curve"], g["diloco_loss"])
        eff = 1.0 if t is None else min(1.0, t / dil["tokens"])
        rows.append([1.0, math.log10(g["H"]), math.log10(g["n_params"]), float(g["workers"])] +
                    [1.0 if g["format"] == f else 0.0 for f in fmts[1:]])
        gaps.append(g["gap_pct"])
        effs.append(math.log(max(eff, 1e-3)))
        Hs.append(g["H"]), Ns.append(g["n_params"]), Ms.append(g["workers"])

    def model(ys):
        c = _lstsq(rows, ys)
        res = [y - sum(a * b for a, b in zip(c, r)) for r, y in zip(rows, ys)]
        sd = math.sqrt(sum(e * e for e in res) / max(1, len(ys) - len(c)))
        return {"intercept": round(c[0], 5), "log10_H": round(c[1], 5), "log10_params": round(c[2], 5),
                "workers": round(c[3], 5), "format": {"none": 0.0, "int8": round(c[4], 5), "int4": round(c[5], 5)},
                "residual_sd": round(sd, 5), "points": len(ys)}
    cb = [c for c in scaling["cbs"] if c["critical_batch_tokens"]]
    if len(cb) >= 2:
        (d0, b0), (d1, b1) = (cb[0]["tokens"], cb[0]["critical_batch_tokens"]), (cb[-1]["tokens"],
                                                                                cb[-1]["critical_batch_tokens"])
        expo = math.log(b1 / b0) / math.log(d1 / d0)
        # the paper finds growth with data; a fit that shrinks (noise at one grid step) is not
        # extrapolated as shrinking: the exponent used is clipped at 0, the fitted one kept
        cbs = {"ref_tokens": d1, "ref_batch_tokens": round(b1, 1), "exponent": round(max(0.0, expo), 3),
               "fitted_exponent": round(expo, 3), "points": len(cb)}
    elif cb:
        cbs = {"ref_tokens": cb[0]["tokens"], "ref_batch_tokens": round(cb[0]["critical_batch_tokens"], 1),
               "exponent": 0.5, "points": 1}
    else:
        cbs = {"ref_tokens": 1.0, "ref_batch_tokens": 1.0, "exponent": 0.5, "points": 0}
    return {"source": "benchmarks/results/scaling.json", "gap_pct": model(gaps), "log_efficiency": model(effs),
            "cbs": cbs, "fitted_params_range": [min(Ns), max(Ns)],
            "fitted_tokens_max": max(r["tokens"] for r in scaling["runs"]), "fitted_H": [min(Hs), max(Hs)],
            "fitted_workers": [min(Ms), max(Ms)]}


def fit_from_results(results_dir: str) -> dict:
    with open(f"{results_dir}/collectives.json") as f:
        comm = fit_comm(json.load(f))
    with open(f"{results_dir}/scaling.json") as f:
        conv = fit_convergence(json.load(f))
    return {"COMM_FIT": comm, "CONVERGENCE_FIT": conv}


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def _si(v: str) -> float:
    """1e9, 2.5B, 300M, 64k -> a number."""
    mult = {"k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    s = v.strip()
    try:
        if s and s[-1] in mult:
            return float(s[:-1]) * mult[s[-1]]
        return float(s)
    except ValueError:
        raise ValueError(f"expected a number such as 1e9, 350M or 2.5B, got {v!r}") from None


def _fmt_s(s: float) -> str:
    if s < 1:
        return f"{1e3 * s:.1f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(
        prog="localsgd-plan",
        description="Recommend workers, H and wire format for DiLoCo (against DDP) from your model, tokens, compute "
                    "and network, and predict time per round, communication share, total time and the speedup "
                    "over DDP.",
        epilog="example: localsgd-plan --params 350M --tokens 7B --tokens-per-step 64k --step-time 0.9 "
               "--workers 16 --clusters 2 --inter-mbit 1000 --inter-latency-ms 20 --intra-mbit 100000")
    ap.add_argument("--params", required=True, help="model parameters (e.g. 350M)")
    ap.add_argument("--tokens", required=True, help="planned training tokens in total (e.g. 7B)")
    ap.add_argument("--tokens-per-step", required=True, help="tokens in one inner step of one worker (its batch)")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--step-time", type=float, help="seconds of one inner step of one worker (compute only)")
    g.add_argument("--flops", help="sustained FLOP/s of one worker (step time = 6 x params x tokens-per-step / flops)")
    ap.add_argument("--workers", type=int, required=True, help="workers available (data-parallel replicas)")
    ap.add_argument("--clusters", type=int, default=1, help="clusters the workers are split into (default 1)")
    ap.add_argument("--inter-mbit", type=float, required=True,
                    help="bandwidth of each cluster's uplink (each worker's, with one per cluster), Mbit/s")
    ap.add_argument("--inter-latency-ms", type=float, default=0.0)
    ap.add_argument("--intra-mbit", type=float, default=100_000.0, help="bandwidth inside a cluster (default 100 Gbit/s)")
    ap.add_argument("--intra-latency-ms", type=float, default=0.0)
    ap.add_argument("--straggler", type=float, default=None,
                    help="relative speed of one slow worker (e.g. 0.5: half the compute speed)")
    ap.add_argument("--H", default="10,20,50,100", help="candidate inner steps per sync (default 10,20,50,100)")
    ap.add_argument("--formats", default="none,int8,int4", help="candidate wire formats (default none,int8,int4)")
    ap.add_argument("--max-gap", type=float, default=None,
                    help="only candidates whose expected loss gap to DDP at equal tokens is at most this, %% "
                         "(default: no limit; the time to DDP's loss already charges the gap)")
    ap.add_argument("--critical-batch-tokens", default=None,
                    help="your measured critical batch size in tokens per step (default: the fitted estimate)")
    ap.add_argument("--ddp-overlap", type=float, default=0.0,
                    help="fraction of compute DDP's bucketed all-reduce hides (0: one bucket; up to ~0.67)")
    ap.add_argument("--top", type=int, default=8, help="candidates listed (default 8)")
    ap.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    a = ap.parse_args(argv)
    try:
        workers = a.workers
        speeds = None
        if a.straggler is not None:
            if not (0 < a.straggler <= 1):
                raise ValueError(f"--straggler: expected a relative speed in (0, 1], got {a.straggler}")
            speeds = [1.0] * (workers - 1) + [a.straggler]
        job = Job(params=int(_si(a.params)), tokens=_si(a.tokens), tokens_per_step=int(_si(a.tokens_per_step)),
                  workers=workers, clusters=a.clusters, step_time_s=a.step_time,
                  flops=_si(a.flops) if a.flops else None, speeds=speeds)
        net = Network(a.inter_mbit, a.inter_latency_ms, a.intra_mbit, a.intra_latency_ms)
        Hs = [int(h) for h in a.H.split(",")]
        plan = recommend(job, net, Hs, a.formats.split(","), a.max_gap,
                         _si(a.critical_batch_tokens) if a.critical_batch_tokens else None, a.ddp_overlap)
    except ValueError as e:
        ap.error(str(e))
    if a.json:
        print(json.dumps(plan.as_dict(), indent=1))
        return 0
    b, d = plan.best, plan.ddp
    print(f"model {job.params:.3g} params, {job.tokens:.3g} tokens, {job.workers} workers in {job.clusters} "
          f"cluster(s), {_fmt_s(job.compute_s)} compute per step at {job.tokens_per_step} tokens")
    if plan.critical_batch_tokens is not None:
        print(f"critical batch size estimate at {job.tokens:.3g} tokens: ~{plan.critical_batch_tokens:.3g} tokens/step")
    print()
    print(f"recommended: {b.candidate.label()}")
    print(f"  per outer round {_fmt_s(b.round_s)} (communication {100 * b.comm_share:.0f}%), total {_fmt_s(b.total_s)}, "
          f"expected loss gap to DDP {b.gap_pct:.2f}%" + (f" (+- {b.gap_sd_pct:.2f})" if b.gap_sd_pct else "") +
          f", time to DDP's loss {_fmt_s(b.time_to_ddp_loss_s)}, {b.speedup_vs_ddp:.2f}x DDP")
    print(f"  DDP x{d.candidate.workers}: per step {_fmt_s(d.step_s)} (communication {100 * d.comm_share:.0f}%), "
          f"total {_fmt_s(d.total_s)}")
    for w in plan.warnings:
        print(f"warning: {w}")
    print()
    hdr = f"{'candidate':<30} {'step':>9} {'comm':>5} {'slow-link MB/round':>19} {'total':>9} {'gap %':>6} {'to DDP loss':>11} {'vs DDP':>7}  notes"
    print(hdr)
    for p in plan.candidates[:a.top]:
        notes = (["batch > CBS"] if p.cbs_exceeded else []) + p.notes
        print(f"{p.candidate.label():<30} {_fmt_s(p.step_s):>9} {100 * p.comm_share:>4.0f}% "
              f"{p.slow_link_bytes_per_round / 1e6:>19.2f} {_fmt_s(p.total_s):>9} {p.gap_pct:>6.2f} "
              f"{_fmt_s(p.time_to_ddp_loss_s):>11} {p.speedup_vs_ddp:>6.2f}x  {'; '.join(notes)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
