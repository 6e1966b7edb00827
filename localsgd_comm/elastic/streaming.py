"""Elastic streaming DiLoCo: ``ElasticDiLoCo(..., fragments=P, overlap_steps=TAU, mixing=...)``.

The model is cut into P fragments and each fragment syncs on its own schedule, exactly as in
``DiLoCo(fragments=P, overlap_steps=TAU)`` (the fragment rule, the staggered schedule and the
merge are :mod:`localsgd_comm.diloco.streaming`'s: :func:`~localsgd_comm.diloco.streaming.plan_fragments`,
:func:`~localsgd_comm.diloco.streaming.fragment_offsets`, :func:`~localsgd_comm.diloco.streaming.mix_params`).
What elastic training adds:

Fragment rounds
---------------
Every fragment sync is one *fragment round* of the :class:`~.manager.RoundManager`, with its own
quorum, all-reduce over the round's members and commit vote, exactly like a whole-model round
of plain elastic DiLoCo, over the fragment's segments only. The members that start a fragment
round (its quorum) are the ones that must finish it: the commit applies the fragment's outer
Nesterov step (anchor, momentum, and the merge of the fragment's live parameters) on every
member, or on none. ``ElasticDiLoCo.round`` counts fragment rounds (P per ``sync_every``
steps); the fragment of round r is ``r mod P`` (a job's rounds run the fragments in order, and
every round commits exactly once).

Overlap: a round in flight behind the inner steps
-------------------------------------------------
With ``overlap_steps = 0`` a fragment round runs whole inside the ``step()`` that starts it
(``RoundManager.run_round``). With ``TAU > 0`` it is cut in two: after step ``s_f`` the quorum
and the start of the all-reduce (``RoundManager.begin_round``: the reduce stays in flight, the
round watch keeps watching the members); after step ``s_f + TAU`` the wait, the vote and the
commit (``RoundManager.finish_round``): the outer step on the fragment's anchor and momentum,
then ``params_f <- mixing * params_f + (1 - mixing) * anchor_f`` (``mixing`` 0.5 by default with
TAU > 0, 0 with TAU = 0, as ``DiLoCo``). At one step the round due is finished before the round
due starts. ``TAU <= floor(H / P)`` and ``TAU < H`` are required: at most one round is in
flight, and none at any quorum or commit.

A death or a partition mid-fragment
-----------------------------------
A member that dies, hangs or loses its links during a fragment round fails that round on the
survivors as fast as in plain elastic DiLoCo (the round watch aborts the group once its
heartbeat stops for ``dead_after_s``; a failed all-reduce names the peer, which is suspected;
with a round in flight, a member whose vote is missing at the merge is dead), never a hang. The
survivors vote a redo, restore that fragment's error-feedback residual and reduce *that
fragment only* again among themselves (a new quorum without the dead): the fragments committed
before keep their anchors and momenta, and the fragments still to come sync at their usual
steps. With a round in flight the redo runs at the merge step, synchronously, from the
pseudo-gradient of the round's start: the parameters moved since, so the round keeps a copy of
the fragment's parameters of step ``s_f`` (its numel x the parameter dtype, on the state
device, freed at the commit), put in place for the compression and then replaced by the live
ones again. Events (``opt.events``) carry the ``fragment`` of their round.

Joins, and what is in flight at a membership change
---------------------------------------------------
Membership changes at a round's quorum (members left out, joiners taken in) and at its commit
(joiners receive the state), and there nothing else is in flight (previous section). A joiner
(new, restarted, or a worker left out of a round) receives, after that round's commit, the
anchors and outer momenta of *all* fragments (the whole flat buffers: the job's whole shared
state), the round and the step counters; its parameters are set to the anchors of every
fragment, with a zero residual and a fresh inner optimizer. From then on its pseudo-gradient of
each fragment counts its own inner steps since the join. With ``TAU > 0`` the state is taken at
a merge (step ``t``), after which the members start the fragment due at ``t``: the joiner
starts it too (``ElasticDiLoCo._advance``). A worker of several processes (``replica_group``):
its leader tells the other ranks when a round starts (in flight, or the state when it was
taken in again) and hands them the committed bytes (or the state) at the merge, where they
apply the outer step and the merge to their own, identical, parameters.

Equalities: on a fixed set of workers (no failure), ``ElasticDiLoCo(fragments=P,
overlap_steps=TAU)`` applies the updates ``DiLoCo(fragments=P, overlap_steps=TAU)`` applies on a
``"localsgd"`` group of the same ranks (the same engine, fragment plan, schedule and merge;
tested bit for bit, TAU = 0 and TAU > 0).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..diloco.buffers import FlatBuffer, Segment
from ..diloco.streaming import check_streaming_args, fragment_offsets, plan_fragments


def check_elastic_streaming_args(fragments, overlap_steps, sync_every: int, mixing=None) -> None:
    """``fragments``/``overlap_steps``/``mixing`` of ElasticDiLoCo, each with a message naming the
    problem (``fragments`` larger than the number of parameters is :class:`FragmentSchedule`'s)."""
    if fragments is None:
        if overlap_steps != 0 or mixing is not None:
            what = "overlap_steps" if overlap_steps != 0 else "mixing"
            raise ValueError(f"{what}: expected fragments=P to be set (streaming DiLoCo), got "
                             f"overlap_steps={overlap_steps!r}, mixing={mixing!r} without fragments")
        return
    check_streaming_args(fragments, overlap_steps, mixing, sync_every, False, None)
    if overlap_steps == 0:
        return
    most = max_overlap_steps(sync_every, fragments)
    if overlap_steps > most:
        raise ValueError(
            f"overlap_steps: expected at most {most} with sync_every={sync_every}, fragments={fragments} in "
            f"ElasticDiLoCo (floor(sync_every / fragments), and less than sync_every: one fragment round in flight "
            f"at a time, merged before the next one starts), got {overlap_steps}")


def max_overlap_steps(sync_every: int, fragments: int) -> int:
    """The largest ``overlap_steps`` of elastic streaming: ``floor(H / P)`` (the shortest gap
    between two fragment syncs), and less than ``H`` (with one fragment the reduce is merged
    before the next one starts, never after)."""
    return min(sync_every // fragments, sync_every - 1)


class FragmentSchedule:
    """The fragments of an elastic worker's flat buffers and the step each one syncs at (the
    rules of :mod:`localsgd_comm.diloco.streaming`; a round's merge is ``overlap_steps`` later)."""

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
