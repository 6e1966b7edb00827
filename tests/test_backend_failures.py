"""Failure semantics of the localsgd backend: agreement at init, a failed group stays failed,
reserved tags, abort() with work in flight. Every multi-process test runs under a deadline."""
import os
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from localsgd_comm import BackendOptions, get_backend_stats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dist import RankError, run_ranks  # noqa: E402


def _w_init(rank, p, timeout_s):
    t0 = time.monotonic()
    try:
        dist.init_process_group("localsgd", timeout=timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 - the test reads the message
        return type(exc).__name__, str(exc), time.monotonic() - t0
    dist.destroy_process_group()
    return "ok", "", time.monotonic() - t0


def test_a_bad_option_on_one_rank_fails_every_rank_within_seconds():
    """The failing rank publishes its error: its peers raise it too, long before the timeout."""
    res = run_ranks(_w_init, 2, 120, backend=None, rank_env={1: {"LOCALSGD_COMM_FORMAT": "int3"}}, timeout=90)
    (n0, m0, s0), (n1, m1, s1) = res
    assert n1 == "ValueError" and "LOCALSGD_COMM_FORMAT" in m1 and "int3" in m1, m1
    assert n0 in ("RuntimeError", "DistBackendError") and "rank 1 failed to initialize" in m0 and "int3" in m0, m0
    assert s0 < 20, f"rank 0 took {s0:.1f} s (group timeout 120 s)"


@pytest.mark.parametrize("env,what", [
    ({0: {"LOCALSGD_COMM_FORMAT": "int8"}, 1: {"LOCALSGD_COMM_FORMAT": "none"}}, "format: rank 0 'int8', rank 1 'none'"),
    ({0: {"LOCALSGD_COMM_THRESHOLD_BYTES": "0"}, 1: {"LOCALSGD_COMM_THRESHOLD_BYTES": "65536"}},
     "threshold_bytes: rank 0 0, rank 1 65536"),
    ({1: {"LOCALSGD_COMM_BLOCK_SIZE": "256"}}, "block_size: rank 0 128, rank 1 256"),
])
def test_options_that_differ_between_ranks_fail_at_init_on_every_rank(env, what):
    res = run_ranks(_w_init, 2, 120, backend=None, rank_env=env, timeout=90)
    msgs = [m for _, m, _ in res]
    assert msgs[0] == msgs[1], msgs  # the same message on every rank
    assert "ranks disagree on the backend options at init" in msgs[0] and what in msgs[0], msgs[0]
    assert all(s < 20 for _, _, s in res)


def _w_failed_stays_failed(rank, p):
    dist.init_process_group("localsgd", pg_options=BackendOptions(threshold_bytes=0), timeout=timedelta(seconds=20))
    try:
        dist.all_reduce(torch.randn(4096 + 128 * rank))  # sizes differ: the header check fails
        first = "no error"
    except RuntimeError as exc:
        first = str(exc)
    t0 = time.monotonic()
    later = []
    for fn in (lambda: dist.all_reduce(torch.ones(10, dtype=torch.int64)),  # pass-through
               lambda: dist.all_reduce(torch.randn(4096)),                  # compressed
               lambda: dist.broadcast(torch.ones(3), src=0),
               lambda: dist.send(torch.ones(3), dst=1 - rank)):
        try:
            fn()
            later.append("no error")
        except RuntimeError as exc:
            later.append(str(exc))
    secs = time.monotonic() - t0
    failed = get_backend_stats()["failed"]
    dist.destroy_process_group()
    return first, later, secs, failed


def test_a_failed_collective_leaves_the_group_failed():
    for first, later, secs, failed in run_ranks(_w_failed_stays_failed, 2, backend=None, timeout=90):
        assert "ranks disagree" in first, first
        for msg in later:
            assert "failed earlier" in msg and "ranks disagree" in msg, msg  # names the first error
        assert secs < 1.0, f"later calls took {secs:.2f} s: they must fail at once"
        assert "ranks disagree" in failed


def _w_reserved_tag(rank, p):
    dist.init_process_group("localsgd", timeout=timedelta(seconds=20))
    out = []
    for fn in (lambda: dist.send(torch.ones(4), dst=1 - rank, tag=0x40000000),
               lambda: dist.recv(torch.ones(4), src=1 - rank, tag=0x4F000000)):
        try:
            fn()
            out.append("no error")
        except RuntimeError as exc:
            out.append(str(exc))
    # user traffic below the reserved range still works, next to a compressed all-reduce
    x = torch.full((4,), float(rank))
    if rank == 0:
        dist.send(x, dst=1, tag=7)
    else:
        dist.recv(x, src=0, tag=7)
    y = torch.randn(100_000)
    ref = y.clone()
    dist.all_reduce(y)
    dist.destroy_process_group()
    return out, x.tolist(), bool(torch.isfinite(y).all()), float((y - 2 * ref).abs().max()) if rank < 0 else 0.0


def test_reserved_tags_are_refused_and_user_point_to_point_still_works():
    for r, (out, x, finite, _) in enumerate(run_ranks(_w_reserved_tag, 2, backend=None, timeout=90)):
        for msg in out:
            assert "is reserved" in msg and "use a tag below" in msg, msg
        assert x == [0.0] * 4 and finite


def _w_abort(rank, p):
    dist.init_process_group("localsgd", pg_options=BackendOptions(threshold_bytes=0), timeout=timedelta(seconds=60))
    dist.barrier()
    if rank == 1:
        time.sleep(12)  # never joins rank 0's all-reduce
        return "slept"
    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    timing = {}

    def aborter():
        time.sleep(1.0)
        t = time.monotonic()
        backend.abort()
        timing["abort_s"] = time.monotonic() - t
        timing["aborted_at"] = t

    th = threading.Thread(target=aborter)
    th.start()
    try:
        dist.all_reduce(torch.randn(1 << 20))
        res = "no error"
    except RuntimeError as exc:
        res = str(exc)
    raised_at = time.monotonic()
    th.join()
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.randn(10))
        later = "no error"
    except RuntimeError as exc:
        later = str(exc)
    later_s = time.monotonic() - t0
    return res, timing["abort_s"], raised_at - timing["aborted_at"], later, later_s


