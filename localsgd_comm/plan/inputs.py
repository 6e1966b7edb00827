"""The planner's inputs: what is trained (:class:`Job`), the links (:class:`Network`), one
configuration to predict (:class:`Candidate`) and the knobs that apply to all (:class:`Options`).
Every field is checked on construction; an error names the field and what it expected."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from .._ops import DEFAULT_BLOCK_SIZE
from .comm import FORMATS, IDEAL, Profile

METHODS = ("ddp", "diloco", "hierarchical")


def _number(name: str, v, lo: float = 0.0, lo_ok: bool = False, hi: Optional[float] = None, hi_ok: bool = True):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    if v < lo or (v == lo and not lo_ok) or (hi is not None and (v > hi or (v == hi and not hi_ok))):
        rng = f"{'[' if lo_ok else '('}{lo:g}, {'inf)' if hi is None else f'{hi:g}' + (']' if hi_ok else ')')}"
        raise ValueError(f"{name}: expected a number in {rng}, got {v!r}")
    return v


def _integer(name: str, v, lo: int = 1):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
    return v


@dataclasses.dataclass
class Network:
    """Links. ``intra_*``: between the workers of one cluster (each worker's link); ``inter_*``:
    between clusters, per cluster (all its workers share it; with one worker per cluster, each
    worker's own link). Rates in Mbit/s, latencies in ms per message."""
    inter_mbit: Optional[float] = None
    inter_latency_ms: float = 0.0
    intra_mbit: float = 100_000.0
    intra_latency_ms: float = 0.0

    def __post_init__(self):
        if self.inter_mbit is not None:
            _number("inter_mbit", self.inter_mbit)
        _number("intra_mbit", self.intra_mbit)
        _number("inter_latency_ms", self.inter_latency_ms, lo_ok=True)
        _number("intra_latency_ms", self.intra_latency_ms, lo_ok=True)


@dataclasses.dataclass
class Job:
    """What is trained. ``tokens``: the planned tokens (all workers together);
    ``tokens_per_step``: one worker's batch; ``step_time_s``: one inner step of one worker
    (forward, backward, optimizer), or ``flops``: a worker's sustained FLOP/s (the step is then
    ``6 params tokens_per_step / flops``). ``workers`` in ``clusters`` clusters of equal size
    (consecutive workers). ``speeds``: each worker's relative compute speed (1 = nominal)."""
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
            _integer(f, getattr(self, f))
        _number("tokens", self.tokens)
        if self.clusters > self.workers or self.workers % self.clusters:
            raise ValueError(f"workers: expected a multiple of clusters ({self.clusters}), got {self.workers}")
        if (self.step_time_s is None) == (self.flops is None):
            raise ValueError("expected exactly one of step_time_s and flops, got "
                             f"{'both' if self.step_time_s is not None else 'neither'}")
        if self.step_time_s is not None:
            _number("step_time_s", self.step_time_s)
        else:
            _number("flops", self.flops)
        one_step = self.tokens_per_step * self.workers
        if self.tokens < one_step:
            raise ValueError(f"tokens: expected at least one step of all workers ({one_step} tokens = "
                             f"{self.workers} x {self.tokens_per_step}), got {self.tokens:g}")
        if self.speeds is not None:
            if len(self.speeds) != self.workers or any(isinstance(s, bool) or not isinstance(s, (int, float))
                                                       or not (0 < s < math.inf) for s in self.speeds):
                raise ValueError(f"speeds: expected {self.workers} relative speeds > 0, got {list(self.speeds)!r}")

    @property
    def per_cluster(self) -> int:
        return self.workers // self.clusters

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
    """One configuration. ``method``: "ddp" (gradients every step in ``format``: fp32 "none" or
    "bf16" over a ring, a quantizing format over the localsgd backend), "diloco" (flat: every
    worker a replica) or "hierarchical" (DDP inside each cluster, DiLoCo between clusters).
    ``fragments`` / ``overlap_steps``: streaming DiLoCo's P fragments (each synced every H
    steps, one every H/P) and tau, the inner steps a sync may run behind (0: blocking; the
    library's ``overlap=True`` is tau = H)."""
    method: str
    workers: int
    H: int = 1
    format: str = "none"
    fragments: int = 1
    overlap_steps: float = 0.0

    def validate(self, job: Job) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format: expected one of {FORMATS}, got {self.format!r}")
        _integer("workers", self.workers)
        if self.workers > job.workers:
            raise ValueError(f"workers: expected 1..{job.workers}, got {self.workers}")
        _integer("H", self.H)
        _integer("fragments", self.fragments)
        _number("overlap_steps", self.overlap_steps, lo_ok=True)
        if self.method == "ddp" and (self.H != 1 or self.fragments != 1 or self.overlap_steps):
            raise ValueError("ddp: H, fragments and overlap_steps apply to DiLoCo only")
        if self.method != "ddp" and self.overlap_steps > self.H:
            raise ValueError(f"overlap_steps: expected at most H ({self.H}), got {self.overlap_steps:g}")
        if self.method == "hierarchical":
            k = job.per_cluster
            if self.workers % k or self.workers // k < 2:
                raise ValueError(f"hierarchical: expected whole clusters of {k} workers (>= 2 clusters), got "
                                 f"{self.workers} workers")

    def label(self) -> str:
        if self.method == "ddp":
            return f"DDP x{self.workers} {self.format if self.format != 'none' else 'fp32'}"
        s = f"{'hier. ' if self.method == 'hierarchical' else ''}DiLoCo x{self.workers} H={self.H} {self.format}"
        if self.fragments > 1 or self.overlap_steps:
            s += f" P={self.fragments} tau={self.overlap_steps:g}"
        return s


@dataclasses.dataclass
class Options:
    """Knobs that apply to every candidate. ``profile``: measured costs (default: an ideal link);
    ``efficiency``: the links' goodput over their rate (default: the profile's, 1 ideal);
    ``ddp_format``: DDP's gradients ("bf16" or "none" = fp32), also hierarchical DiLoCo's DDP
    inside a cluster; ``ddp_overlap``: the fraction of a step's compute DDP's all-reduce hides
    (default: the backward, 2/3, once the gradients span more than one 25 MB bucket);
    ``critical_batch``: tokens per step (default: Zhang et al.'s law, or this project's study for
    its small models); ``error_feedback`` / ``state_device``: DiLoCo's fp32 state (residual;
    "device" or "cpu"); ``device_memory_gib``: checked against the state per worker."""
    profile: Profile = IDEAL
    efficiency: Optional[float] = None
    ddp_format: str = "bf16"
    ddp_overlap: Optional[float] = None
    block_size: int = DEFAULT_BLOCK_SIZE
    critical_batch: Optional[float] = None
    error_feedback: bool = False
    state_device: str = "device"
    device_memory_gib: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.profile, Profile):
            raise ValueError(f"profile: expected a Profile, got {type(self.profile).__name__}")
        if self.efficiency is not None:
            _number("efficiency", self.efficiency, hi=1.0)
        if self.ddp_format not in FORMATS:
            raise ValueError(f"ddp_format: expected one of {FORMATS}, got {self.ddp_format!r}")
        if self.ddp_overlap is not None:
            _number("ddp_overlap", self.ddp_overlap, lo_ok=True, hi=1.0)
        _integer("block_size", self.block_size)
        if self.critical_batch is not None:
            _number("critical_batch", self.critical_batch)
        if self.state_device not in ("device", "cpu"):
            raise ValueError(f"state_device: expected 'device' or 'cpu', got {self.state_device!r}")
        if self.device_memory_gib is not None:
            _number("device_memory_gib", self.device_memory_gib)
