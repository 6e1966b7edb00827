"""Elastic streaming DiLoCo: ``ElasticDiLoCo(..., fragments=P, overlap_steps=0)``.

The model is cut into P fragments and each fragment syncs on its own schedule, exactly as in
``DiLoCo(fragments=P)`` (the fragment rule and the staggered schedule are
:mod:`localsgd_comm.diloco.streaming`'s: :func:`~localsgd_comm.diloco.streaming.plan_fragments`
and :func:`~localsgd_comm.diloco.streaming.fragment_offsets`). What elastic training adds:

Fragment rounds
---------------
Every fragment sync is one *fragment round* of the :class:`~.manager.RoundManager`, with its own
quorum, all-reduce over the round's members and commit vote, exactly like a whole-model round
of plain elastic DiLoCo, over the fragment's segments only. The members that start a fragment
round (its quorum) are the ones that must finish it: the commit applies the fragment's outer
Nesterov step (anchor, momentum, and ``params = anchor`` over the fragment) on every member, or
on none. ``ElasticDiLoCo.round`` counts fragment rounds (P per ``sync_every`` steps); the
fragment of round r is ``r mod P`` (a job's rounds run the fragments in order, and every round
commits exactly once).

A death or a partition mid-fragment
-----------------------------------
A member that dies, hangs or loses its links during a fragment round fails that round on the
survivors as fast as in plain elastic DiLoCo (the round watch aborts the group once its
heartbeat stops for ``dead_after_s``; a failed all-reduce names the peer, which is suspected),
never a hang. The survivors vote a redo, restore that fragment's error-feedback residual and
reduce *that fragment only* again among themselves (a new quorum without the dead): the
fragments committed before keep their anchors and momenta, and the fragments still to come
sync at their usual steps. Events (``opt.events``) carry the ``fragment`` of their round.

Joins, and what is in flight at a membership change
---------------------------------------------------
Only ``overlap_steps=0`` is built: a fragment's reduce is awaited and committed inside the
``step()`` that starts it, so at every fragment-round boundary (where membership changes)
nothing is in flight. A joiner (new, restarted, or a worker left out of a round) is taken in at
a fragment round and receives, after that round's commit, the anchors and outer momenta of
*all* fragments (the whole flat buffers: the job's whole shared state), the round and the
step counters; its parameters are set to the anchors of every fragment, with a zero residual
and a fresh inner optimizer. From then on its pseudo-gradient of each fragment counts its own
inner steps since the join. ``overlap_steps > 0`` raises ``NotImplementedError`` at
construction: a reduce still in flight at a membership change would have to be cancelled or
finished by members that may be gone (the fix would be to flush in-flight fragments at a
membership change; not built).

Equalities: on a fixed set of workers (no failure), ``ElasticDiLoCo(fragments=P)`` applies the
updates ``DiLoCo(fragments=P, overlap_steps=0)`` applies on a ``"localsgd"`` group of the same
ranks (the same engine, fragment plan and schedule; tested bit for bit).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..diloco.buffers import FlatBuffer, Segment
from ..diloco.streaming import check_streaming_args, fragment_offsets, plan_fragments


def check_elastic_streaming_args(fragments, overlap_steps, sync_every: int) -> None:
    """``fragments``/``overlap_steps`` of ElasticDiLoCo, each with a message naming the problem
    (``fragments`` larger than the number of parameters is :class:`FragmentSchedule`'s)."""
    if fragments is None:
        if overlap_steps != 0:
            raise ValueError(f"overlap_steps: expected fragments=P to be set (streaming DiLoCo), got "
                             f"overlap_steps={overlap_steps!r} without fragments")
        return
    check_streaming_args(fragments, overlap_steps, None, sync_every, False, None)
    if overlap_steps != 0:
        raise NotImplementedError(
            f"ElasticDiLoCo: streaming with overlap_steps={overlap_steps} is not built yet: a fragment's reduce in "
            "flight across a membership change would have to be finished by members that may be gone. Use "
            "overlap_steps=0 (each fragment round committed inside the step that starts it), or "
            "DiLoCo(fragments=..., overlap_steps=...) for a fixed set of workers")


class FragmentSchedule:
    """The fragments of an elastic worker's flat buffers and the step each one syncs at (the
    rules of :mod:`localsgd_comm.diloco.streaming`, with ``overlap_steps=0``)."""

    def __init__(self, flats: Sequence[FlatBuffer], order: Sequence[torch.nn.Parameter], fragments: int,
                 sync_every: int, align: int):
        self.fragments = fragments
        self.sync_every = sync_every
        self.segments: List[List[Segment]] = plan_fragments(flats, order, fragments, align)
        self.offsets = fragment_offsets(sync_every, fragments)

    def due(self, t: int) -> Optional[int]:
        """The fragment that syncs after inner step ``t`` (counted from 1), or None."""
        h = self.sync_every
        for f, s in enumerate(self.offsets):
            if t % h == s % h:
                return f
        return None

    def numels(self) -> List[int]:
        return [sum(s.numel for s in segs) for segs in self.segments]