def test_abort_with_work_in_flight_returns_at_once_and_fails_the_group():
    res = run_ranks(_w_abort, 2, backend=None, timeout=90, return_exceptions=True)
    assert not isinstance(res[0], (RankError,)), res[0]
    msg, abort_s, raise_after_s, later, later_s = res[0]
    assert "aborted" in msg, msg  # an aborted receive is an error, never a completed message
    assert abort_s < 1.0, f"abort() took {abort_s:.2f} s"
    assert raise_after_s < 2.0, f"the in-flight all_reduce raised {raise_after_s:.2f} s after abort()"
    assert "aborted" in later and later_s < 1.0, (later, later_s)


# ---- every collective carries a call header ---------------------------------------------------
# Each case: what rank 0 calls, what rank 1 calls, and a fragment the message must hold. None of
# these could be seen by the old per-call metadata (it only existed on the compressed path): the
# ranks hung until the group timeout, or gloo exchanged mismatched messages.
_MISMATCH = {
    "dtype": (lambda: dist.all_reduce(torch.ones(4096)),
              lambda: dist.all_reduce(torch.ones(4096, dtype=torch.int32)),
              "dtype: this rank float32, rank 1 int32"),
    "op": (lambda: dist.all_reduce(torch.ones(4096)),
           lambda: dist.all_reduce(torch.ones(4096), op=dist.ReduceOp.MAX),
           "op: this rank SUM, rank 1 MAX"),
    "kind": (lambda: dist.all_reduce(torch.ones(4096)),
             lambda: dist.broadcast(torch.ones(4096), src=0),
             "collective: this rank allreduce, rank 1 broadcast"),
    "skipped": (lambda: (dist.all_reduce(torch.ones(4096)), dist.barrier()),
                lambda: dist.barrier(),
                "collective: this rank allreduce, rank 1 barrier"),
    "passthrough_numel": (lambda: dist.all_reduce(torch.ones(10, dtype=torch.int64)),
                          lambda: dist.all_reduce(torch.ones(12, dtype=torch.int64)),
                          "numel: this rank 10, rank 1 12"),
    "root": (lambda: dist.broadcast(torch.ones(100), src=0),
             lambda: dist.broadcast(torch.ones(100), src=1),
             "block size / root: this rank 0, rank 1 1"),
    "all_gather_numel": (lambda: dist.all_gather_into_tensor(torch.empty(200), torch.ones(100)),
                         lambda: dist.all_gather_into_tensor(torch.empty(202), torch.ones(101)),
                         "numel: this rank 100, rank 1 101"),
}


