"""Streaming DiLoCo (Douillard et al. 2025): the model synced in P fragments, staggered over
the H inner steps, each fragment's all-reduce running in the background for TAU inner steps
before its outer update is merged into the live parameters.

``DiLoCo(model, inner_opt, sync_every=H, fragments=P, overlap_steps=TAU, mixing=ALPHA)``;
this module holds the fragment rule, the schedule and the merge; the outer step itself is the
shared engine's (:mod:`.engine`), one :class:`~.engine.Reduction` per fragment sync, over the
fragment's segments (:class:`~.buffers.Segment`).

Fragments (:func:`plan_fragments`)
----------------------------------
The trainable parameters, in the model's parameter order (tied weights once), are cut into P
contiguous runs (``total`` counts the block-alignment padding, which is what crosses the wire).
Cuts fall on parameter boundaries, chosen so that the largest fragment is as small as the
parameter sizes allow (the peak bytes of one sync event; ties: earlier fragments as large as
that bound allows, every fragment at least one piece). A parameter is split only when it alone
is larger than ``total / P`` (then into ``ceil(numel / (total / P))`` pieces of equal size,
rounded up to the quantization block, so a piece starts on a block boundary and quantizes
exactly as in the whole buffer), or when whole parameters cannot keep the largest fragment
within ``BALANCE = 1.1`` x ``total / P``: a few large parameters against a small P (the small
GPT's 65K-element matrices are a third of a quarter of it: 1.15x with whole parameters at
P = 4). Then every parameter is cut into block-aligned pieces of at most ``total / (16 P)``
elements (at least one block), so the largest fragment is within about 1/16 of ``total / P``,
and the pieces of one parameter that land in the same fragment stay one segment: only the
parameters that straddle a cut (at most P - 1) sync in two fragments. ``fragments`` must be between 1 and
the number of synced parameters.

Schedule
--------
Fragment ``f`` (0-based) syncs after inner step ``t`` (counted from 1) when
``t % H == s_f % H`` with ``s_f = floor((f + 1) * H / P)``: every fragment once every H steps,
the P syncs spread evenly over the H steps, fragment P-1 at the end of the round
(``s_{P-1} = H``). When P does not divide H the gaps between consecutive fragment syncs are
``floor(H / P)`` or ``ceil(H / P)``. A fragment's first round is ``s_f`` steps long (the
others H). ``fragments <= sync_every`` is required (two fragments never sync at the same step).
``fragments=1`` syncs at every multiple of H, as plain DiLoCo.

Overlap and merge
-----------------
At fragment f's sync, its pseudo-gradient ``anchor_f - params_f`` (+ its residual with error
feedback: residuals are per element, so per fragment) is compressed and its all-reduce is
started; with ``overlap_steps = TAU > 0`` it runs in the background while the next TAU inner
steps run (nothing touches the fragment's anchor, momentum, residual or the reduce's buffers
in between: the inner steps write only the parameters). After inner step ``t + TAU`` the
reduce is awaited, the outer Nesterov step updates ``anchor_f`` (the global parameters of the
fragment) and momentum, and the fragment's live parameters are merged (the paper's mixing of
local and global parameters)::

    params_f <- mixing * params_f + (1 - mixing) * anchor_f        (torch.lerp, fp32, then cast)

``mixing`` defaults to 0.5 when ``TAU > 0`` (the paper's choice) and to 0 when ``TAU = 0``.
``mixing = 0`` replaces the fragment by the global parameters (the outer step writes them in
its fused pass, exactly as plain DiLoCo). ``0 <= TAU <= H``: ``TAU <= floor(H / P)`` keeps at
most one fragment in flight; a larger TAU keeps several. At one step, the reduces due are
merged, then the syncs due start (the next fragment's pseudo-gradient sees the merge just
before it); a fragment whose previous reduce is due at the step it starts again (``TAU = H``)
starts first and merges that reduce after, so ``TAU = H`` with one fragment and ``mixing = 0`` is
``DiLoCo(overlap=True)``, the one-round-delayed outer step (the new reduce is computed from
the anchor before the previous round's update lands), bit for bit. With ``TAU = H`` every
fragment sync comes with the merge of that fragment's previous reduce; its first sync has
none and merges the unchanged anchor (with ``mixing = 0``: the parameters are reset to it),
so that a round's progress is not counted again in the next round's pseudo-gradient. ``fragments=1,
overlap_steps=0`` is plain DiLoCo bit for bit.

Replicas: anchors (the global model) are identical on every rank after every merge, as in
plain DiLoCo. With ``mixing = 0`` a fragment's live parameters equal its anchor after its
merge; with ``mixing > 0`` they keep a share of the local progress and differ between ranks.

Ordering with other collectives
-------------------------------
Every fragment collective is issued from ``step()`` after a fixed inner step, the same on
every rank: the all-reduce at the sync step, and (fp32 without averaging on a "localsgd"
group) the all-gather half of the exact sum at the merge step. So on every rank they take the
same place in the group's sequence of collectives, between the user's collectives of the
steps before and after, and c10d matches collectives of a group by that sequence (the
"localsgd" backend runs them in that order on its worker). A script must not issue
collectives on the group from another thread while ``step()`` runs, and must call ``step()``,
``flush()`` and ``state_dict()`` at the same steps on every rank.

Across clusters (``hierarchy=...``): each fragment synced on this rank's shards of it, one
non-finite decision per cluster, the fragment's anchor all-gathered inside the cluster before
the merge, and the ordering of collectives on the intra and cross groups: :mod:`.hierarchical`.

Non-finite results, stats, checkpoints
--------------------------------------
A fragment whose reduced bytes are not finite is skipped at its merge: its anchor and momentum
stay, its residual is restored (when ``TAU < H``; else its non-finite entries are zeroed),
its live parameters are reset to its anchor, and ``on_nonfinite`` warns or raises.
``stats["syncs"]`` counts fragment merges, ``stats["bytes_sent"]`` every fragment reduce;
``sync_count`` counts fragment syncs started. :meth:`StreamingSync.flush` merges every
fragment in flight now (the documented flush point: call it before evaluating or saving the
final model). ``state_dict()`` waits for the fragments in flight and stores their results
with the step each is due at; a resumed run merges them at those steps: bitwise the
uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .buffers import FlatBuffer, Segment
from .engine import Reduction


#: the largest fragment's bound, as a multiple of total / P, that whole-parameter cuts must meet
#: before parameters are split further (the fragment rule in the module docstring)
BALANCE = 1.1


def check_streaming_args(fragments, overlap_steps, mixing, sync_every: int, overlap: bool, hierarchy) -> None:
    """The streaming arguments, each with a message naming the problem (those that need the
    parameters are checked by :func:`plan_fragments`)."""
    if fragments is None:
        if overlap_steps != 0 or mixing is not None:
            raise ValueError("overlap_steps/mixing: expected fragments=P to be set (streaming DiLoCo), got "
                             f"overlap_steps={overlap_steps!r}, mixing={mixing!r} without fragments")
        return
    if isinstance(fragments, bool) or not isinstance(fragments, int) or fragments < 1:
        raise ValueError(f"fragments: expected an integer >= 1, got {fragments!r}")
    if fragments > sync_every:
        raise ValueError(f"fragments: expected at most sync_every={sync_every} (one fragment sync per inner step "
                         f"at most), got {fragments}")
    if isinstance(overlap_steps, bool) or not isinstance(overlap_steps, int) or not 0 <= overlap_steps <= sync_every:
        raise ValueError(f"overlap_steps: expected an integer in [0, sync_every={sync_every}] (a fragment's reduce "
                         f"must be merged before that fragment syncs again), got {overlap_steps!r}")
    if mixing is not None and not (isinstance(mixing, (int, float)) and not isinstance(mixing, bool)
                                   and 0.0 <= mixing < 1.0):
        raise ValueError(f"mixing: expected a number in [0, 1) (the local parameters' share at a merge), "
                         f"got {mixing!r}")
    if overlap:
        raise ValueError("overlap=True with fragments: expected one of the two, got both (overlap=True is "
                         f"fragments=1, overlap_steps=sync_every, mixing=0)")
    # with hierarchy: fragments across clusters (.hierarchical.HierarchicalStreamingSync)


def resolved_mixing(mixing: Optional[float], overlap_steps: int) -> float:
    """``mixing`` as used: the paper's 0.5 when overlapping (``TAU > 0``) and 0 otherwise by default."""
    return float(mixing) if mixing is not None else (0.5 if overlap_steps > 0 else 0.0)


