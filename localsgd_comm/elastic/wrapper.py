"""``ElasticDiLoCo``: see the package docstring."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import backend as _backend
from .. import _ops
from .. import functional as F
from ..diloco.buffers import _FLOAT_DTYPES, _Flat
from ..diloco.ddp import _find_ddp, _unwrap_compiled
from ..diloco.inner import _check_outer_args, _InnerWrapper
from .group import _Group
from .store import CoordinatorUnreachable, _Heartbeat, _namespace, _Store, connect

log = logging.getLogger("localsgd_comm.elastic")

_PHASES = ("inner", "compress", "allreduce", "commit", "join")


class ElasticDiLoCo(_InnerWrapper):
    """DiLoCo whose workers may die and join at any outer round (see the module docstring).

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
    """

    _step_supports_amp_scaling = False

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer, *, coordinator: str,
                 worker_id: str, sync_every: int, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 nesterov: bool = True, compression: str = "int8", block_size: Optional[int] = None,
                 error_feedback: bool = False, min_workers: int = 1, join_timeout_s: float = 10.0,
                 quorum_timeout_s: float = 300.0, timeout_s: float = 30.0, dead_after_s: float = 3.0,
                 heartbeat_s: float = 0.5, run_id: str = "run", initial_workers: Optional[int] = None,
                 replica_group=None, overlap: bool = False):
        if overlap:
            raise ValueError("ElasticDiLoCo: overlap=True is not supported: the delayed outer step keeps a reduce in "
                             "flight across the round boundary, which a membership change would have to cancel half "
                             "way (use DiLoCo(overlap=True) for a fixed set of workers)")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        ddp = _find_ddp(model)
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
        _check_outer_args(inner_optimizer, sync_every, outer_lr, outer_momentum, compression, error_feedback)
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
        block_size = _ops.DEFAULT_BLOCK_SIZE if block_size is None else block_size
        _ops.check_block_size(block_size)

        self.model = model
        self._wrap(inner_optimizer)
        self.sync_every, self.outer_lr, self.outer_momentum = sync_every, float(outer_lr), float(outer_momentum)
        self.nesterov, self.compression, self.block_size = bool(nesterov), compression, block_size
        self.error_feedback, self.min_workers, self.initial_workers = bool(error_feedback), min_workers, initial_workers
        self.join_timeout_s, self.quorum_timeout_s, self.timeout_s = join_timeout_s, quorum_timeout_s, timeout_s
        self.dead_after_s, self.heartbeat_s = dead_after_s, heartbeat_s
        #: attempts of one round before a worker gives up (each failed attempt drops at least one
        #: dead member, so only a persistent local failure gets this far)
        self.max_attempts = 8
        self.coordinator, self.worker_id = coordinator, worker_id
        self.ns = _namespace(run_id)

        module = ddp.module if ddp is not None else _unwrap_compiled(model)
        seen, params = set(), []
        for p in module.parameters():
            if id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                params.append(p)
        if not params:
            raise ValueError("model: expected at least one parameter with requires_grad=True, got none")
        for p in params:
            if p.dtype not in _FLOAT_DTYPES or p.is_sparse or p.device.type != "cpu":
                raise TypeError(f"parameters: expected dense float CPU parameters, got {p.dtype} on {p.device}")
        self._buffers = [b for b in module.buffers()]
        keys: Dict[tuple, List[nn.Parameter]] = {}
        for p in params:
            keys.setdefault((p.device, p.dtype), []).append(p)
        align = block_size if compression != "none" else 1
        self._flats = [_Flat(ps, None, self.outer_momentum != 0.0, self.error_feedback, align) for ps in keys.values()]

        self.stats: Dict[str, Any] = {"rounds": 0, "attempts": 0, "redone_rounds": 0, "left": 0, "joined": 0,
                                      "left_out": 0, "recovery_s": 0.0, "bytes_sent": 0, "join_bytes_sent": 0,
                                      "join_bytes_received": 0}
        self.events: List[Dict[str, Any]] = []
        self._local_step = 0
        self._round = 0
        self._group: Optional[_Group] = None
        self._backups: List[Optional[torch.Tensor]] = []  # residuals before the round's reduce
        self._replica = replica_group
        self._leader = replica_group is None or dist.get_rank(replica_group) == 0
        self._leader_rank = 0 if replica_group is None else dist.get_global_rank(replica_group, 0)
        self._replica_rank = 0 if replica_group is None else dist.get_rank(replica_group)
        self._index = 0
        self._members: List[str] = []
        self._kill = self._parse_kill(os.environ.get("LOCALSGD_ELASTIC_KILL", ""))
        self.me = f"{worker_id}/{self._replica_rank}"
        if not self._leader:
            self._heartbeat = None
            self._receive()  # the leader founds or joins the job, then hands the state over
            return

        self._store = _Store(connect(coordinator, timeout_s), coordinator)
        inc = self._store.add(f"{self.ns}/incarnation/{worker_id}", 1)
        self.me = f"{worker_id}#{inc}"
        self._heartbeat = _Heartbeat(coordinator, f"{self.ns}/hb/{self.me}", heartbeat_s, timeout_s)
        self._heartbeat.start()
        self._seen_hb: Dict[str, tuple] = {}  # member -> (last counter, when it last moved)
        self._joiner_cursor = 0
        self._known_joiners: List[str] = []
        try:
            self._start()
            if self._replica is not None:
                self._share("state", None, 0)
        except BaseException:
            self.close()  # the heartbeat stops: the others see this worker gone
            raise

    # ------------------------------------------------------------------ public API
    def step(self, closure=None):
        """One inner step; every ``sync_every`` steps an outer round with the live workers."""
        loss = self.inner_optimizer.step(closure) if closure is not None else self.inner_optimizer.step()
        self._local_step += 1
        pos = self._local_step % self.sync_every
        if self._kill and self._kill[2] == "inner" and pos == max(self.sync_every // 2, 1) % self.sync_every:
            self._maybe_kill("inner")
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
        return self._round

    @property
    def members(self) -> List[str]:
        """The members (``id#incarnation``) of the last round."""
        return list(self._members)

    @property
    def worker_index(self) -> int:
        """This worker's index among the last round's members (e.g. to pick a data shard)."""
        if not self._leader:
            return self._index  # the leader's, received with every round
        return self._members.index(self.me) if self.me in self._members else 0

    def anchors(self) -> List[torch.Tensor]:
        return [f.packed(f.anchor) for f in self._flats]

    def close(self) -> None:
        """Leave the job: stop the heartbeat (peers see this worker as gone) and free the group."""
        if self._heartbeat is not None:
            self._heartbeat.stop.set()
            self._heartbeat.join(timeout=5.0)
        if self._group is not None:
            self._group.close()
            self._group = None

    # ------------------------------------------------------------------ store helpers
    def _key(self, r, a, *rest) -> str:
        return "/".join([self.ns, f"r{r}", f"a{a}", *map(str, rest)])

    def _alive(self, member: str) -> bool:
        if member == self.me:
            return True
        v = self._store.get(f"{self.ns}/hb/{member}")
        now = time.monotonic()
        count = -1 if v is None else int(v)
        last = self._seen_hb.get(member)
        if last is None or count != last[0]:
            self._seen_hb[member] = (count, now)
            return True
        return now - last[1] < self.dead_after_s

    def _check_heartbeat(self) -> None:
        if self._heartbeat.error is not None:
            raise CoordinatorUnreachable(f"localsgd elastic: the heartbeat to the coordinator store at "
                                         f"{self.coordinator} failed ({self._heartbeat.error})")

    def _new_joiners(self) -> None:
        n = int(self._store.add(f"{self.ns}/joiners/n", 0))
        while self._joiner_cursor < n:
            self._joiner_cursor += 1
            v = self._store.get(f"{self.ns}/joiners/{self._joiner_cursor}")
            if v is not None:
                self._known_joiners.append(v)

    def _event(self, kind: str, **kw) -> None:
        ev = {"kind": kind, "round": self._round, "time": time.time(), **kw}
        self.events.append(ev)
        log.info("localsgd elastic %s: %s %s", self.me, kind, json.dumps({k: v for k, v in kw.items()}))

    # ------------------------------------------------------------------ fault injection
    def _parse_kill(self, spec: str):
        if not spec:
            return None
        parts = spec.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or parts[2] not in _PHASES:
            raise ValueError(f"LOCALSGD_ELASTIC_KILL: expected '<worker_id>:<round>:<phase>' with a phase of "
                             f"{_PHASES}, got {spec!r}")
        wid, _, rank = parts[0].partition("/")
        mine = wid == self.worker_id and int(rank or 0) == self._replica_rank
        return (parts[0], int(parts[1]), parts[2]) if mine else None

    def _maybe_kill(self, phase: str) -> None:
        if not self._kill or self._kill[2] != phase:
            return
        if self._kill[1] == self._round or (phase == "join" and self._round >= self._kill[1]):
            log.info("localsgd elastic %s: fault injection: SIGKILL in round %d at %s", self.worker_id, self._round,
                     phase)
            os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------------ membership
    def _start(self) -> None:
        """Found the job with the workers present at its start, or join a running one."""
        if self._store.get(f"{self.ns}/started") is None:
            q = self._quorum("init", 0, joining=False, expected_fn=lambda: set())
            if q is not None and self.me in [m["key"] for m in q]:
                members = [m["key"] for m in q]
                self._store.set(f"{self.ns}/started", "1")
                self._transfer("init", 0, members, members[0], members)
                self._members = members
                self._event("founded", members=members)
                return
        self._join()

    def _join(self) -> None:
        """Announce this worker, then take part in round quorums as a joiner until one includes
        it and a member sent it the state."""
        t0 = time.monotonic()
        i = self._store.add(f"{self.ns}/joiners/n", 1)
        self._store.set(f"{self.ns}/joiners/{i}", self.me)
        tried = None
        deadline = time.monotonic() + self.quorum_timeout_s
        while True:
            self._check_heartbeat()
            cur = self._store.get(f"{self.ns}/cursor")
            if cur is None or cur == tried:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"localsgd elastic {self.me}: no round took this worker in within "
                                       f"quorum_timeout_s={self.quorum_timeout_s:g} s (are other workers running?)")
                time.sleep(0.02)
                continue
            tried = cur
            r, a = (int(x) for x in cur.split(":"))
            q = self._quorum(r, a, joining=True, expected_fn=None)
            if q is None:
                continue  # decided without us: the next round
            keys = [m["key"] for m in q]
            trainers = [m["key"] for m in q if not m["joining"]]
            joiners = [m["key"] for m in q if m["joining"]]
            outcome = self._await_outcome(r, a, trainers)
            if outcome != "commit":
                continue  # the round is redone; arrive at its next attempt
            try:
                self._round = r
                self._transfer(r, a, [trainers[0]] + joiners, trainers[0], keys)
            except Exception as exc:  # noqa: BLE001 - the donor died: try the next round
                log.warning("localsgd elastic %s: state transfer in round %d failed (%s); trying the next round",
                            self.me, r, exc)
                continue
            self._members = keys
            self.stats["joined"] += 1
            self._event("joined", members=keys, wait_s=time.monotonic() - t0)
            return

    def _quorum(self, r, a, joining: bool, expected_fn):
        """Arrive at round r attempt a and return the agreed members ([{key, joining}], in order),
        or None when they were decided without this worker."""
        self._check_heartbeat()
        k = self._key(r, a, "members")
        i = self._store.add(self._key(r, a, "n"), 1)
        self._store.set(self._key(r, a, "arr", i), json.dumps({"key": self.me, "joining": joining}))
        t0 = time.monotonic()
        arrived: Dict[str, bool] = {}
        read = 0
        while True:
            v = self._store.get(k)
            if v is not None:
                q = json.loads(v)
                return q if self.me in [m["key"] for m in q] else None
            n = int(self._store.add(self._key(r, a, "n"), 0))
            while read < n:
                read += 1
                m = self._store.get(self._key(r, a, "arr", read))
                if m is not None:
                    m = json.loads(m)
                    arrived[m["key"]] = m["joining"]
                else:
                    read -= 1  # counted but not written yet
                    break
            if expected_fn is not None:
                live = {m for m in expected_fn() if self._alive(m)}
                waited = time.monotonic() - t0
                # joiners do not count towards min_workers: they did not train this round
                need = self.initial_workers if r == "init" else self.min_workers
                enough = sum(1 for j in arrived.values() if not j) >= need
                if enough and (live <= set(arrived) or waited >= self.join_timeout_s):
                    order = sorted(arrived, key=lambda x: (arrived[x], x))  # trainers first, by name
                    proposal = json.dumps([{"key": x, "joining": arrived[x]} for x in order])
                    q = json.loads(self._store.compare_set(k, proposal))
                    return q if self.me in [m["key"] for m in q] else None
                if waited >= self.quorum_timeout_s:
                    what = "initial_workers" if r == "init" else "min_workers"
                    raise RuntimeError(
                        f"localsgd elastic {self.me}: round {r}: {len(arrived)} worker(s) arrived, fewer than "
                        f"{what}={need}, within quorum_timeout_s={self.quorum_timeout_s:g} s")
            elif time.monotonic() - t0 > self.quorum_timeout_s:
                return None
            self._check_heartbeat()
            time.sleep(0.005 if len(arrived) else 0.02)

    def _expected(self) -> set:
        self._new_joiners()
        return set(self._members) | {j for j in self._known_joiners if j not in self._members}

    # ------------------------------------------------------------------ the round
    def sync(self) -> None:
        """One outer round with the live workers (``step`` calls this every ``sync_every`` steps).
        In a replica of several processes the leader takes part in the round and then hands its
        outcome to the replica's other ranks (``replica_group``)."""
        if self._replica is None:
            self._sync_leader()
        elif self._leader:
            self._share(*self._sync_leader())
        else:
            self._receive()

    def _sync_leader(self):
        """The round; returns ("apply", the reduced items, members that trained) or ("state", ...)
        when this worker's state was replaced (it was left out and joined again)."""
        r, a = self._round, 0
        t_fault, t_round = None, time.monotonic()
        reported: set = set()
        applied = (None, 0)
        while True:
            self.stats["attempts"] += 1
            self._store.set(f"{self.ns}/cursor", f"{r}:{a}")
            q = self._quorum(r, a, joining=False, expected_fn=self._expected)
            if q is None:
                # Decided without this worker (it arrived after the join deadline): its round is lost;
                # it comes back as a joiner and receives the state after the round.
                self.stats["left_out"] += 1
                self._event("left_out", attempt=a)
                self._drop_group()
                self._join()
                return "state", None, 0
            keys = [m["key"] for m in q]
            trainers = [m["key"] for m in q if not m["joining"]]
            joiners = [m["key"] for m in q if m["joining"]]
            gone = [m for m in self._members if m not in keys and m not in reported]
            if gone:
                reported.update(gone)
                self.stats["left"] += len(gone)
                self._event("left", who=gone, attempt=a)
                t_fault = t_round
            if joiners:
                self._maybe_kill("join")
            status, pend = "ok", None
            try:
                pend = self._reduce(r, a, trainers)
            except Exception as exc:  # noqa: BLE001 - a member died or hung: vote for a redo
                status = f"failed: {exc}"
                log.warning("localsgd elastic %s: round %d attempt %d: all-reduce failed (%s)", self.me, r, a, exc)
                if a + 1 >= self.max_attempts:
                    # not a membership change: the same failure again and again (a bug, a bad link)
                    self._store.set(self._key(r, a, "vote", self.me), status)
                    raise RuntimeError(f"localsgd elastic {self.me}: round {r} failed {self.max_attempts} times in a "
                                       f"row; the last error: {exc}") from exc
            self._maybe_kill("commit")
            self._store.set(self._key(r, a, "vote", self.me), status)
            outcome = self._await_outcome(r, a, trainers)
            if outcome == "commit" and pend is not None:
                self._apply(pend, len(trainers))
                applied = (pend, len(trainers))
                break
            if outcome == "commit":
                # The others committed a result this worker does not hold: it cannot go on as a member.
                self._drop_group()
                self._event("left_out", attempt=a, why="all-reduce failed here, committed elsewhere")
                self.stats["left_out"] += 1
                self._join()
                return "state", None, 0
            self._restore()
            self._drop_group()
            self.stats["redone_rounds"] += 1
            self._event("redo", attempt=a)
            t_fault = t_round
            a += 1
        if joiners:
            if self.me == trainers[0]:
                try:
                    self._transfer(r, a, [trainers[0]] + joiners, trainers[0], keys)
                except Exception as exc:  # noqa: BLE001 - a joiner died mid transfer: it retries later
                    log.warning("localsgd elastic %s: state transfer to %s failed (%s)", self.me, joiners, exc)
            self.stats["joined"] += len(joiners)
            self._event("joined", who=joiners)
        if self._members and keys != self._members:
            self._event("members", members=keys)
        if t_fault is not None:
            # the whole round's sync, failure detection and redo included
            took = time.monotonic() - t_fault
            self.stats["recovery_s"] += took
            self._event("recovered", seconds=took, members=keys)
        self._members = keys
        self._round = r + 1
        self.stats["rounds"] += 1
        return "apply", applied[0], applied[1]

    # ------------------------------------------------------------------ replicas of several processes
    def _ctrl(self, kind: int, p: int) -> torch.Tensor:
        return torch.tensor([kind, self._round, self._local_step, p, self.worker_index,
                             len(json.dumps(self._members).encode())], dtype=torch.int64)

    def _rbcast(self, t: torch.Tensor) -> None:
        dist.broadcast(t, src=self._leader_rank, group=self._replica)

    def _share(self, kind: str, pend, p: int) -> None:
        """Leader: the round's outcome to the replica's other ranks, over the fast intra link: the
        reduced bytes the leader applied (1 byte per parameter for int8), or the whole state."""
        self._rbcast(self._ctrl(0 if kind == "apply" else 1, p))
        self._rbcast(torch.frombuffer(bytearray(json.dumps(self._members).encode()), dtype=torch.uint8))
        if kind == "apply":
            for it in pend:
                for t in it[1:]:
                    self._rbcast(t)
        else:
            for t in self._state_tensors():
                self._rbcast(t)

    def _receive(self) -> None:
        """A replica's other rank: the outcome its leader broadcasts. If the leader died, the
        broadcast fails and this rank raises: the replica goes down as one and rejoins as one."""
        ctrl = self._ctrl(0, 0)
        self._rbcast(ctrl)
        kind, self._round, self._local_step, p, self._index, n = (int(x) for x in ctrl)
        members = torch.empty(n, dtype=torch.uint8)
        self._rbcast(members)
        self._members = json.loads(bytes(members.tolist()).decode())  # the leader's view of the job
        if kind == 0:
            pend = []
            for f in self._flats:
                if self.compression == "none":
                    g = torch.empty(f.numel, dtype=torch.float32)
                    self._rbcast(g)
                    pend.append(("none", g))
                else:
                    payload = torch.empty(_ops.payload_bytes(self.compression, f.numel), dtype=torch.uint8)
                    scales = torch.empty(_ops.num_blocks(f.numel, self.block_size), dtype=torch.float32)
                    self._rbcast(payload)
                    self._rbcast(scales)
                    pend.append(("q", payload, scales))
            self._apply(pend, p)
        else:
            for t in self._state_tensors():
                self._rbcast(t)
            for f in self._flats:
                f.write_params(f.anchor)
            self.inner_optimizer.state.clear()

    def _await_outcome(self, r, a, trainers: List[str]) -> str:
        """Every member's vote, or a dead or silent member: one outcome for all (compare_set)."""
        k = self._key(r, a, "outcome")
        t0 = time.monotonic()
        while True:
            v = self._store.get(k)
            if v is not None:
                return v
            votes = {t: self._store.get(self._key(r, a, "vote", t)) for t in trainers}
            proposal = None
            if any(v is not None and v != "ok" for v in votes.values()):
                proposal = "redo"
            elif all(v == "ok" for v in votes.values()):
                proposal = "commit"
            elif any(v is None and not self._alive(t) for t, v in votes.items()):
                proposal = "redo"
            elif time.monotonic() - t0 > self.timeout_s:
                proposal = "redo"
            if proposal is not None:
                return self._store.compare_set(k, proposal)
            self._check_heartbeat()
            time.sleep(0.005)

    def _drop_group(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None

    def _group_for(self, r, a, members: List[str]) -> _Group:
        if self._group is not None and self._group.members == members and not self._group.backend.failure():
            return self._group
        self._drop_group()
        self._group = _Group(self._store.raw, self._key(r, a, "pg") + "/", members, self.me, self.timeout_s,
                             self.compression, self.block_size)
        return self._group

    def _reduce(self, r, a, trainers: List[str]):
        """Compress every flat buffer's pseudo-gradient and all-reduce it over the trainers."""
        # A redo starts from the same residual: anchor and parameters are unchanged until commit.
        self._backups = [f.residual.clone() if f.residual is not None else None for f in self._flats]
        g = self._group_for(r, a, trainers)
        pend = []
        for f in self._flats:
            if self.compression == "none":
                delta = f.anchor - f.flat.float()
                self._maybe_kill("compress")
                self._fp32_sum(g, delta)
                pend.append(("none", delta))
            else:
                payload, scales = F.compress_delta(f.anchor, f.flat, f.residual, self.compression, self.block_size)
                self._maybe_kill("compress")
                work = g.backend.allreduce_compressed(payload, scales, f.numel, _backend._FORMAT_CODES[self.compression],
                                                      self.block_size, True, -1)
                if self._kill and self._kill[2] == "allreduce":
                    time.sleep(0.001)  # the header is out and the worker thread is moving data
                    self._maybe_kill("allreduce")
                work.wait()
                pend.append(("q", payload, scales))
            self.stats["bytes_sent"] += int(2 * (g.size - 1) * F.compressed_nbytes(self.compression, f.numel,
                                                                                      self.block_size) / g.size)
        return pend

    def _fp32_sum(self, g: _Group, buf: torch.Tensor) -> None:
        """Exact fp32 SUM of buf over the group, the same bytes on every member (as DiLoCo's:
        all-to-all of the chunks, owner sums in rank order, all-gather)."""
        p, n = g.size, buf.numel()
        chunk = -(-n // p)
        padded = torch.zeros(chunk * p, dtype=buf.dtype)
        padded[:n].copy_(buf)
        received = torch.empty_like(padded)
        work = g.backend.alltoall_base(received, padded, [], [], dist.AllToAllOptions())
        if self._kill and self._kill[2] == "allreduce":
            self._maybe_kill("allreduce")
        work.wait()
        parts = received.view(p, chunk)
        mine = parts[0].clone()
        for i in range(1, p):
            mine.add_(parts[i])
        g.backend._allgather_base(padded, mine, torch._C._distributed_c10d.AllgatherOptions()).wait()
        buf.copy_(padded[:n])

    def _restore(self) -> None:
        for f, backup in zip(self._flats, self._backups):
            if backup is not None:
                f.residual.copy_(backup)

    def _apply(self, pend, p: int) -> None:
        for f, it in zip(self._flats, pend):
            mom = f.momentum
            if it[0] == "none":
                g = it[1] / p  # SUM -> AVG: one IEEE division, identical on every member (it[1] is shared as is)
                F.outer_nesterov_step(f.anchor, mom, f.flat, g, self.outer_lr, self.outer_momentum, self.nesterov)
            else:
                F.outer_nesterov_step_compressed(f.anchor, mom, f.flat, it[1], it[2], self.compression,
                                                 self.block_size, 1.0, self.outer_lr, self.outer_momentum,
                                                 self.nesterov)

    # ------------------------------------------------------------------ state transfer
    def _state_tensors(self) -> List[torch.Tensor]:
        out = []
        for f in self._flats:
            out.append(f.anchor)
            if f.momentum is not None:
                out.append(f.momentum)
        return out + [b.data for b in self._buffers]

    def _transfer(self, r, a, group: List[str], donor: str, members: List[str]) -> None:
        """The donor broadcasts anchor, momentum, buffers and counters to the rest of ``group``."""
        if len(group) == 1:
            return
        g = _Group(self._store.raw, self._key(r, a, "xfer") + "/", group, self.me, self.timeout_s, "none",
                   self.block_size)
        try:
            root = group.index(donor)
            counters = torch.tensor([self._round + (0 if r == "init" else 1), self._local_step], dtype=torch.int64)
            nbytes = 0
            for t in [counters] + self._state_tensors():
                g.backend.broadcast(t, root).wait()
                nbytes += t.numel() * t.element_size()
            if self.me == donor:
                self.stats["join_bytes_sent"] += nbytes * (len(group) - 1)
            else:
                self.stats["join_bytes_received"] += nbytes
                self._round, self._local_step = int(counters[0]), int(counters[1])
                for f in self._flats:
                    f.write_params(f.anchor)  # params = anchor: the joiner starts the round like everyone
                    if f.residual is not None:
                        f.residual.zero_()
                self.inner_optimizer.state.clear()  # fresh inner state (docs/elastic.md)
        finally:
            g.close()