def _w_mismatch(rank, p, case):
    dist.init_process_group("localsgd", pg_options=BackendOptions(threshold_bytes=0), timeout=timedelta(seconds=60))
    dist.barrier()
    mine = _MISMATCH[case][rank]
    t0 = time.monotonic()
    try:
        mine()
        msg = "no error"
    except RuntimeError as exc:
        msg = str(exc)
    secs = time.monotonic() - t0
    failed = get_backend_stats()["failed"]
    dist.destroy_process_group()
    return msg, secs, failed


@pytest.mark.parametrize("case", sorted(_MISMATCH))
def test_collectives_that_disagree_raise_on_every_rank_before_data_moves(case):
    """Group timeout 60 s: every rank must raise at once (measured: a few ms), naming the field."""
    fragment = _MISMATCH[case][2]
    for rank, (msg, secs, failed) in enumerate(run_ranks(_w_mismatch, 2, case, backend=None, timeout=90)):
        assert "ranks disagree" in msg, (rank, msg)
        if rank == 0:
            assert fragment in msg, msg
        assert secs < 10, f"rank {rank} raised after {secs:.1f} s (group timeout 60 s)"
        assert failed and "ranks disagree" in failed


def _w_call_timeout(rank, p, mode):
    # per_call: group timeout 60 s, the collective's option 2 s; group: the group's 3 s;
    # set_timeout: created with 60 s, set to 3 s afterwards
    dist.init_process_group("localsgd", pg_options=BackendOptions(threshold_bytes=0),
                            timeout=timedelta(seconds=3 if mode == "group" else 60))
    pg = dist.group.WORLD._get_backend(torch.device("cpu"))
    if mode == "set_timeout":
        pg.set_timeout(timedelta(seconds=3))
    dist.barrier()
    if rank == 1:
        time.sleep(15)  # never joins
        return "slept", 0.0
    x = torch.randn(1 << 16)
    t0 = time.monotonic()
    try:
        if mode == "per_call":
            opts = dist.AllreduceOptions()
            opts.timeout = timedelta(seconds=2)
            pg.allreduce([x], opts).wait()
        else:
            dist.all_reduce(x)
        msg = "no error"
    except RuntimeError as exc:
        msg = str(exc)
    return msg, time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["per_call", "group", "set_timeout"])
def test_the_timeout_bounds_a_compressed_call_whose_peer_never_comes(mode):
    """Before, the compressed path ignored both and waited for gloo's own timeout."""
    msg, secs = run_ranks(_w_call_timeout, 2, mode, backend=None, timeout=90)[0]
    bound = 2 if mode == "per_call" else 3
    assert "timed out" in msg and f"after {bound * 1000} ms" in msg and "rank 1" in msg, msg
    assert bound - 0.1 <= secs < bound + 5, f"raised after {secs:.1f} s with a {bound} s timeout"


def _w_headers(rank, p, check):
    dist.init_process_group("localsgd", pg_options=BackendOptions(threshold_bytes=0, check_calls=check),
                            timeout=timedelta(seconds=30))
    pg = dist.group.WORLD._get_backend(torch.device("cpu"))
    seq0 = pg._get_sequence_number_for_group()
    x = torch.randn(5000)
    dist.all_reduce(x)
    dist.broadcast(torch.ones(7), src=0)
    dist.barrier()
    seq = pg._get_sequence_number_for_group() - seq0
    st = get_backend_stats()
    dist.destroy_process_group()
    return seq, st["header_bytes"], bool(torch.isfinite(x).all())