def fragment_offsets(sync_every: int, fragments: int) -> List[int]:
    """``s_f = floor((f + 1) H / P)``: fragment f syncs after step t when ``t % H == s_f % H``."""
    return [((f + 1) * sync_every) // fragments for f in range(fragments)]


def plan_fragments(flats: Sequence[FlatBuffer], order: Sequence[torch.nn.Parameter], fragments: int,
                   align: int) -> List[List[Segment]]:
    """The fragment rule (module docstring): ``fragments`` lists of block-aligned segments."""
    if fragments > len(order):
        raise ValueError(f"fragments: expected at most the number of synced parameters ({len(order)}), "
                         f"got {fragments}")
    where: Dict[int, Tuple[int, int, int]] = {}
    for fi, fb in enumerate(flats):
        for j, p in enumerate(fb.params):
            hi = fb.offsets[j + 1] if j + 1 < len(fb.params) else fb.numel
            where[id(p)] = (fi, fb.offsets[j], hi)  # the parameter and its alignment padding
    units = [where[id(p)] for p in order]
    total = sum(hi - lo for _, lo, hi in units)
    target = total / fragments
    pieces = _pieces(units, target, align) if fragments > 1 else list(units)
    sizes = [hi - lo for _, lo, hi in pieces]
    bounds = _min_max_cuts(sizes, fragments)
    if max(sum(sizes[bounds[k]:bounds[k + 1]]) for k in range(fragments)) > BALANCE * target:
        # whole parameters leave a fragment too large: pieces of 1/16 fragment (module docstring)
        pieces = _pieces(units, max(align, target / 16), align)
        sizes = [hi - lo for _, lo, hi in pieces]
        bounds = _min_max_cuts(sizes, fragments)
    out = []
    for k in range(fragments):
        ranges = sorted(pieces[bounds[k]:bounds[k + 1]])
        merged: List[List[int]] = []
        for fi, lo, hi in ranges:
            if merged and merged[-1][0] == fi and merged[-1][2] == lo:
                merged[-1][2] = hi
            else:
                merged.append([fi, lo, hi])
        out.append([flats[fi].segment(lo, hi) for fi, lo, hi in merged])
    return out


def _pieces(units: Sequence[Tuple[int, int, int]], limit: float, align: int) -> List[Tuple[int, int, int]]:
    """Each ``(flat, lo, hi)`` unit larger than ``limit`` cut into ``ceil(n / limit)`` equal pieces,
    rounded up to ``align`` (so every piece starts on a block boundary); the others whole."""
    out: List[Tuple[int, int, int]] = []
    for fi, lo, hi in units:
        n = hi - lo
        if n > limit:
            k = math.ceil(n / limit)
            step = max(align, -(-math.ceil(n / k) // align) * align)
            out.extend((fi, a, min(a + step, hi)) for a in range(lo, hi, step))
        else:
            out.append((fi, lo, hi))
    return out


def _pack(sizes: Sequence[int], parts: int, cap: int) -> Optional[List[int]]:
    """Cut ``sizes`` left to right into exactly ``parts`` non-empty runs of at most ``cap`` each,
    each run as long as ``cap`` and the runs still to fill allow: the bounds, or None."""
    bounds, cur, n = [0], 0, len(sizes)
    for i, x in enumerate(sizes):
        left = parts - len(bounds)  # runs still to open after the current one
        if i > bounds[-1] and (cur + x > cap or n - i == left):
            bounds.append(i)
            cur = 0
        if x > cap or len(bounds) > parts:
            return None
        cur += x
    bounds.append(n)
    return bounds if len(bounds) == parts + 1 else None


def _min_max_cuts(sizes: Sequence[int], parts: int) -> List[int]:
    """The contiguous cut of ``sizes`` into ``parts`` runs whose largest run is the smallest
    possible (binary search on that size; ``len(sizes) >= parts``)."""
    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if _pack(sizes, parts, mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return _pack(sizes, parts, lo)


def mix_params(segments: Sequence[Segment], mixing: float) -> None:
    """The merge: ``params <- mixing * params + (1 - mixing) * anchor`` over ``segments``
    (``torch.lerp`` in fp32, then cast; ``mixing = 0``: ``params <- anchor``)."""
    a = mixing
    with torch.no_grad():
        for seg in segments:
            if seg.numel == 0:
                continue
            if a == 0.0:
                seg.write_params(seg.anchor)
                continue
            local = seg.params_on_state_device().float()
            seg.write_params(torch.lerp(seg.anchor, local, a))  # a * local + (1 - a) * global


@dataclasses.dataclass
class _InFlight:
    fragment: int
    due: int          # the inner step after which it is merged
    sync_index: int   # the fragment sync's number (1-based, over all fragments)
    red: Reduction


class StreamingSync:
    """The schedule, the reduces in flight and the merge, for one :class:`~.optimizer.DiLoCo`
    (``owner``: its engine, reducer, counters, stats and non-finite policy)."""

    def __init__(self, owner, order: Sequence[torch.nn.Parameter], fragments: int, overlap_steps: int,
                 mixing: Optional[float], align: int):
        self.owner = owner
        self.fragments = fragments
        self.overlap_steps = overlap_steps
        self.mixing = resolved_mixing(mixing, overlap_steps)
        self.segments = self._plan(owner._flats, order, fragments, align)
        self.offsets = fragment_offsets(owner.sync_every, fragments)
        self.in_flight: List[_InFlight] = []
        self._held: List[_InFlight] = []  # due now, merged after the starts of this step (TAU = H)

    # ---- hooks (sharded replicas override them: .sharded.ShardedStreamingSync)
    def _plan(self, flats, order, fragments: int, align: int) -> List[List[Segment]]:
        """The fragments' segments (the fragment rule of the module docstring)."""
        return plan_fragments(flats, order, fragments, align)

    def _finite(self, red: Reduction) -> bool:
        """Whether a fragment's (awaited) result is finite, the same answer on every rank."""
        return self.agree_finite(self.owner._engine.is_finite(red))

    # ---- sizes (for reports and the planner's figures)
    def fragment_numels(self) -> List[int]:
        return [sum(s.numel for s in segs) for segs in self.segments]

    # ---- the schedule
    def after_step(self, t: int) -> None:
        """After inner step ``t``: merge the reduces due, start the fragment syncs due; a reduce of a
        fragment that starts again now (``TAU = H``), or that started now (``TAU = 0``), is merged
        after the starts."""
        h = self.owner.sync_every
        starting = [f for f, s in enumerate(self.offsets) if t % h == s % h]
        self._held = []
        while self.in_flight and self.in_flight[0].due <= t:
            item = self.in_flight.pop(0)
            if item.fragment in starting:
                self._held.append(item)
            else:
                self._merge(item)
        for f in starting:
            first = self.overlap_steps == h and not any(it.fragment == f for it in self._held + self.in_flight)
            self._start(f, t)
            if first:
                # TAU = H: every start comes with the merge of the fragment's previous reduce;
                # the first has none, so it merges the unchanged anchor (else this round's
                # progress would count again in the next round's pseudo-gradient).
                self._mix(self.segments[f])
        held, self._held = self._held, []
        for item in held:
            self._merge(item)
        while self.in_flight and self.in_flight[0].due <= t:  # TAU = 0: merged right after its start
            self._merge(self.in_flight.pop(0))

    def flush(self) -> None:
        """Merge every fragment in flight now, in the order they started."""
        while self.in_flight:
            self._merge(self.in_flight.pop(0))

    def _start(self, f: int, t: int) -> None:
        o = self.owner
        if o._tripwire.watching:
            # TAU = H: the reduce merged after this start must be counted before the tripwire
            # reads the counters. Free on a "localsgd" group: its worker runs collectives in
            # order, so the new reduce could not start before that one ends anyway.
            for item in self._held:
                item.red.wait()
        if not self.in_flight or not o._tripwire.watching:
            # With a reduce in flight its bytes may not be counted yet: the byte check waits for
            # a start with none in flight (the interval then spans several starts). With
            # TAU <= floor(H/P) that is every start; with more in flight it may be none.
            o._tripwire.check(o.stats, o._sync_index + 1)
        o._sync_index += 1
        h = o.sync_every
        red = o._engine.start(self.reduced_segments(f), o._reducer, async_op=self.overlap_steps > 0,
                              keep_backup=self.overlap_steps < h, seed=o._seed(), wire_seed=o._wire_seed())
        o.stats["bytes_sent"] += red.bytes_sent
        self.in_flight.append(_InFlight(f, t + self.overlap_steps, o._sync_index, red))

    def _merge(self, item: _InFlight) -> None:
        o, red = self.owner, item.red
        red.wait()
        finite = self._finite(red)
        o.stats["syncs"] += 1
        if not finite:
            o.stats["skipped_syncs"] += 1
            o._engine.restore_residuals(red)
            for seg in self.segments[item.fragment]:
                seg.write_params(seg.anchor)
            msg = (f"DiLoCo sync {item.sync_index} (fragment {item.fragment}): non-finite pseudo-gradient on at least "
                   "one rank; outer step skipped on every rank, the fragment's parameters reset to its anchor")
            if o.on_nonfinite == "raise":
                raise FloatingPointError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=4)
            return
        self._apply(item)

    # ---- what hierarchical mode changes (.hierarchical.HierarchicalStreamingSync)
    def reduced_segments(self, f: int) -> List[Segment]:
        """The segments of fragment ``f`` this rank reduces: all of them."""
        return self.segments[f]

    def agree_finite(self, finite: bool) -> bool:
        """The decision on a non-finite result: every rank of the group already sees the same."""
        return finite

    def _apply(self, item: _InFlight) -> None:
        """The outer step of a finite result, and the merge of the fragment's live parameters."""
        o, red = self.owner, item.red
        if self.mixing == 0.0:
            o._engine.apply(red)  # params <- anchor in the outer step's fused pass
            return
        o._engine.apply(red, write_params=False)
        self._mix(red.segments)

    def _mix(self, segments: Sequence[Segment]) -> None:
        """params <- mixing * params + (1 - mixing) * anchor over ``segments``."""
        mix_params(segments, self.mixing)

    # ---- checkpoints
    def state(self) -> Dict[str, Any]:
        return {"fragments": self.fragments, "overlap_steps": self.overlap_steps, "mixing": self.mixing,
                "in_flight": [{"fragment": it.fragment, "due": it.due, "sync_index": it.sync_index,
                               "reduction": it.red.state()} for it in self.in_flight]}

    def check_state_settings(self, state: Optional[Dict[str, Any]]) -> None:
        """A saved streaming state's settings against the constructed ones, each mismatch named."""
        if state is None:
            raise ValueError(f"load_state_dict: expected a streaming state (fragments={self.fragments} as "
                             "constructed), got a state saved without fragments")
        for k in ("fragments", "overlap_steps", "mixing"):
            if state[k] != getattr(self, k):
                raise ValueError(f"load_state_dict: expected {k}={getattr(self, k)!r} as constructed, "
                                 f"got {state[k]!r}")

    def load_state(self, state: Optional[Dict[str, Any]]) -> None:
        self.check_state_settings(state)
        o = self.owner
        self.in_flight = [_InFlight(it["fragment"], it["due"], it["sync_index"],
                                    Reduction.from_state(it["reduction"], self.reduced_segments(it["fragment"]),
                                                         o.sync_size))
                          for it in state["in_flight"]]
