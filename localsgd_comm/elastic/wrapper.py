"""``ElasticDiLoCo``: DiLoCo's outer step (the engine of :mod:`localsgd_comm.diloco.engine`) in
rounds whose members the :class:`~.manager.RoundManager` agrees on; see the package docstring."""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..diloco.buffers import FLOAT_DTYPES, build_buffers, unique_parameters
from ..diloco.collectives import staged_broadcast
from ..diloco.ddp import find_ddp, unwrap_compiled
from ..diloco.engine import OuterConfig, OuterEngine, Reduction
from ..diloco.inner import InnerWrapper, check_outer_args, resolve_block_size
from ..diloco.module_buffers import BufferSync
from ..diloco.streaming import mix_params, resolved_mixing
from .manager import PendingRound, RoundManager
from .streaming import FragmentSchedule, check_elastic_streaming_args


class ElasticDiLoCo(InnerWrapper):
    """DiLoCo whose workers may die and join at any outer round (see the ``localsgd_comm.elastic`` docstring).

    Args:
        model: an ``nn.Module`` (one process per worker; DDP inside a worker is not supported).
        inner_optimizer: an optimizer over the model's parameters.
        coordinator: ``"host:port"`` of the coordinator's store (``localsgd-coordinator``).
        worker_id: this worker's name, unique among live workers; a restarted worker may reuse
            its name (each start is a new incarnation ``id#n``).
        sync_every: inner steps per outer round (H).
        outer_lr, outer_momentum, nesterov, compression, block_size, error_feedback: as DiLoCo.
        min_workers: the fewest members a round may have; below it a worker waits up to
            ``quorum_timeout_s`` for more, then raises.
        initial_workers: how many workers found the job (default ``min_workers``); the first
            ones to start wait for them, later ones join at the next round.
        join_timeout_s: how long a round waits for expected members (the previous round's and
            announced joiners, while alive) before going on without the missing ones.
        timeout_s: bound of every collective and of the commit vote (a hung member).
        dead_after_s: a worker whose heartbeat has not moved for this long is dead.
        heartbeat_s: heartbeat period.
        run_id: namespace in the store (several jobs may share one coordinator).
        replica_group: for a worker that is a cluster of processes (DDP inside, over a fast
            link): the group of its processes. Its rank 0 takes part in the rounds and hands
            each outcome to the others (the reduced bytes, or the whole state after a join); a
            replica whose process dies fails as a whole (its DDP or the hand-over raises) and
            comes back as a whole.
        fragments, overlap_steps, mixing: streaming (:mod:`.streaming`): the model synced in
            ``fragments`` parts staggered over the ``sync_every`` steps (the rules of
            ``DiLoCo(fragments=P, overlap_steps=TAU, mixing=...)``), each fragment sync a round of
            its own (quorum, all-reduce, commit); a death mid-fragment redoes that fragment only.
            ``overlap_steps=TAU > 0``: the fragment's all-reduce runs behind the next TAU inner
            steps, its vote, commit and merge (``mixing``, default 0.5 then, else 0) come after
            them; at most ``floor(sync_every / fragments)`` (and less than ``sync_every``): one
            round in flight at a time. Call :meth:`flush` at the same
            step on every worker before the final evaluation. ``fragments=None`` (default):
            whole-model rounds.
        sync_buffers: in every round (streaming: the round of the last fragment, once per
            ``sync_every`` steps) average the module's floating buffers (BatchNorm statistics)
            over the round's trainers and give the others the first trainer's values, by
            ``DiLoCo``'s rules (:mod:`localsgd_comm.diloco.module_buffers`), as part of the round:
            a redo first restores them. ``False`` leaves each worker's buffers its own (a joiner
            still receives its donor's). Every worker of a job must agree on it.
    """

    _step_supports_amp_scaling = False

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer, *, coordinator: str,
                 worker_id: str, sync_every: int, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 nesterov: bool = True, compression: str = "int8", block_size: Optional[int] = None,
                 error_feedback: bool = False, min_workers: int = 1, join_timeout_s: float = 10.0,
                 quorum_timeout_s: float = 300.0, timeout_s: float = 30.0, dead_after_s: float = 3.0,
                 heartbeat_s: float = 0.5, run_id: str = "run", initial_workers: Optional[int] = None,
                 replica_group=None, overlap: bool = False, fragments: Optional[int] = None,
                 overlap_steps: int = 0, sync_buffers: bool = True, mixing: Optional[float] = None):
        if overlap:
            raise ValueError("ElasticDiLoCo: overlap=True is not supported: the delayed outer step keeps a reduce in "
                             "flight across the round boundary, which a membership change would have to cancel half "
                             "way (use DiLoCo(overlap=True) for a fixed set of workers)")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if any(type(p).__name__ == "DTensor" for p in model.parameters()):
            raise NotImplementedError(
                "ElasticDiLoCo: FSDP2-sharded replicas (DTensor parameters) are not supported yet; use "
                "DiLoCo(model, inner_optimizer, group=mesh.get_group('replicate')) for a fixed set of replicas")
        ddp = find_ddp(model)
        if replica_group is None and ddp is not None:
            raise ValueError("ElasticDiLoCo: got a DistributedDataParallel model but no replica_group: a worker that "
                             "is a cluster of processes passes its DDP group as replica_group (its rank 0 takes part "
                             "in the rounds for all of them)")
        if replica_group is not None:
            if not dist.is_initialized():
                raise RuntimeError("ElasticDiLoCo: replica_group given but torch.distributed is not initialized")
            if ddp is not None and dist.get_world_size(ddp.process_group) != dist.get_world_size(replica_group):
                raise ValueError("ElasticDiLoCo: expected DDP over replica_group (size "
                                 f"{dist.get_world_size(replica_group)}), got a DDP group of size "
                                 f"{dist.get_world_size(ddp.process_group)}")
        check_outer_args(inner_optimizer, sync_every, outer_lr, outer_momentum, compression, error_feedback)
        check_elastic_streaming_args(fragments, overlap_steps, sync_every, mixing)
        if not isinstance(worker_id, str) or not worker_id or any(c in worker_id for c in "#/ "):
            raise ValueError(f"worker_id: expected a non-empty name without '#', '/' or spaces, got {worker_id!r}")
        if isinstance(min_workers, bool) or not isinstance(min_workers, int) or min_workers < 1:
            raise ValueError(f"min_workers: expected an integer >= 1, got {min_workers!r}")
        initial_workers = min_workers if initial_workers is None else initial_workers
        if isinstance(initial_workers, bool) or not isinstance(initial_workers, int) or initial_workers < min_workers:
            raise ValueError(f"initial_workers: expected an integer >= min_workers ({min_workers}), got "
                             f"{initial_workers!r}")
        for name, v in (("join_timeout_s", join_timeout_s), ("quorum_timeout_s", quorum_timeout_s),
                        ("timeout_s", timeout_s), ("dead_after_s", dead_after_s), ("heartbeat_s", heartbeat_s)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: expected a number of seconds > 0, got {v!r}")
        if heartbeat_s * 2 > dead_after_s:
            raise ValueError(f"heartbeat_s: expected at most half of dead_after_s ({dead_after_s}), got {heartbeat_s}")
        block_size = resolve_block_size(block_size)

        self.model = model
        self._wrap(inner_optimizer)
        self.sync_every, self.outer_lr, self.outer_momentum = sync_every, float(outer_lr), float(outer_momentum)
        self.nesterov, self.compression, self.block_size = bool(nesterov), compression, block_size
        self.error_feedback, self.min_workers, self.initial_workers = bool(error_feedback), min_workers, initial_workers
        self.join_timeout_s, self.quorum_timeout_s, self.timeout_s = join_timeout_s, quorum_timeout_s, timeout_s
        self.dead_after_s, self.heartbeat_s = dead_after_s, heartbeat_s
        self.coordinator, self.worker_id = coordinator, worker_id

        module = ddp.module if ddp is not None else unwrap_compiled(model)
        params = [p for p in unique_parameters(module) if p.requires_grad]
        if not params:
            raise ValueError("model: expected at least one parameter with requires_grad=True, got none")
        for p in params:
            if p.dtype not in FLOAT_DTYPES or p.is_sparse or p.device.type not in ("cpu", "cuda"):
                raise TypeError(f"parameters: expected dense float CPU or CUDA parameters, got {p.dtype} on {p.device}")
        self._buffers = [b for b in module.buffers()]
        self.sync_buffers = bool(sync_buffers)
        # module buffers: synced over each round's attempt group (BufferSync without a group of its own)
        self._buffer_sync = BufferSync(module, None) if self.sync_buffers else None
        self._buffers_due = False  # whether the current round syncs them
        self._buffer_backup: Optional[List[torch.Tensor]] = None  # as before the attempt (a redo restores it)
        align = block_size if compression != "none" else 1
        # The outer state lives in host memory whatever the parameters' device: a round's group is
        # made per membership over TCP (gloo), and its collectives, the state transfer to joiners
        # and the hand-over inside a replica then all run on CPU tensors (one copy of the model
        # each way per sync on a GPU worker).
        self._flats = build_buffers(params, state_device="cpu", momentum=self.outer_momentum != 0.0,
                                    residual=self.error_feedback, align=align)
        self._stage = next((f.device for f in self._flats if f.device.type == "cuda"), None)
        self._segments = [f.segment() for f in self._flats]
        # streaming: the fragments and their schedule (None: whole-model rounds)
        self._schedule = (FragmentSchedule(self._flats, params, fragments, sync_every, align)
                          if fragments is not None else None)
        self.fragments, self.overlap_steps = fragments, overlap_steps
        # the merge of a fragment's outer step into its live parameters (streaming's mixing)
        self.mixing = resolved_mixing(mixing, overlap_steps) if fragments is not None else None
        self._in_flight: Optional[_FragmentInFlight] = None  # overlap_steps > 0: the round in flight
        self._started_at = -1  # the local step of the last fragment round started
        self._round_segments = self._segments  # what the current round reduces
        self._engine = OuterEngine(OuterConfig(compression, block_size, self.outer_lr, self.outer_momentum,
                                               self.nesterov))

        self.stats: Dict[str, Any] = {"rounds": 0, "attempts": 0, "redone_rounds": 0, "left": 0, "joined": 0,
                                      "left_out": 0, "recovery_s": 0.0, "bytes_sent": 0, "join_bytes_sent": 0,
                                      "join_bytes_received": 0, "buffer_bytes_sent": 0}
        if fragments is not None:
            # committed fragment rounds per fragment, and redone attempts per fragment
            self.stats["fragment_rounds"] = [0] * fragments
            self.stats["fragment_redos"] = [0] * fragments
        self.events: List[Dict[str, Any]] = []
        self._local_step = 0
        self._replica = replica_group
        self._leader = replica_group is None or dist.get_rank(replica_group) == 0
        self._leader_rank = 0 if replica_group is None else dist.get_global_rank(replica_group, 0)
        replica_rank = 0 if replica_group is None else dist.get_rank(replica_group)
        self._index = 0
        self._manager = RoundManager(
            coordinator=coordinator, worker_id=worker_id, run_id=run_id, replica_rank=replica_rank,
            compression=compression, block_size=block_size, min_workers=min_workers, initial_workers=initial_workers,
            join_timeout_s=join_timeout_s, quorum_timeout_s=quorum_timeout_s, timeout_s=timeout_s,
            dead_after_s=dead_after_s, heartbeat_s=heartbeat_s, stats=self.stats, events=self.events,
            state_tensors=self._state_tensors, local_step=lambda: self._local_step, on_state=self._took_state,
            connected=self._leader, options=self.job_options())
        self._manager.in_flight_steps = overlap_steps
        self.ns = self._manager.ns
        if not self._leader:
            self._receive()  # the leader founds or joins the job, then hands the state over
            if overlap_steps:
                self._advance()  # as the leader (below)
            return
        try:
            self._manager.start()
            if self._replica is not None:
                self._share(None, 0)
            if overlap_steps:
                # a joiner took the state at a round's merge: the donors start the fragment due
                # at that step right after it (the schedule of _advance)
                self._advance()
        except BaseException:
            self.close()  # the heartbeat stops: the others see this worker gone
            raise

    def job_options(self) -> Dict[str, Any]:
        """What every worker of a job must agree on: recorded in the coordinator's store by the
        job's first worker; a worker whose options differ fails in its constructor."""
        from .. import __version__
        return {"compression": self.compression, "block_size": self.block_size, "sync_every": self.sync_every,
                "outer_lr": self.outer_lr, "outer_momentum": self.outer_momentum, "nesterov": self.nesterov,
                "error_feedback": self.error_feedback, "fragments": self.fragments,
                "overlap_steps": self.overlap_steps, "mixing": self.mixing, "sync_buffers": self.sync_buffers,
                "format_version": __version__}

    # ------------------------------------------------------------------ public API
    def step(self, closure=None):
        """One inner step; every ``sync_every`` steps an outer round with the live workers (with
        ``fragments``: each fragment's round at its step of the schedule)."""
        loss = self._inner_step(closure)
        self._local_step += 1
        pos = self._local_step % self.sync_every
        faults = self._manager.faults
        if self._schedule is not None:
            f = self._schedule.due(self._local_step)
            if f is None and faults.armed("inner"):
                faults("inner")  # a fragment round's inner steps: any step that starts no sync
            if self.overlap_steps:
                self._advance()
            elif f is not None:
                self._sync_fragment(f)
            return loss
        if faults.armed("inner") and pos == max(self.sync_every // 2, 1) % self.sync_every:
            faults("inner")
        if pos == 0:
            self.sync()
        return loss

    @property
    def local_step(self) -> int:
        """Inner steps of the job so far (a joiner continues the count it receives)."""
        return self._local_step

    @property
    def round(self) -> int:
        """Outer rounds committed so far."""
        return self._manager.round

    @property
    def members(self) -> List[str]:
        """The members (``id#incarnation``) of the last round."""
        return list(self._manager.members)

    @property
    def me(self) -> str:
        """This worker's key: ``id#incarnation`` (``id/rank`` on a replica's other ranks)."""
        return self._manager.me

    @property
    def max_attempts(self) -> int:
        """Attempts of one round before a worker gives up (each failed attempt drops at least one
        dead member, so only a persistent local failure gets this far)."""
        return self._manager.max_attempts

    @max_attempts.setter
    def max_attempts(self, n: int) -> None:
        self._manager.max_attempts = n

    @property
    def worker_index(self) -> int:
        """This worker's index among the last round's members (e.g. to pick a data shard)."""
        if not self._leader:
            return self._index  # the leader's, received with every round
        members = self._manager.members
        return members.index(self.me) if self.me in members else 0

    def anchors(self) -> List[torch.Tensor]:
        return [f.packed(f.anchor) for f in self._flats]

    def flush(self) -> None:
        """Streaming with ``overlap_steps > 0``: finish the fragment round in flight now (await its
        reduce, vote, commit and merge), as ``DiLoCo.flush()``. Every member must call it at the
        same step (e.g. before evaluating or saving the final model); a no-op when nothing is in
        flight."""
        if self._in_flight is not None:
            self._finish_fragment()

    def close(self) -> None:
        """Leave the job: stop the heartbeat (peers see this worker as gone) and free the group.
        A fragment round still in flight is left unfinished (its other members redo it without
        this worker): call :meth:`flush` first to finish it."""
        self._manager.close()

    # ------------------------------------------------------------------ the round
    def sync(self) -> None:
        """One outer round with the live workers (``step`` calls this every ``sync_every`` steps).
        In a replica of several processes the leader takes part in the round and then hands its
        outcome to the replica's other ranks (``replica_group``)."""
        if self._schedule is not None:
            raise RuntimeError("ElasticDiLoCo.sync(): in streaming mode (fragments=...) each fragment syncs in its own "
                               "round inside step()")
        self._buffers_due = self._buffer_sync is not None
        try:
            if not self._leader:
                self._receive()
                return
            red, p = self._manager.run_round(self._attempt, self._commit, self._abandon)
            if self._replica is not None:
                self._share(red, p)
        finally:
            self._buffers_due, self._buffer_backup = False, None

    def _sync_fragment(self, f: int) -> None:
        """Fragment ``f``'s round (streaming): the round of :meth:`sync` over its segments only."""
        self._round_segments = self._schedule.segments[f]
        self._manager.context = {"fragment": f}
        # module buffers: once per cycle of fragments, in the round of the last one (due when
        # sync_every divides the step), as DiLoCo's streaming syncs them at the end of each cycle
        self._buffers_due = self._buffer_sync is not None and f == self._schedule.fragments - 1
        redos = self.stats["redone_rounds"]
        try:
            if not self._leader:
                self._receive()
                return
            red, p = self._manager.run_round(self._attempt, self._commit, self._abandon)
            if red is not None:  # committed here (not left out and given the whole state)
                self.stats["fragment_rounds"][f] += 1
            if self._replica is not None:
                self._share(red, p)
        finally:
            self.stats["fragment_redos"][f] += self.stats["redone_rounds"] - redos
            self._round_segments = self._segments
            self._manager.context = {}
            self._buffers_due, self._buffer_backup = False, None

    # ------------------------------------------------------------------ streaming with overlap_steps > 0
    def _advance(self) -> None:
        """After an inner step (``overlap_steps > 0``): finish the fragment round due now (await,
        vote, commit, merge), then start the fragment round due at this step, in that order (so
        at most one round is in flight, and none at a round's quorum or commit). A state
        transfer (this worker left out of a round and taken in again) replaces the step counter
        with the donors', taken at a merge: the fragment due at that step is then started here
        as the donors start it after that merge."""
        while True:
            t = self._local_step
            fl = self._in_flight
            if fl is not None and fl.due <= t:
                self._finish_fragment()
                continue
            f = self._schedule.due(t) if t > 0 else None
            if f is None or self._started_at == t:
                return
            self._started_at = t
            self._begin_fragment(f, t)

    def _begin_fragment(self, f: int, t: int) -> None:
        """Fragment ``f``'s round up to its all-reduce, which stays in flight for ``overlap_steps``
        inner steps; a copy of the fragment's parameters as compressed here is kept for a redo."""
        segs = self._schedule.segments[f]
        self._round_segments = segs
        self._manager.context = {"fragment": f}
        self._buffers_due = self._buffer_sync is not None and f == self._schedule.fragments - 1
        redos = self.stats["redone_rounds"]
        if not self._leader:
            # a replica's other rank: the leader's word that the round is in flight, or the state
            # (the leader was left out and taken in again)
            fl = _FragmentInFlight(f, t + self.overlap_steps, None, None, redos)
            self._in_flight = fl
            try:
                kind = self._receive()
            except BaseException:
                self._end_fragment(fl)
                raise
            if kind != 2:
                self._end_fragment(fl)
            return
        with torch.no_grad():
            snapshot = [s.params_on_state_device().clone() for s in segs]
        fl = _FragmentInFlight(f, t + self.overlap_steps, None, snapshot, redos)
        self._in_flight = fl
        done = False
        try:
            fl.pending = self._manager.begin_round(lambda reducer: self._attempt(reducer, async_op=True),
                                                   wait=Reduction.wait)
            done = fl.pending.rejoined
            if self._replica is not None:
                if done:
                    self._share(None, 0)  # this worker's state was replaced
                else:
                    self._rbcast(self._ctrl(2, 0))  # in flight
                    self._rbcast(self._members_bytes())
        except BaseException:
            done = True
            raise
        finally:
            if done:  # left out and taken in again (state replaced), or failed: nothing in flight
                self._end_fragment(fl)

    def _finish_fragment(self) -> None:
        """The round in flight: await its reduce, vote; commit (outer step on the fragment's anchor
        and momentum, then the merge into its live parameters) or redo it synchronously among the
        survivors from the parameters kept at its start."""
        fl = self._in_flight
        try:
            if not self._leader:
                self._receive()  # the reduced bytes the leader committed, or the state
                return
            red, p = self._manager.finish_round(fl.pending, self._commit, self._abandon, self._redo_attempt,
                                                wait=Reduction.wait)
            if red is not None:  # committed here (not left out and given the whole state)
                self.stats["fragment_rounds"][fl.fragment] += 1
            if self._replica is not None:
                self._share(red, p)
        finally:
            self._end_fragment(fl)

    def _end_fragment(self, fl: "_FragmentInFlight") -> None:
        self.stats["fragment_redos"][fl.fragment] += self.stats["redone_rounds"] - fl.redos
        self._in_flight = None
        fl.snapshot = None
        self._round_segments = self._segments
        self._manager.context = {}
        self._buffers_due, self._buffer_backup = False, None

    def _redo_attempt(self, reducer) -> Reduction:
        """A redo of the round in flight, at its merge step: the pseudo-gradient of the round's
        start (``anchor - params`` as they were then, the residual restored by the abandon),
        reduced synchronously; the live parameters are put back after the compression."""
        segs, snap = self._round_segments, self._in_flight.snapshot
        with torch.no_grad():
            live = [s.params_on_state_device().clone() for s in segs]
            for s, x in zip(segs, snap):
                s.write_params(x)
        try:
            return self._attempt(reducer)
        finally:
            with torch.no_grad():
                for s, x in zip(segs, live):
                    s.write_params(x)

    def _attempt(self, reducer, async_op: bool = False) -> Reduction:
        """Compress every buffer's pseudo-gradient and all-reduce it over the round's trainers. A
        redo starts from the same residual (kept here): anchor and parameters are unchanged until
        the commit. Module buffers (when due) are averaged in place over the same trainers first,
        from a backup a redo restores: a failed attempt may have written some of them."""
        self._buffer_backup = None
        if self._buffers_due:
            self._buffer_backup = self._buffer_sync.backup()
            self._buffer_sync.sync(self.stats, measure=False, reducer=reducer)
        red = self._engine.start(self._round_segments, reducer, async_op=async_op, keep_backup=True,
                                 probe=self._manager.faults)
        self.stats["bytes_sent"] += red.bytes_sent
        return red

    def _commit(self, red: Reduction, p: int) -> None:
        self._apply(red)
        self._buffer_backup = None

    def _apply(self, red: Reduction) -> None:
        """The outer step; streaming with ``mixing > 0``: then the merge of the live parameters."""
        if not self.mixing:
            self._engine.apply(red)  # params <- anchor in the fused pass
            return
        self._engine.apply(red, write_params=False)
        mix_params(red.segments, self.mixing)

    def _abandon(self, red: Optional[Reduction]) -> None:
        if red is not None:
            self._engine.restore_residuals(red)
        if self._buffer_backup is not None:  # the buffers as before the failed attempt
            self._buffer_sync.restore(self._buffer_backup)
            self._buffer_backup = None

    # ------------------------------------------------------------------ replicas of several processes
    def _ctrl(self, kind: int, p: int) -> torch.Tensor:
        m = self._manager
        return torch.tensor([kind, m.round, self._local_step, p, self.worker_index,
                             len(json.dumps(m.members).encode())], dtype=torch.int64)

    def _rbcast(self, t: torch.Tensor) -> None:
        staged_broadcast(t, self._leader_rank, self._replica, self._stage)

    def _share(self, red: Optional[Reduction], p: int) -> None:
        """Leader: the round's outcome to the replica's other ranks, over the fast intra link: the
        reduced bytes the leader applied (1 byte per parameter for int8), or the whole state
        (``red`` None: this worker's state was replaced)."""
        self._rbcast(self._ctrl(0 if red is not None else 1, p))
        self._rbcast(self._members_bytes())
        for t in red.tensors() if red is not None else self._state_tensors():
            self._rbcast(t)
        if red is not None and self._buffers_due:  # the module buffers the round synced
            for b in self._buffers:
                self._rbcast(b.data)

    def _members_bytes(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(json.dumps(self._manager.members).encode()), dtype=torch.uint8)

    def _receive(self) -> int:
        """A replica's other rank: the outcome its leader broadcasts (returns its kind: 0 the
        reduced bytes, 1 the whole state, 2 a fragment round started and in flight). If the
        leader died, the broadcast fails and this rank raises: the replica goes down as one and
        rejoins as one."""
        ctrl = self._ctrl(0, 0)
        self._rbcast(ctrl)
        kind, rnd, self._local_step, p, self._index, n = (int(x) for x in ctrl)
        self._manager.round = rnd
        members = torch.empty(n, dtype=torch.uint8)
        self._rbcast(members)
        self._manager.members = json.loads(bytes(members.tolist()).decode())  # the leader's view of the job
        if kind == 2:
            return kind
        if kind == 0:
            red = self._engine.received(self._round_segments, p)
            for t in red.tensors():
                self._rbcast(t)
            self._apply(red)
            if self._buffers_due:
                for b in self._buffers:
                    self._rbcast(b.data)
        else:
            for t in self._state_tensors():
                self._rbcast(t)
            self._took_state(self._local_step, zero_residual=False)
        return kind

    # ------------------------------------------------------------------ state transfer
    def _state_tensors(self) -> List[torch.Tensor]:
        """What a joiner receives: anchor and momentum of every buffer, and the module buffers."""
        out = []
        for f in self._flats:
            out.append(f.anchor)
            if f.momentum is not None:
                out.append(f.momentum)
        return out + [b.data for b in self._buffers]  # module buffers stay where they are (gloo takes CUDA tensors)

    def _took_state(self, local_step: int, zero_residual: bool = True) -> None:
        """This worker's state was replaced: params = anchor (it starts the round like everyone),
        a zero residual and a fresh inner state (docs/elastic.md)."""
        self._local_step = local_step
        for f in self._flats:
            f.write_params(f.anchor)
            if zero_residual and f.residual is not None:
                f.residual.zero_()
        self.inner_optimizer.state.clear()


class _FragmentInFlight:
    """A fragment round left in flight (``overlap_steps > 0``) until its merge step ``due``."""

    def __init__(self, fragment: int, due: int, pending: Optional[PendingRound], snapshot, redos: int):
        self.fragment, self.due, self.pending = fragment, due, pending
        self.snapshot: Optional[List[torch.Tensor]] = snapshot  # the fragment's parameters at the start
        self.redos = redos  # stats["redone_rounds"] at the start
