"""Membership and commit of elastic DiLoCo's outer rounds, apart from the algorithm.

:class:`RoundManager` runs the protocol of docs/elastic.md through the coordinator's store:
founding the job, the quorum of every round attempt, liveness by heartbeat, the commit vote
(commit, or redo the round without the dead), joins at round boundaries and the state transfer
to joiners. What a round computes is the caller's: :meth:`RoundManager.run_round` takes the
attempt (given a group over the round's trainers), what to do on commit and what to undo on a
redo, and the state transfer moves whatever tensors the caller names. The engine's reduce is
one such attempt; a fragment of a streaming sync would be another.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from .. import backend as _backend
from ..diloco.collectives import BackendReducer
from .store import CoordinatorStore, CoordinatorUnreachable, Heartbeat, connect, namespace

log = logging.getLogger("localsgd_comm.elastic")


class _DefaultStderr(logging.StreamHandler):
    """Membership changes on stderr by default, one line each, as torch's own distributed
    warnings are: this handler writes only while the application has configured no logging
    (the root logger has no handler); once it has, the records go through its handlers instead.
    ``logging.getLogger("localsgd_comm.elastic").setLevel(logging.WARNING)`` silences them."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        self.stream = sys.stderr  # the stderr of now (tests and launchers replace it)
        super().emit(record)


if not any(isinstance(h, _DefaultStderr) for h in log.handlers):
    log.addHandler(_DefaultStderr())
if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)

PHASES = ("inner", "compress", "allreduce", "commit", "join")


class FaultInjection:
    """``LOCALSGD_ELASTIC_KILL=<worker_id>[/<replica rank>]:<round>:<phase>``: this process
    SIGKILLs itself in that round at that phase (``join``: in the first round from ``round`` on
    that takes a joiner in). Called as a probe with the phase reached."""

    def __init__(self, spec: str, worker_id: str, replica_rank: int, round_fn: Callable[[], Any]):
        self.kill = None
        self._round = round_fn
        if not spec:
            return
        parts = spec.split(":")
        if len(parts) == 3:
            parts.append("kill")
        if len(parts) != 4 or not parts[1].isdigit() or parts[2] not in PHASES or parts[3] not in ("kill", "stop", "cut"):
            raise ValueError(f"LOCALSGD_ELASTIC_KILL: expected '<worker_id>:<round>:<phase>[:stop|:cut]' with a phase of "
                             f"{PHASES}, got {spec!r}")
        wid, _, rank = parts[0].partition("/")
        if wid == worker_id and int(rank or 0) == replica_rank:
            self.kill = (parts[0], int(parts[1]), parts[2], parts[3])

    def armed(self, phase: str) -> bool:
        return self.kill is not None and self.kill[2] == phase and self.kill[3] != "cut"

    def cut(self) -> bool:
        """``<id>:<round>:allreduce:cut``: from that round on this worker reaches the coordinator
        but none of its peers (its round collectives and state transfers fail on its side; its
        peers wait for it until their timeout, naming it)."""
        return self.kill is not None and self.kill[3] == "cut" and self._round() >= self.kill[1]

    def __call__(self, phase: str) -> None:
        if not self.armed(phase):
            return
        if phase == "allreduce":
            time.sleep(0.001)  # the header is out and the worker thread is moving data
        r = self._round()
        if self.kill[1] == r or (phase == "join" and r >= self.kill[1]):
            # ":stop": SIGSTOP, a hung process (its heartbeat and its sockets stay as they are)
            sig = signal.SIGSTOP if self.kill[3] == "stop" else signal.SIGKILL
            log.info("localsgd elastic %s: fault injection: %s in round %d at %s", self.kill[0], sig.name, r, phase)
            os.kill(os.getpid(), sig)