def test_call_headers_are_numbered_counted_and_can_be_turned_off():
    for seq, header_bytes, finite in run_ranks(_w_headers, 3, True, backend=None, timeout=90):
        assert seq == 3 and finite
        assert header_bytes >= 3 * 2 * 64  # 64 bytes to each of 2 peers per collective
    for seq, header_bytes, finite in run_ranks(_w_headers, 2, False, backend=None, timeout=90):
        assert seq == 3 and header_bytes == 0 and finite


def _w_counter_wrap(rank, p, has_hook):
    """Groups whose counters start near their wrap points against a group whose counters start
    at zero: the same collectives must give bitwise the same results."""
    dist.init_process_group("localsgd", pg_options=BackendOptions(threshold_bytes=0), timeout=timedelta(seconds=60))
    ref = dist.new_group(backend="localsgd", pg_options=BackendOptions(threshold_bytes=0))
    # Two collectives per round (seq += 2), one pipelined call (tag counter += 1): in the first
    # group round 4's all-reduce has seq 0 (wrapped) and tag counter 224, where the call headers'
    # old range overlapped phase B's; the second group's tag counter wraps 255 -> 0.
    starts = [((1 << 24) - 8, 220), ((1 << 19) - 3, 252)]
    groups = [dist.new_group(backend="localsgd", pg_options=BackendOptions(threshold_bytes=0)) for _ in starts]
    for g, (seq, call) in zip(groups, starts):
        g._get_backend(torch.device("cpu"))._set_counters_for_test(seq, call)
    mismatches = []
    for g, (seq0, _) in zip(groups, starts):
        for k in range(10):
            gen = torch.Generator().manual_seed(1000 * k + rank)
            n = [4099, 300_000, 70_000][k % 3]  # one short record, several pieces, one piece
            x = torch.randn(n, generator=gen)
            y = x.clone()
            dist.all_reduce(x, group=g)
            dist.all_reduce(y, group=ref)
            b = torch.full((5,), float(rank + k))
            c = b.clone()
            dist.broadcast(b, src=k % p, group=g)  # a pass-through: only the sequence number moves
            dist.broadcast(c, src=k % p, group=ref)
            if not (torch.equal(x, y) and torch.equal(b, c)):
                mismatches.append((seq0, k))
    seqs = [g._get_backend(torch.device("cpu"))._get_sequence_number_for_group() for g in groups]
    dist.destroy_process_group()
    return mismatches, seqs


def test_a_group_runs_past_the_wrap_of_every_tag_counter_without_corruption():
    """Call headers (seq mod 2^24) and the pipelined calls' tags (call mod 256) each wrap; the
    tag families have disjoint ranges (static_asserts in the backend), so no message of one
    family can be taken by a receive of another. Before, the headers' range lay inside phase
    B's: with the counters started at seq 2^24-8 and call 220, the fifth all-reduce's phase-B scales
    matched the pre-posted header receive of the next call (an error or a corrupted result)."""
    res = run_ranks(_w_counter_wrap, 2, True, backend=None, timeout=120)
    for mismatches, seqs in res:
        assert mismatches == [], mismatches
        assert seqs == [(1 << 24) - 8 + 20, (1 << 19) - 3 + 20], seqs


def _w_counters_late(rank, p):
    dist.init_process_group("localsgd", timeout=timedelta(seconds=30))
    dist.barrier()
    try:
        dist.group.WORLD._get_backend(torch.device("cpu"))._set_counters_for_test(5, 5)
        msg = "no error"
    except RuntimeError as exc:
        msg = str(exc)
    dist.destroy_process_group()
    return msg


def test_the_counter_hook_is_refused_after_the_first_collective():
    for msg in run_ranks(_w_counters_late, 2, backend=None, timeout=60):
        assert "only be set before the group's first collective" in msg, msg
