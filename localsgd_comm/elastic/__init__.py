"""Elastic, fault-tolerant DiLoCo: workers may die and join at any time (design: docs/elastic.md).

Every worker is its own process, launched on its own, and finds the others through a store
hosted by a process that is not a worker (``localsgd-coordinator``)::

    localsgd-coordinator --port 29600                       # once, anywhere reachable

    # in every worker (plain `python train.py`, one per machine or cluster):
    opt = localsgd_comm.ElasticDiLoCo(model, torch.optim.AdamW(model.parameters()),
                                      coordinator="10.0.0.1:29600", worker_id="w3",
                                      sync_every=50, min_workers=2)
    while opt.local_step < total_steps:
        x, y = data.batch(opt.worker_index, opt.local_step)
        model(x, y).backward(); opt.step(); opt.zero_grad()
    opt.close()

At every outer round the live workers agree on the round's members through the store; the
compressed all-reduce of the round runs over exactly those members and averages over them. A
worker that dies at any moment is left out and the round is redone among the survivors (nobody
applies a partial update). A new or restarted worker joins at the next round: a live member
sends it anchor, outer momentum and counters over a process group of their own, and from then
on it is bitwise identical to the others. ``stats`` and ``events`` record every membership
change; the ``localsgd_comm.elastic`` logger logs them.

Module buffers (BatchNorm statistics; ``sync_buffers=True``, the default): synced in every round
over its trainers by ``DiLoCo``'s rules (floating ones averaged, others the first trainer's),
inside the round's attempt, so a redo restores them and syncs them again among the survivors; a
joiner receives them with the state. With ``fragments=P`` once per ``sync_every`` steps, in the
last fragment's round.

Streaming (``fragments=P``, ``overlap_steps=TAU``; :mod:`.streaming`): every fragment sync is a
round of its own (its own members and commit); a death mid-fragment redoes that fragment only,
and a joiner receives the anchors and momenta of every fragment. With ``TAU > 0`` (at most
``floor(sync_every / fragments)``) a fragment's all-reduce runs behind the next TAU inner steps
and is voted, committed and merged after them; a failure while it is in flight is redone there.

Fault injection for tests and the faults benchmark: ``LOCALSGD_ELASTIC_KILL=<worker_id>:<round>:
<phase>`` makes that worker SIGKILL itself in round ``round`` at ``phase``: ``inner`` (half way
through the round's inner steps), ``compress`` (pseudo-gradient compressed, nothing sent),
``allreduce`` (its call header sent and the data exchange started), ``commit`` (the all-reduce
done, its vote not yet cast), ``join`` (in the first round from ``round`` on whose members include
a joiner, before the all-reduce). With ``fragments=P`` a round is a fragment round (P per
``sync_every`` steps), and ``inner`` fires at its first inner step that syncs no fragment (never
when ``fragments == sync_every``).
"""
from __future__ import annotations

# By concern: wrapper.py (ElasticDiLoCo: the optimizer, DiLoCo's engine in rounds, replicas of several
# processes), manager.py (membership, commit votes, joins and state transfer, fault injection),
# streaming.py (fragments: a round per fragment sync), store.py (the coordinator's store and the heartbeat).
from .store import CoordinatorUnreachable, connect, job_round, parse_address
from .wrapper import ElasticDiLoCo

__all__ = ["CoordinatorUnreachable", "ElasticDiLoCo", "connect", "job_round", "parse_address"]
