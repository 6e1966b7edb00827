"""Predictions: the wall time of every candidate (from :mod:`.comm`), its convergence against
DDP (from :mod:`.laws`, or this project's study for its small models) and what a lab asks next
(the bandwidth for a compute utilisation, the H that keeps communication under a share, memory,
learning rates)."""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional

from . import laws, project
from .comm import DDP_BUCKET_BYTES, HEADER_BYTES, allreduce_time, slow_link_bytes, wire_bytes
from .inputs import Candidate, Job, Network, Options

BACKWARD_SHARE = 2.0 / 3.0  # the backward pass is two thirds of a step's FLOPs (6 N per token: 2 + 4)
BASE_STATE_BYTES = 16  # per parameter: fp32 params, grads, Adam m and v (bf16 params + grads + fp32 master, m, v: also 16)


@dataclasses.dataclass
class Prediction:
    candidate: Candidate
    step_s: float                 # mean wall time per inner step (a round divided by H)
    round_s: float                # one outer round (H steps and its syncs); DDP: one step
    comm_share: float             # fraction of the wall time not computing
    compute_utilization: float    # compute time / wall time (1 - comm_share)
    slow_link_bytes_per_round: float  # out of one cluster's uplink per round (0 inside one cluster)
    peak_slow_link_bytes: float   # the largest single sync on that uplink (a fragment with P > 1)
    total_s: float                # the planned tokens at this candidate's worker count
    global_batch_tokens: int
    replicas: int                 # DiLoCo's M (workers, or clusters when hierarchical); DDP: 1
    gap_pct: float                # expected final-loss gap to DDP at equal tokens (0 for DDP)
    gap_sd_pct: Optional[float]
    gap_bound: bool               # gap_pct is an upper bound
    gap_source: str
    convergence_in_range: bool    # inside the published numbers (or the project's study)
    token_efficiency: float       # DDP reaches this method's loss with this fraction of its tokens
    batch_factor: float           # tokens to the loss relative to DDP over all workers, from the batch
    batch_ratio: Optional[float]  # DiLoCo's tolerance of a larger batch (Charles Table 9), where applied
    time_to_ddp_loss_s: float     # time to the loss DDP over all workers reaches with the planned tokens
    feasible: bool = True         # False: a DiLoCo round longer than the planned tokens (never syncs)
    speedup_vs_ddp: Optional[float] = None
    cbs_exceeded: bool = False
    memory: Dict[str, float] = dataclasses.field(default_factory=dict)
    notes: List[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["candidate"] = dataclasses.asdict(self.candidate)
        d["label"] = self.candidate.label()
        return d


@dataclasses.dataclass
class CriticalBatch:
    tokens: float
    source: str
    in_range: bool


def critical_batch(job: Job, options: Options) -> CriticalBatch:
    """The critical batch (tokens per step) for the planned tokens: the user's, this project's
    study for its small models, or Zhang et al.'s law (marked out of range outside its runs)."""
    if options.critical_batch is not None:
        return CriticalBatch(options.critical_batch, "given", True)
    if project.in_study_range(job.params):
        s = project.study_critical_batch(job.tokens, job.params)
        if s is not None:
            return CriticalBatch(s, project.STUDY, True)
    lo, hi = laws.CBS_TOKENS_RANGE
    return CriticalBatch(laws.critical_batch_tokens(job.tokens), f"{laws.ZHANG} Sec. 3.2-3.3", lo <= job.tokens <= hi)


def ddp_overlap(options: Options, grad_bytes: float) -> float:
    """The share of a step's compute DDP's gradient all-reduce hides behind: the user's, or the
    backward less its last 25 MB bucket (none with a single bucket)."""
    if options.ddp_overlap is not None:
        return options.ddp_overlap
    return BACKWARD_SHARE * max(0.0, 1.0 - DDP_BUCKET_BYTES / grad_bytes) if grad_bytes > 0 else 0.0


def memory(job: Job, cand: Candidate, options: Options) -> Dict[str, float]:
    """Bytes per worker: the training state (fp32 params, grads, Adam m and v; activations not
    included) and what DiLoCo adds in fp32: anchor and outer momentum (+ the error-feedback
    residual), on the device or on the CPU; plus the encoded pseudo-gradient during a sync."""
    n = job.params
    base = BASE_STATE_BYTES * n
    if cand.method == "ddp":
        return {"base_bytes": base, "diloco_device_bytes": 0.0, "diloco_host_bytes": 0.0, "sync_buffer_bytes": 0.0}
    extra = 4.0 * n * (2 + (1 if options.error_feedback else 0))
    frag = -(-n // cand.fragments)
    if cand.method == "hierarchical":
        frag = -(-frag // job.per_cluster)  # each member encodes its own shard
    buf = 2.0 * wire_bytes(cand.format, frag, options.block_size)  # send and receive buffers of one sync
    if options.state_device == "cpu":
        # streaming: only the fragment in flight needs its anchor and momentum on the device
        dev = extra / cand.fragments if cand.fragments > 1 else 0.0
        return {"base_bytes": base, "diloco_device_bytes": dev, "diloco_host_bytes": extra, "sync_buffer_bytes": buf}
    return {"base_bytes": base, "diloco_device_bytes": extra, "diloco_host_bytes": 0.0, "sync_buffer_bytes": buf}


def _convergence(job: Job, cand: Candidate, M: int) -> laws.Convergence:
    if cand.method == "ddp" or M < 2:
        return laws.Convergence(0.0, 0.0, 1.0, True, False, "DDP")
    if project.in_study_range(job.params):
        conv = project.study_convergence(job.params, M, cand.H, job.tokens, cand.format)
        if cand.overlap_steps:
            conv.in_range = False
            conv.notes.append("overlapped syncs were not part of the study")
        return conv
    conv = laws.published(job.params, M, cand.H, job.tokens, cand.overlap_steps)
    if cand.format == "int4":
        conv.notes.append("4 bits: Streaming DiLoCo measured fp4 (E3M0); ours is block-absmax int4")
    if project.PROJECT_STUDY["fitted_params_range"][1] < job.params < laws.N_SWEPT[0]:
        conv.notes.append("between this project's study (<= 1.9M) and the laws (>= 35M): no data")
    return conv


def _sync_time(job: Job, net: Network, cand: Candidate, o: Options, numel: int, spans: bool, k: int) -> float:
    """One flat all-reduce of ``numel`` elements over ``cand.workers`` workers."""
    algo = "ring" if cand.format in ("none", "bf16") and cand.method == "ddp" else "a2a"
    if spans:
        return allreduce_time(cand.format, numel, cand.workers, net.inter_mbit, net.inter_latency_ms, k, algo,
                              o.profile, o.efficiency, o.block_size, intra_mbit=net.intra_mbit)
    return allreduce_time(cand.format, numel, cand.workers, net.intra_mbit, net.intra_latency_ms, 1, algo,
                          o.profile, o.efficiency, o.block_size)


def _inner_ddp_step(job: Job, net: Network, o: Options, c: float) -> float:
    """Wall time of one step of DDP inside one cluster (hierarchical DiLoCo's inner step)."""
    comm = allreduce_time(o.ddp_format, job.params, job.per_cluster, net.intra_mbit, net.intra_latency_ms, 1, None,
                          o.profile, o.efficiency, o.block_size)
    return c + comm - min(comm, ddp_overlap(o, wire_bytes(o.ddp_format, job.params)) * c)


def predict(job: Job, net: Network, cand: Candidate, options: Optional[Options] = None) -> Prediction:
    """Predict one candidate (see the package doc for the models)."""
    o = options or Options()
    cand.validate(job)
    per_cluster = job.per_cluster
    k = min(per_cluster, cand.workers)  # workers fill the clusters in order
    spans = k < cand.workers
    if spans and net.inter_mbit is None:
        raise ValueError(f"inter_mbit: {cand.label()} spans {-(-cand.workers // k)} clusters: expected the link "
                         "between clusters")
    n, c, notes = job.params, job.slowest_compute_s(cand.workers), []
    if job.clusters > 1 and not spans:
        notes.append("inside one cluster")
    H, P, tau = cand.H, cand.fragments, cand.overlap_steps
    if cand.method == "ddp":
        comm = _sync_time(job, net, cand, o, n, spans, k)
        hidden = min(comm, ddp_overlap(o, wire_bytes(cand.format, n, o.block_size)) * c)
        round_s, inner_step, M = c + comm - hidden, c, 1
        algo = "ring" if cand.format in ("none", "bf16") else "a2a"
        size = wire_bytes(cand.format, n, o.block_size) + (0 if algo == "ring" else HEADER_BYTES * cand.workers)
        slow = peak = slow_link_bytes(algo, size, cand.workers, k) if spans else 0.0
    else:
        nf = -(-n // P)
        if cand.method == "diloco":
            M, inner_step = cand.workers, c
            t_f = _sync_time(job, net, cand, o, nf, spans, k)
            size = wire_bytes(cand.format, nf, o.block_size) + HEADER_BYTES * cand.workers
            peak = slow_link_bytes("a2a", size, cand.workers, k) if spans else 0.0
        else:
            M = cand.workers // per_cluster
            inner_step = _inner_ddp_step(job, net, o, c)
            shard = -(-nf // per_cluster)  # member j of every cluster syncs shard j; they share the uplink
            t_f = allreduce_time(cand.format, shard, M, net.inter_mbit / per_cluster, net.inter_latency_ms, 1, "a2a",
                                 o.profile, o.efficiency, o.block_size)
            eff = o.profile.efficiency if o.efficiency is None else o.efficiency
            gather = (per_cluster - 1) / per_cluster * 4.0 * nf / (eff * net.intra_mbit * 1e6 / 8)
            t_f += gather + (per_cluster - 1) * net.intra_latency_ms / 1e3  # fp32 anchor all-gather inside
            peak = per_cluster * slow_link_bytes("a2a", wire_bytes(cand.format, shard, o.block_size)
                                                 + HEADER_BYTES * M, M, 1)
        exposed = max(0.0, t_f - tau * c)
        # each fragment blocks for what tau steps do not hide; the link carries P fragments a round
        round_s = max(H * inner_step + P * exposed, P * t_f)
        slow = P * peak
    step_s = round_s / H
    steps = job.tokens / (job.tokens_per_step * cand.workers)
    total = steps * step_s
    feasible = cand.method == "ddp" or steps >= H
    if not feasible:
        notes.append(f"never syncs: {steps:.3g} steps per worker, fewer than H={H}")
    conv = _convergence(job, cand, M)
    notes.extend(conv.notes)
    cb = critical_batch(job, o)
    bn_ddp = laws.noise_batch_tokens(cb.tokens)
    ratio = laws.batch_ratio(n, M) if cand.method != "ddp" and not project.in_study_range(n) else None
    bn = bn_ddp * (ratio or 1.0)
    batch = job.tokens_per_step * cand.workers
    factor = (1 + batch / bn) / (1 + job.tokens_per_step * job.workers / bn_ddp)
    util = H * c / round_s
    return Prediction(candidate=cand, step_s=step_s, round_s=round_s, comm_share=1.0 - util, compute_utilization=util,
                      slow_link_bytes_per_round=slow, peak_slow_link_bytes=peak, total_s=total,
                      global_batch_tokens=batch, replicas=M, gap_pct=conv.gap_pct, gap_sd_pct=conv.sd_pct,
                      gap_bound=conv.bound, gap_source=conv.source, convergence_in_range=conv.in_range,
                      token_efficiency=conv.token_efficiency, batch_factor=factor, batch_ratio=ratio,
                      time_to_ddp_loss_s=total * factor / conv.token_efficiency, feasible=feasible,
                      cbs_exceeded=batch > cb.tokens * (ratio or 1.0), memory=memory(job, cand, o), notes=notes)


# ------------------------------------------------------------------------------------------
# what a lab asks next
# ------------------------------------------------------------------------------------------
def slow_link(job: Job, cand: Candidate) -> str:
    """"inter" when the candidate's traffic crosses clusters, else "intra"."""
    return "inter" if min(job.per_cluster, cand.workers) < cand.workers else "intra"


def bandwidth_for_utilization(job: Job, net: Network, cand: Candidate, utilization: float,
                              options: Optional[Options] = None) -> Optional[float]:
    """The rate (Mbit/s) of the candidate's slowest link (between clusters when it crosses them,
    else the link between workers) at which its compute utilisation reaches ``utilization``
    (0-1); None when no rate up to 1 Pbit/s does (latency or per-call costs alone exceed it)."""
    which = slow_link(job, cand)

    def util(mbit):
        nw = dataclasses.replace(net, **{f"{which}_mbit": mbit})
        return predict(job, nw, cand, options).compute_utilization
    lo, hi = 1e-3, 1e9
    if util(hi) < utilization:
        return None
    if util(lo) >= utilization:
        return lo
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if util(mid) < utilization else (lo, mid)
    return hi


H_GRID = (1, 2, 5, 10, 20, 30, 50, 100, 200, 300, 500, 1000, 2000, 5000)


def h_for_comm_share(job: Job, net: Network, cand: Candidate, share: float,
                     options: Optional[Options] = None) -> Optional[int]:
    """The smallest H of :data:`H_GRID` at which the candidate's communication share is at most
    ``share`` (0-1), keeping its fragments; None when none does."""
    for h in H_GRID:
        if cand.overlap_steps > h:
            continue
        c = dataclasses.replace(cand, H=h, fragments=min(cand.fragments, h))
        if predict(job, net, c, options).comm_share <= share:
            return h
    return None


def learning_rates(job: Job, cand: Candidate) -> Dict[str, object]:
    """Inner and outer learning rates the laws suggest for the candidate's replicas and size;
    none outside the laws' models (35M-10B parameters)."""
    n = job.params
    if not (laws.N_VALIDATED[0] <= n <= laws.N_VALIDATED[1]):
        return {"inner_lr": None, "inner_source": f"no published law for {n:.3g} parameters (the laws cover "
                                                  f"{laws.N_VALIDATED[0]:.3g}-{laws.N_VALIDATED[1]:.3g})"}
    if cand.method == "ddp":
        return {"inner_lr": laws.inner_lr(n, None), "inner_source": f"{laws.CHARLES} Table 8"}
    M = cand.workers if cand.method == "diloco" else cand.workers // job.per_cluster
    olr, osrc = laws.outer_lr(M)
    if cand.H > laws.H_LAW:
        osrc += "; it grows with H (Fig. 8, no numbers): tune upward from it"
    return {"inner_lr": laws.inner_lr(n, M), "inner_source": f"{laws.CHARLES} Table 10 (joint law)",
            "outer_lr": olr, "outer_source": osrc}


def simulator_setting(params: float, step_s: float, method: str, H: int = 100, fragments: int = 1):
    """(job, network, options, candidate) matching the simulator behind Charles et al. Table 6
    and Streaming DiLoCo Table 4: two datacenters, bf16 exchanged, each layer's reduction
    overlapping the rest of its backward (2/3 of a step), an ideal link without latency.
    ``method``: "ddp", "vanilla", "streaming", "overlapped" (tau = 1 more step) or "fp4"
    (modelled as int4)."""
    job = Job(params=int(params), tokens=20 * params, tokens_per_step=1 << 20, workers=2, clusters=2,
              step_time_s=step_s)
    if method == "ddp":
        cand = Candidate("ddp", 2, format="bf16")
    else:
        tau = BACKWARD_SHARE + (1 if method in ("overlapped", "fp4") else 0)
        cand = Candidate("diloco", 2, H, "int4" if method == "fp4" else "bf16",
                         fragments=1 if method == "vanilla" else fragments, overlap_steps=tau)
    return job, Network(inter_mbit=1000.0), Options(ddp_overlap=BACKWARD_SHARE), cand
