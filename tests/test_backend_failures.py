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
    assert msg != "no error"
    assert abort_s < 1.0, f"abort() took {abort_s:.2f} s"
    assert raise_after_s < 2.0, f"the in-flight all_reduce raised {raise_after_s:.2f} s after abort()"
    assert "aborted" in later and later_s < 1.0, (later, later_s)