class RoundWatch(threading.Thread):
    """While the training thread is inside a round's collectives: reads the heartbeats of the
    round's other trainers (on a store connection of its own) and aborts the round's group as
    soon as one has not moved for ``dead_after_s``, so a hung member (paused, swapping, a stuck
    device) costs about ``dead_after_s`` instead of the collective's ``timeout_s``."""

    def __init__(self, store, ns: str, members: List[str], dead_after_s: float, period: float, abort: Callable,
                 outcome_key: str = ""):
        super().__init__(name="localsgd-elastic-round-watch", daemon=True)
        self.store, self.ns, self.members, self.outcome_key = store, ns, list(members), outcome_key
        self.dead_after_s, self.period, self._abort = dead_after_s, period, abort
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.reason: Optional[str] = None

    def run(self) -> None:
        seen: Dict[str, tuple] = {}
        while not self.done.wait(self.period):
            now = time.monotonic()
            try:  # the attempt was already voted a redo (another member's failed): no use waiting here
                redo = self.outcome_key and self.store.check([self.outcome_key]) and \
                    self.store.get(self.outcome_key) == b"redo"
            except Exception:  # noqa: BLE001
                return
            if redo:
                self._trip("the attempt was voted a redo elsewhere")
                return
            for m in self.members:
                try:
                    v = self.store.get(f"{self.ns}/hb/{m}") if self.store.check([f"{self.ns}/hb/{m}"]) else b"-1"
                except Exception:  # noqa: BLE001 - the coordinator is gone: the training thread reports it
                    return
                last = seen.get(m)
                if last is None or last[0] != v:
                    seen[m] = (v, now)
                elif now - last[1] >= self.dead_after_s:
                    self._trip(f"{m} stopped heartbeating ({now - last[1]:.1f} s without a beat)")
                    return

    def _trip(self, reason: str) -> None:
        with self.lock:
            if self.done.is_set():
                return
            self.reason = reason
            self.done.set()
        log.warning("localsgd elastic: %s: aborting the round's group", reason)
        self._abort()

    def finish(self) -> None:
        with self.lock:
            self.done.set()


class MemberGroup:
    """A localsgd backend over the members of one attempt (gloo underneath), outside torch's
    group registry."""

    def __init__(self, store, prefix: str, members: List[str], me: str, timeout_s: float, fmt: str, block: int):
        self.members = list(members)
        self.rank, self.size = self.members.index(me), len(self.members)
        opts = _backend.BackendOptions(format=fmt, block_size=block, threshold_bytes=0, cuda_inner="gloo",
                                       check_calls=True).resolved()
        self.backend = _backend.detached_backend(dist.PrefixStore(prefix, store), self.rank, self.size,
                                                 timedelta(seconds=timeout_s), opts)

    def reducer(self) -> BackendReducer:
        return BackendReducer(self.backend, self.size)

    def close(self) -> None:
        b, self.backend = self.backend, None
        if b is not None:
            _backend.release_detached_backend(b)


class PendingRound:
    """A round between :meth:`RoundManager.begin_round` and :meth:`RoundManager.finish_round`:
    its number, current attempt, members, and the attempt's status and result."""

    def __init__(self, r: int, t_round: float):
        self.r, self.a, self.t_round = r, 0, t_round
        self.keys: List[str] = []
        self.trainers: List[str] = []
        self.joiners: List[str] = []
        self.reported: set = set()  # members already reported gone
        self.status: str = "ok"
        self.result: Any = None
        self.watch: Optional[RoundWatch] = None
        self.rejoined = False  # left out: this worker joined again (its state was replaced)
        self.fault = False  # a member left or an attempt was redone
        self.sync_s = 0.0  # seconds spent in begin_round


