"""Communication from first principles: bytes from the algorithm, time from the link.

One all-reduce of ``n`` elements over ``p`` workers takes

    t = fixed + per_element * n + bytes_out / (efficiency * rate) + rounds * latency

``bytes_out`` is what the busiest link carries, exact for the algorithm and the format:

* ``"ring"`` (NCCL's or gloo's ring, DDP's gradients in fp32 or bf16): every worker sends
  ``2 (p-1)/p`` of the tensor; one ring edge leaves each cluster, so a cluster's uplink carries
  that much too.
* ``"a2a"`` (the localsgd backend: an all-to-all of chunks, then an all-gather of the reduced
  chunks, any format): a worker sends ``2 (p-1)/p`` of the encoded tensor; out of a cluster of
  ``k`` of the ``p`` workers go ``2 k (p-k)/p`` encoded tensors.

``efficiency`` (goodput over the link rate), ``fixed`` (per call) and ``per_element`` (quantize,
reduce, copy) are 1, 0 and 0 on an ideal link, or come from a :class:`Profile` the user measured
(``localsgd-bench collectives`` writes one). ``rounds`` is the algorithm's message rounds,
``2 (p-1)``. Nothing measured on one machine is applied to another without being named.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Dict, Optional, Tuple

from .._ops import DEFAULT_BLOCK_SIZE

#: Wire formats: the library's ("none" = the fp32 tensor, "int8", "int4", "fp8") and "bf16",
#: which the planner models for DDP's gradients and for the papers' bf16 exchange (it is not a
#: wire format of the localsgd backend).
FORMATS = ("none", "bf16", "int8", "int4", "fp8")
LIBRARY_FORMATS = ("none", "int8", "int4", "fp8")
HEADER_BYTES = 64  # the localsgd backend's header per peer and call
#: torch DDP's default bucket (bucket_cap_mb=25): the last bucket's all-reduce cannot overlap
#: the backward.
DDP_BUCKET_BYTES = 25 * 2 ** 20


def wire_bytes(fmt: str, numel: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Bytes of one encoded tensor (payload + fp32 block scales), as
    ``functional.compressed_nbytes``; "none" is fp32, "bf16" two bytes per element."""
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")
    if fmt == "none":
        return 4 * numel
    if fmt == "bf16":
        return 2 * numel
    blocks = -(-numel // block_size)
    payload = numel if fmt in ("int8", "fp8") else -(-numel // 2)
    return payload + 4 * blocks


def slow_link_bytes(algorithm: str, tensor_bytes: float, world: int, cluster_size: int) -> float:
    """Bytes out of one cluster's uplink for one all-reduce of ``tensor_bytes`` over ``world``
    workers in clusters of ``cluster_size`` consecutive workers (see the module doc)."""
    p, k = world, cluster_size
    if p <= k:
        return 0.0
    if algorithm == "ring":
        return 2.0 * (p - 1) / p * tensor_bytes
    if algorithm == "a2a":
        return 2.0 * k * (p - k) / p * tensor_bytes
    raise ValueError(f"algorithm: expected 'ring' or 'a2a', got {algorithm!r}")


def worker_bytes(tensor_bytes: float, world: int) -> float:
    """Bytes each worker sends in one all-reduce (ring or all-to-all + all-gather)."""
    return 0.0 if world <= 1 else 2.0 * (world - 1) / world * tensor_bytes


@dataclasses.dataclass(frozen=True)
class Profile:
    """Measured per-call and per-element costs and link efficiency, with what they were measured
    on. Keys of ``fixed_s`` / ``per_element_s``: "ring" (a plain ring all-reduce, e.g. gloo's
    fp32) and the localsgd backend's formats ("none", "int8", "int4"; fp8 uses int8's)."""
    name: str
    measured_on: str
    efficiency: float = 1.0
    fixed_s: Dict[str, float] = dataclasses.field(default_factory=dict)
    per_element_s: Dict[str, float] = dataclasses.field(default_factory=dict)
    link_mbit_range: Optional[Tuple[float, float]] = None
    source: str = ""

    def __post_init__(self):
        if not (isinstance(self.efficiency, (int, float)) and 0 < self.efficiency <= 1):
            raise ValueError(f"profile {self.name!r}: efficiency expected in (0, 1], got {self.efficiency!r}")
        for what in (self.fixed_s, self.per_element_s):
            for k, v in what.items():
                if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                    raise ValueError(f"profile {self.name!r}: cost {k!r} expected a number >= 0, got {v!r}")

    def key(self, fmt: str, algorithm: str) -> str:
        if algorithm == "ring":
            return "ring"
        return {"fp8": "int8", "bf16": "none"}.get(fmt, fmt)

    def costs(self, fmt: str, algorithm: str) -> Tuple[float, float]:
        k = self.key(fmt, algorithm)
        return self.fixed_s.get(k, 0.0), self.per_element_s.get(k, 0.0)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["link_mbit_range"] = list(self.link_mbit_range) if self.link_mbit_range else None
        return d

    @classmethod
    def from_dict(cls, d: dict, name: Optional[str] = None) -> "Profile":
        if d.get("benchmark") == "collectives":  # a results file of localsgd-bench collectives
            from .project import profile_from_collectives
            d = profile_from_collectives(d)
        try:
            rng = d.get("link_mbit_range")
            return cls(name=name or d["name"], measured_on=d["measured_on"], efficiency=float(d["efficiency"]),
                       fixed_s=dict(d.get("fixed_s", {})), per_element_s=dict(d.get("per_element_s", {})),
                       link_mbit_range=tuple(rng) if rng else None, source=d.get("source", ""))
        except (KeyError, TypeError) as e:
            raise ValueError(f"profile: expected a planner profile (name, measured_on, efficiency, fixed_s, "
                             f"per_element_s) or a collectives result, missing or bad {e}") from None


IDEAL = Profile(name="ideal", measured_on="nothing: an ideal link (efficiency 1, no per-call or per-element cost)")


def load_profile(spec: str) -> Profile:
    """A profile by file path (a profile JSON, or ``localsgd-bench collectives``' results JSON)
    or by the name of one shipped with the planner (``cpu-gloo``)."""
    from .project import builtin_profiles
    profiles = builtin_profiles()
    if spec in profiles:
        return profiles[spec]
    if not os.path.exists(spec):
        raise ValueError(f"expected a profile file or one of {sorted(profiles)}, got {spec!r} (no such file)")
    try:
        with open(spec) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read profile {spec!r}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"profile {spec!r}: expected a JSON object")
    return Profile.from_dict(d, name=d.get("name") or os.path.basename(spec))


def allreduce_time(fmt: str, numel: int, world: int, mbit: float, latency_ms: float = 0.0,
                   cluster_size: int = 1, algorithm: Optional[str] = None, profile: Optional[Profile] = None,
                   efficiency: Optional[float] = None, block_size: int = DEFAULT_BLOCK_SIZE,
                   intra_mbit: Optional[float] = None) -> float:
    """Seconds of one all-reduce of ``numel`` elements in format ``fmt`` over ``world`` workers.
    ``mbit``: the link the busiest sender uses (a cluster's uplink when the workers span
    clusters of ``cluster_size``, shared by its workers; otherwise each worker's link).
    ``intra_mbit``: with ``cluster_size > 1``, the link inside a cluster (the traffic between
    members is timed on it; the slower of the two sets the time). ``algorithm``: "ring"
    (default for "none"/"bf16") or "a2a" (the localsgd backend; default for quantizing formats).
    ``efficiency``: overrides the profile's."""
    if world <= 1:
        return 0.0
    profile = profile or IDEAL
    algorithm = algorithm or ("ring" if fmt in ("none", "bf16") else "a2a")
    if algorithm == "ring" and fmt not in ("none", "bf16"):
        raise ValueError(f"algorithm 'ring' moves fp32 or bf16 only, got format {fmt!r}")
    eff = profile.efficiency if efficiency is None else efficiency
    size = wire_bytes(fmt, numel, block_size) + (0 if algorithm == "ring" else HEADER_BYTES * world)
    k = min(cluster_size, world)
    if k > 1:
        out = slow_link_bytes(algorithm, size, world, k)
        t_wire = out / (eff * mbit * 1e6 / 8)
        if intra_mbit is not None:
            # inside a cluster each member exchanges with the k-1 others (a2a) or its ring neighbour
            inner = worker_bytes(size, world) if algorithm == "ring" else 2.0 * (k - 1) / world * size
            t_wire = max(t_wire, inner / (eff * intra_mbit * 1e6 / 8))
    else:
        t_wire = worker_bytes(size, world) / (eff * mbit * 1e6 / 8)
    fixed, per_el = profile.costs(fmt, algorithm)
    return fixed + per_el * numel + t_wire + 2 * (world - 1) * latency_ms / 1e3