class RoundManager:
    """The calling worker's view of the job: members, round, and the protocol that changes them.

    The state callbacks: ``state_tensors()`` lists the tensors a joiner receives (the same shapes
    on every worker), ``local_step()`` the step counter sent along, ``on_state(local_step)`` is
    called on a worker whose state was just replaced by a transfer. ``stats`` and ``events`` are
    shared with the caller. ``connected=False``: a rank of a multi-process worker other than its
    leader, which takes no part in the protocol (its leader sets ``round`` and ``members``)."""

    def __init__(self, *, coordinator: str, worker_id: str, run_id: str, replica_rank: int, compression: str,
                 block_size: int, min_workers: int, initial_workers: int, join_timeout_s: float,
                 quorum_timeout_s: float, timeout_s: float, dead_after_s: float, heartbeat_s: float,
                 stats: Dict[str, Any], events: List[Dict[str, Any]],
                 state_tensors: Callable[[], List[torch.Tensor]], local_step: Callable[[], int],
                 on_state: Callable[[int], None], connected: bool = True,
                 options: Optional[Dict[str, Any]] = None):
        self.coordinator, self.worker_id, self.ns = coordinator, worker_id, namespace(run_id)
        self.compression, self.block_size = compression, block_size
        self.min_workers, self.initial_workers = min_workers, initial_workers
        self.join_timeout_s, self.quorum_timeout_s, self.timeout_s = join_timeout_s, quorum_timeout_s, timeout_s
        self.dead_after_s = dead_after_s
        #: attempts of one round before a worker gives up (each failed attempt drops at least one
        #: dead member, so only a persistent local failure gets this far)
        self.max_attempts = 8
        self.stats, self.events = stats, events
        self._state_tensors, self._local_step, self._on_state = state_tensors, local_step, on_state
        self.round = 0
        #: added to every event (streaming: the fragment of the current round)
        self.context: Dict[str, Any] = {}
        #: inner steps a round stays in flight between begin_round and finish_round (streaming
        #: with overlap_steps): a joiner waits that much longer for the round's votes
        self.in_flight_steps = 0
        self.members: List[str] = []
        self.me = f"{worker_id}/{replica_rank}"
        self.faults = FaultInjection(os.environ.get("LOCALSGD_ELASTIC_KILL", ""), worker_id, replica_rank,
                                     lambda: self.round)
        self._group: Optional[MemberGroup] = None
        self._heartbeat: Optional[Heartbeat] = None
        if not connected:
            return
        self._store = CoordinatorStore(connect(coordinator, timeout_s), coordinator)
        if options is not None:
            self._agree_options(options)
        inc = self._store.add(f"{self.ns}/incarnation/{worker_id}", 1)
        self.me = f"{worker_id}#{inc}"
        self.incarnation = inc
        self._latest_inc: Dict[str, int] = {}
        self._heartbeat = Heartbeat(coordinator, f"{self.ns}/hb/{self.me}", heartbeat_s, timeout_s)
        self._heartbeat.start()
        self._seen_hb: Dict[str, tuple] = {}  # member -> (last counter, when it last moved)
        self._joiner_cursor = 0
        self._watch_store = None  # the round watch's own connection (made at the first round)
        self._prev_attempt = None  # (round, attempt, trainers) of the last failed attempt
        self._known_joiners: List[str] = []

    def _agree_options(self, options: Dict[str, Any]) -> None:
        """The job's options are recorded in the store by its first worker (compare_set); a
        worker whose options differ raises here, in its constructor, naming each difference,
        before it takes any part in the job (the others never see it)."""
        mine = json.dumps(options, sort_keys=True)
        job = json.loads(self._store.compare_set(f"{self.ns}/options", mine))
        diffs = [f"{k}={options.get(k)!r} (the job's: {job.get(k)!r})"
                 for k in sorted(set(job) | set(options)) if job.get(k) != options.get(k)]
        if diffs:
            raise ValueError(f"localsgd elastic {self.worker_id}: options differ from the job's, recorded in the "
                             f"coordinator's store by its first worker (run_id {self.ns.rsplit('/', 1)[-1]!r}): "
                             + "; ".join(diffs) + ". Start this worker with the job's options (or another run_id)")

    def close(self) -> None:
        """Leave the job: stop the heartbeat (peers see this worker as gone) and free the group."""
        if self._heartbeat is not None:
            self._heartbeat.stop.set()
            self._heartbeat.join(timeout=5.0)
        w = getattr(self, "_last_watch", None)
        if w is not None:
            w.finish()
            w.join(timeout=5.0)
        self._drop_group()

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

    def _latest_incarnation(self, worker_id: str) -> int:
        return int(self._store.add(f"{self.ns}/incarnation/{worker_id}", 0))

    def _stale(self, key: str) -> bool:
        """Whether ``key`` (``id#n``) is an older incarnation than the worker id's latest start."""
        wid, sep, n = key.rpartition("#")
        if not sep or not n.isdigit():
            return False
        if int(n) < self._latest_inc.get(wid, 0):
            return True
        self._latest_inc[wid] = self._latest_incarnation(wid)
        return int(n) < self._latest_inc[wid]

    def _check_current(self) -> None:
        """A worker whose id was started again (it hung, and its restart joined) is turned away."""
        latest = self._latest_incarnation(self.worker_id)
        if latest > self.incarnation:
            raise RuntimeError(
                f"localsgd elastic {self.me}: this worker is a stale incarnation: worker id {self.worker_id!r} was "
                f"started again since (incarnation {self.worker_id}#{latest}), so this process is no longer a member "
                "and is not admitted again (it hung or was paused while its restart joined); stop it")

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

    def event(self, kind: str, **kw) -> None:
        ev = {"kind": kind, "round": self.round, "time": time.time(), **self.context, **kw}
        self.events.append(ev)
        log.info("localsgd elastic %s: %s %s", self.me, kind, json.dumps({**self.context, **kw}))

    # ------------------------------------------------------------------ membership
    def start(self) -> None:
        """Found the job with the workers present at its start, or join a running one."""
        if self._store.get(f"{self.ns}/started") is None:
            q = self._quorum("init", 0, joining=False, expected_fn=lambda: set())
            if q is not None and self.me in [m["key"] for m in q]:
                members = [m["key"] for m in q]
                self._store.set(f"{self.ns}/started", "1")
                self._transfer("init", 0, members, members[0], members)
                self.members = members
                self.event("founded", members=members)
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
            # a round left in flight votes overlap steps after its quorum: a joiner waits for it
            # (its trainers' votes, or a dead trainer) up to quorum_timeout_s longer
            outcome = self._await_outcome(r, a, trainers,
                                          self.timeout_s + (self.quorum_timeout_s if self.in_flight_steps else 0))
            if outcome != "commit":
                continue  # the round is redone; arrive at its next attempt
            try:
                self.round = r
                self._transfer(r, a, [trainers[0]] + joiners, trainers[0], keys)
            except Exception as exc:  # noqa: BLE001 - the donor died: try the next round
                log.warning("localsgd elastic %s: state transfer in round %d failed (%s); trying the next round",
                            self.me, r, exc)
                continue
            self.members = keys
            self.stats["joined"] += 1
            self.event("joined", members=keys, wait_s=time.monotonic() - t0)
            return

    def _quorum(self, r, a, joining: bool, expected_fn):
        """Arrive at round r attempt a and return the agreed members ([{key, joining}], in order),
        or None when they were decided without this worker."""
        self._check_heartbeat()
        self._check_current()
        k = self._key(r, a, "members")
        i = self._store.add(self._key(r, a, "n"), 1)
        self._store.set(self._key(r, a, "arr", i), json.dumps({"key": self.me, "joining": joining}))
        t0 = time.monotonic()
        arrived: Dict[str, bool] = {}
        read = 0
        # joiners that failed their transfer recently, and (read when proposing, once every live
        # trainer of the failed attempt arrived, so its accusation is in) the previous attempt's suspects
        blocked: set = set()
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
                    if self._stale(m["key"]):  # an older copy of a restarted worker: never admitted
                        pass
                    elif m["key"] in blocked or (m["joining"] and self._quarantined(m["key"], r)):
                        blocked.add(m["key"])
                    else:
                        arrived[m["key"]] = m["joining"]
                else:
                    read -= 1  # counted but not written yet
                    break
            if expected_fn is not None:
                live = {m for m in expected_fn() if m not in blocked and self._alive(m)}
                waited = time.monotonic() - t0
                # joiners do not count towards min_workers: they did not train this round
                need = self.initial_workers if r == "init" else self.min_workers
                enough = sum(1 for j in arrived.values() if not j) >= need
                if enough and (live <= set(arrived) or waited >= self.join_timeout_s):
                    suspects = self._suspects() - blocked
                    if suspects:
                        self.event("suspected", who=sorted(suspects), attempt=a)
                        arrived = {x: j for x, j in arrived.items() if x not in suspects}
                        blocked |= suspects
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
        def stale(k):  # known from arrivals read so far (no store call in this loop)
            wid, _, n = k.rpartition("#")
            return n.isdigit() and int(n) < self._latest_inc.get(wid, 0)
        return set(self.members) | {j for j in self._known_joiners if j not in self.members and not stale(j)}

    # ------------------------------------------------------------------ the round
    def run_round(self, attempt: Callable[[BackendReducer], Any], commit: Callable[[Any, int], None],
                  abandon: Callable[[Any], None]):
        """One outer round with the live workers. For every attempt: the quorum, then
        ``attempt(reducer)`` over the attempt's trainers (an exception is a failed attempt), the
        vote, and on a commit ``commit(result, number of trainers)``; on a redo ``abandon(result)``
        (None when the attempt failed) and the next attempt without the dead. Returns
        ``(result, number of trainers)`` as committed, or ``(None, 0)`` when this worker was left
        out of the round and joined again (its state was replaced by a transfer)."""
        return self.finish_round(self.begin_round(attempt), commit, abandon, attempt)

    def begin_round(self, attempt: Callable[[BackendReducer], Any],
                    wait: Optional[Callable[[Any], None]] = None) -> "PendingRound":
        """The first half of :meth:`run_round`: the quorum of the round's first attempt and
        ``attempt(reducer)``. With ``wait`` the attempt may leave its collectives in flight: the
        round watch keeps watching the trainers until :meth:`finish_round` calls ``wait(result)``
        (an exception there fails the attempt), then votes. Nothing else of the protocol may run
        in between (one round at a time). A worker left out of the round has joined again on
        return (``PendingRound.rejoined``; its state was replaced)."""
        rnd = PendingRound(self.round, time.monotonic())
        self._begin_attempt(rnd, attempt, wait)
        rnd.sync_s += time.monotonic() - rnd.t_round
        return rnd

    def finish_round(self, rnd: "PendingRound", commit: Callable[[Any, int], None], abandon: Callable[[Any], None],
                     attempt: Callable[[BackendReducer], Any], wait: Optional[Callable[[Any], None]] = None):
        """The second half of :meth:`run_round`: ``wait(result)`` (when given), the vote, the
        commit or the redo (every further attempt: ``attempt(reducer)``, synchronous), the
        state transfer to the round's joiners. Returns as :meth:`run_round`."""
        if rnd.rejoined:
            return None, 0
        t_finish = time.monotonic()
        while True:
            self._end_attempt(rnd, wait)
            r, a, trainers = rnd.r, rnd.a, rnd.trainers
            self.faults("commit")
            self._store.set(self._key(r, a, "vote", self.me), rnd.status)
            outcome = self._await_outcome(r, a, trainers)
            if outcome == "commit" and rnd.status == "ok":
                commit(rnd.result, len(trainers))
                break
            if outcome == "commit":
                # The others committed a result this worker does not hold: it cannot go on as a member.
                return self._rejoin(attempt=a, why="all-reduce failed here, committed elsewhere")
            abandon(rnd.result)
            self._drop_group()
            self._prev_attempt = (r, a, trainers)  # its accusations pick the next attempt's suspects
            self.stats["redone_rounds"] += 1
            self.event("redo", attempt=a)
            rnd.fault = True
            rnd.a += 1
            self._begin_attempt(rnd, attempt, None)
            if rnd.rejoined:
                return None, 0
        r, a, trainers, joiners, keys = rnd.r, rnd.a, rnd.trainers, rnd.joiners, rnd.keys
        self._prev_attempt = None
        if joiners:
            # The transfer is the joiners' connectivity check: they become members only if it
            # went through (the donor publishes the outcome; a joiner it failed for sits out the
            # next rounds, then tries again).
            xfer = self._key(r, a, "xfer_ok")
            if self.me == trainers[0]:
                ok = "1"
                try:
                    self._transfer(r, a, [trainers[0]] + joiners, trainers[0], keys)
                except Exception as exc:  # noqa: BLE001 - a joiner died or cannot reach us: it retries later
                    ok = "0"
                    log.warning("localsgd elastic %s: state transfer to %s failed (%s)", self.me, joiners, exc)
                    for j in joiners:
                        self._store.set(f"{self.ns}/quarantine/{j}", str(r + 2))
                self._store.set(xfer, ok)
            else:
                ok = self._await_key(xfer, trainers[0])
            if ok != "1":
                keys = [k for k in keys if k not in joiners]
                self.event("join_failed", who=joiners)
            else:
                self.stats["joined"] += len(joiners)
                self.event("joined", who=joiners)
        if self.members and keys != self.members:
            self.event("members", members=keys)
        if rnd.fault:
            # the whole round's sync, failure detection and redo included (with a round left in
            # flight: the time spent in begin_round and finish_round, not the inner steps between)
            took = rnd.sync_s + time.monotonic() - t_finish
            self.stats["recovery_s"] += took
            self.event("recovered", seconds=took, members=keys)
        self.members = keys
        self.round = r + 1
        self.stats["rounds"] += 1
        return rnd.result, len(trainers)

    def _begin_attempt(self, rnd: "PendingRound", attempt, wait) -> None:
        """Attempt ``rnd.a``: the quorum and ``attempt(reducer)`` (a failure recorded in
        ``rnd.status``); with ``wait`` the round watch keeps running for :meth:`_end_attempt`."""
        r, a = rnd.r, rnd.a
        self.stats["attempts"] += 1
        self._store.set(f"{self.ns}/cursor", f"{r}:{a}")
        q = self._quorum(r, a, joining=False, expected_fn=self._expected)
        if q is None:
            # Decided without this worker (it arrived after the join deadline): its round is lost;
            # it comes back as a joiner and receives the state after the round.
            self._rejoin(attempt=a)
            rnd.rejoined = True
            return
        rnd.keys = [m["key"] for m in q]
        rnd.trainers = [m["key"] for m in q if not m["joining"]]
        rnd.joiners = [m["key"] for m in q if m["joining"]]
        gone = [m for m in self.members if m not in rnd.keys and m not in rnd.reported]
        if gone:
            rnd.reported.update(gone)
            self.stats["left"] += len(gone)
            self.event("left", who=gone, attempt=a)
            rnd.fault = True
        if rnd.joiners:
            self.faults("join")
        rnd.status, rnd.result, rnd.watch = "ok", None, None
        try:
            if self.faults.cut():
                raise RuntimeError("fault injection: no link to the peers")
            group = self._group_for(r, a, rnd.trainers)
            self._store_key_outcome = self._key(r, a, "outcome")
            rnd.watch = self._watch(group, rnd.trainers)
            try:
                rnd.result = attempt(group.reducer())
            except BaseException:
                rnd.watch.finish()
                raise
            if wait is None:
                rnd.watch.finish()
        except Exception as exc:  # noqa: BLE001 - a member died or hung: vote for a redo
            self._attempt_failed(rnd, exc)

    def _end_attempt(self, rnd: "PendingRound", wait) -> None:
        """``wait(result)`` for an attempt left in flight (its failure recorded), then the
        accusation of a failed attempt."""
        if rnd.status == "ok" and wait is not None:
            try:
                try:
                    wait(rnd.result)
                finally:
                    rnd.watch.finish()
            except Exception as exc:  # noqa: BLE001 - a member died or hung while it was in flight
                self._attempt_failed(rnd, exc)
        if rnd.status != "ok":
            self._accuse(rnd.r, rnd.a, rnd.trainers, rnd.status)

    def _attempt_failed(self, rnd: "PendingRound", exc: Exception) -> None:
        r, a = rnd.r, rnd.a
        rnd.status = f"failed: {exc}"
        if rnd.watch is not None and rnd.watch.reason is not None:
            rnd.status = f"failed: {rnd.watch.reason} (the round's group was aborted: {exc})"
            exc = RuntimeError(rnd.status[len("failed: "):])
        log.warning("localsgd elastic %s: round %d attempt %d: all-reduce failed (%s)", self.me, r, a, exc)
        if a + 1 >= self.max_attempts:
            # not a membership change: the same failure again and again (a bug, a bad link)
            self._store.set(self._key(r, a, "vote", self.me), rnd.status)
            raise RuntimeError(f"localsgd elastic {self.me}: round {r} failed {self.max_attempts} times in a "
                               f"row; the last error: {exc}") from exc

    def _rejoin(self, **event):
        self.stats["left_out"] += 1
        self.event("left_out", **event)
        self._drop_group()
        self._join()
        return None, 0

    def _await_outcome(self, r, a, trainers: List[str], timeout_s: Optional[float] = None) -> str:
        """Every member's vote, or a dead or silent member (``timeout_s``, default the
        collectives' bound): one outcome for all (compare_set)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
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
            elif time.monotonic() - t0 > timeout_s:
                proposal = "redo"
            if proposal is not None:
                return self._store.compare_set(k, proposal)
            self._check_heartbeat()
            time.sleep(0.005)

    def _await_key(self, key: str, writer: str) -> str:
        """The value ``writer`` sets at ``key``; "0" if it dies or takes longer than 2 x timeout_s."""
        t0 = time.monotonic()
        while True:
            v = self._store.get(key)
            if v is not None:
                return v
            if not self._alive(writer) or time.monotonic() - t0 > 2 * self.timeout_s:
                return "0"
            self._check_heartbeat()
            time.sleep(0.01)

    def _accuse(self, r, a, trainers: List[str], status: str) -> None:
        """A failed attempt whose error names a peer ("... rank k ...", a rank of the round's
        group): this worker suspects that peer (read by the next attempt's proposer)."""
        named = [int(k) for k in re.findall(r"\brank (\d+)", status)]
        peers = [trainers[k] for k in named if k < len(trainers) and trainers[k] != self.me]
        if peers:
            self._store.set(self._key(r, a, "accuse", self.me), peers[0])

    def _suspects(self) -> set:
        """Trainers of the previous (failed) attempt accused by a majority of its other trainers:
        left out of this attempt. With 2 trainers a broken link cannot be pinned on either side:
        nobody is suspected."""
        if self._prev_attempt is None:
            return set()
        r, a, trainers = self._prev_attempt
        if len(trainers) < 3:
            return set()
        count: Dict[str, int] = {}
        for t in trainers:
            v = self._store.get(self._key(r, a, "accuse", t))
            if v is not None:
                count[v] = count.get(v, 0) + 1
        return {m for m, c in count.items() if 2 * c > len(trainers) - 1}

    def _quarantined(self, key: str, r) -> bool:
        """A joiner whose state transfer failed recently (round < the quarantine's end)."""
        v = self._store.get(f"{self.ns}/quarantine/{key}")
        return v is not None and isinstance(r, int) and r < int(v)

    def _watch(self, group: MemberGroup, trainers: List[str]) -> RoundWatch:
        """A :class:`RoundWatch` over the other trainers of ``group``, started."""
        if self._watch_store is None:
            self._watch_store = connect(self.coordinator, self.timeout_s)
        backend = group.backend
        w = RoundWatch(self._watch_store, self.ns, [t for t in trainers if t != self.me], self.dead_after_s,
                       min(self.dead_after_s / 4, 0.25), backend.abort, self._store_key_outcome)
        w.start()
        self._last_watch = w
        return w

    def _drop_group(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None

    def _group_for(self, r, a, members: List[str]) -> MemberGroup:
        if self._group is not None and self._group.members == members and not self._group.backend.failure():
            return self._group
        self._drop_group()
        self._group = MemberGroup(self._store.raw, self._key(r, a, "pg") + "/", members, self.me, self.timeout_s,
                                  self.compression, self.block_size)
        return self._group

    # ------------------------------------------------------------------ state transfer
    def _transfer(self, r, a, group: List[str], donor: str, members: List[str]) -> None:
        """The donor broadcasts the state tensors and counters to the rest of ``group``."""
        if len(group) == 1:
            return
        if self.faults.cut():
            raise RuntimeError("fault injection: no link to the peers")
        g = MemberGroup(self._store.raw, self._key(r, a, "xfer") + "/", group, self.me, self.timeout_s, "none",
                        self.block_size)
        try:
            root = group.index(donor)
            counters = torch.tensor([self.round + (0 if r == "init" else 1), self._local_step()], dtype=torch.int64)
            nbytes = 0
            for t in [counters] + self._state_tensors():
                g.backend.broadcast(t, root).wait()
                nbytes += t.numel() * t.element_size()
            if self.me == donor:
                self.stats["join_bytes_sent"] += nbytes * (len(group) - 1)
            else:
                self.stats["join_bytes_received"] += nbytes
                self.round = int(counters[0])
                self._on_state(int(counters[1]))
        finally:
            g.close()
