"""Elastic DiLoCo under misconfiguration and stale processes (issue 20): a worker whose options
differ from the job's fails alone in its constructor; an older incarnation of a restarted
worker is turned away; membership changes reach stderr without any logging configuration.
Real coordinator and worker processes (tests/test_elastic.py's Job), each under a timeout.

Checked against the code before these fixes (the ':stop' and ':cut' fault injections ported
alone): other options made the job stall (round 2 not reached in 60 s); the paused w1#1 ended
in a quorum timeout instead of being turned away; no membership line reached stderr; the hung
member cost 30.09 s (= timeout_s); the cut-off worker was re-admitted, the round failed again
and w0 was left out and raised. After the fixes the five tests passed 5 runs in a row on the
2-core machine shared with other sessions, one of them with an extra busy-loop process."""
from __future__ import annotations

import os
import signal
import time

import pytest

from localsgd_comm.elastic import connect
from test_elastic import _survivors_identical, job_factory  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


@pytest.mark.timeout(240)
def test_a_worker_with_other_options_fails_alone_in_its_constructor(job_factory):  # noqa: F811
    """Fails before: w2's int4 made every round fail 8 times, then every worker raised."""
    job = job_factory(**{"initial-workers": 2, "rounds": 8, "step-sleep": 0.02})
    job.start("w0")
    job.start("w1")
    # The first worker to reach the store records the job's options: let w0/w1 be first, so the
    # job is theirs, then w2 arrives while the job is being founded.
    store, t0 = connect(job.addr, 10), time.monotonic()
    while not store.check(["localsgd/elastic/run/options"]):
        assert time.monotonic() - t0 < 60, job.log("w0")
        time.sleep(0.02)
    job.start("w2", compression="int4", **{"error-feedback": True})
    job.wait_round(2)
    job.start("w3", **{"sync-every": 2})  # joining a running job with another H (item 8)
    codes = job.wait(timeout=180)
    assert codes == {"w0": 0, "w1": 0, "w2": 1, "w3": 1}, (codes, job.log("w0"))
    e2, e3 = job.result("w2")["error"], job.result("w3")["error"]
    assert "compression='int4' (the job's: 'int8')" in e2 and "error_feedback=True (the job's: False)" in e2, e2
    assert "sync_every=2 (the job's: 4)" in e3 and "compression" not in e3, e3
    res = _survivors_identical(job, ["w0", "w1"], 8)
    assert res["w0"]["stats"]["redone_rounds"] == 0 and res["w0"]["stats"]["joined"] == 0, res["w0"]["stats"]


@pytest.mark.timeout(240)
def test_a_stale_incarnation_is_turned_away_and_never_admitted(job_factory):  # noqa: F811
    """w1 is paused (SIGSTOP), the job goes on without it, w1 is restarted (w1#2) and joins;
    then the paused w1#1 resumes: it must raise at its next round, not become a second w1."""
    job = job_factory(**{"initial-workers": 2, "rounds": 30, "step-sleep": 0.03, "until-members": 2})
    job.start("w0")
    old = job.start("w1", name="w1old")  # w1#1: its own output and log files
    job.wait_round(2)
    os.kill(old.pid, signal.SIGSTOP)
    try:
        job.wait_round(4)  # w0 went on alone
        job.start("w1")  # w1#2
        t0 = time.monotonic()
        while True:  # until w1#2 is a member
            assert time.monotonic() - t0 < 60, job.log("w1")
            if "joined" in job.log("w1"):
                break
            time.sleep(0.1)
    finally:
        os.kill(old.pid, signal.SIGCONT)
    codes = job.wait(timeout=180)
    assert codes["w0"] == 0 and codes["w1"] == 0 and codes["w1old"] == 1, (codes, job.log("w0"))
    err = job.result("w1old")["error"]
    res = _survivors_identical(job, ["w0", "w1"], 30)
    assert res["w1"]["me"] == "w1#2", res["w1"]
    assert all("w1#1" not in m for m in res["w0"]["members"]), res["w0"]["members"]
    assert "w1#1: this worker is a stale incarnation" in err and "w1#2" in err, err


@pytest.mark.timeout(180)
def test_membership_changes_reach_stderr_without_logging_configured(job_factory):  # noqa: F811
    """Fails before: the events were logged at INFO, which an unconfigured logging drops."""
    job = job_factory(**{"initial-workers": 3, "plain-logging": True})
    for w in ("w0", "w1", "w2"):
        job.start(w, kill="w1:2:allreduce")
    codes = job.wait()
    assert codes["w1"] == -9 and codes["w0"] == 0 and codes["w2"] == 0, codes
    log = job.log("w0")
    lines = [ln for ln in log.splitlines() if ln.startswith("localsgd elastic w0#1:")]
    for kind in ("left", "redo", "recovered"):
        assert sum(1 for ln in lines if ln.split(": ", 1)[1].startswith(kind + " ")) == 1, (kind, log)


@pytest.mark.timeout(240)
def test_a_member_hung_inside_the_allreduce_costs_dead_after_not_the_timeout(job_factory):  # noqa: F811
    """w1 SIGSTOPs itself mid all-reduce of round 2 (its sockets stay open, its heartbeat stops):
    the round watch aborts the round's group once w1 missed dead_after_s (1 s) of beats, and the
    round is redone without it. Fails before: the others waited for the collective's timeout_s
    (30 s here) and recovered in >= 30 s."""
    job = job_factory(**{"initial-workers": 3, "timeout": 30})
    for w in ("w0", "w1", "w2"):
        job.start(w, kill="w1:2:allreduce:stop")
    for w in ("w0", "w2"):
        assert job.procs[w].wait(timeout=150) == 0, job.log(w)
    job.procs["w1"].kill()  # still stopped
    res = _survivors_identical(job, ["w0", "w2"], 6)
    st = res["w0"]["stats"]
    assert st["left"] == 1 and st["redone_rounds"] == 1, st
    # Behaviour, not speed: the whole redo, detection included, ends well before one timeout_s.
    rec = [e["seconds"] for e in res["w0"]["events"] if e["kind"] == "recovered"]
    assert len(rec) == 1 and rec[0] < 15, rec
    # A survivor whose all-reduce was still waiting for w1 was cut short by the round watch (the
    # first to miss w1's beats aborts, the other then sees the redo vote), never by the timeout.
    # (When w1 stopped after its last byte was out, the all-reduce completed and the commit vote
    # saw it dead instead.)
    for w in ("w0", "w2"):
        for line in job.log(w).splitlines():
            if "all-reduce failed" in line:
                assert "w1#1 stopped heartbeating" in line or "voted a redo elsewhere" in line, line


@pytest.mark.timeout(300)
def test_a_worker_cut_off_from_its_peers_is_suspected_and_left_out(job_factory):  # noqa: F811
    """From round 2 on w2 reaches the coordinator but none of its peers (fault injection ':cut'):
    its peers' all-reduce times out naming it, the next attempt leaves it out (accused by both
    others), and it is not re-admitted while its state transfer (the connectivity check) fails.
    Fails before: w2 was re-admitted at every attempt, 8 failed attempts, then every worker raised."""
    job = job_factory(**{"initial-workers": 3, "rounds": 8, "timeout": 5, "step-sleep": 0.01})
    for w in ("w0", "w1", "w2"):
        job.start(w, kill="w2:2:allreduce:cut")
    for w in ("w0", "w1"):
        assert job.procs[w].wait(timeout=240) == 0, job.log(w)
    job.procs["w2"].kill()  # still trying to join
    res = _survivors_identical(job, ["w0", "w1"], 8)
    st = res["w0"]["stats"]
    assert st["redone_rounds"] == 1 and st["left"] == 1, st
    ev = res["w0"]["events"]
    assert any(e["kind"] == "suspected" and e["who"] == ["w2#1"] for e in ev) or \
        any(e["kind"] == "suspected" and e["who"] == ["w2#1"] for e in res["w1"]["events"]), ev
    assert res["w0"]["members"] == ["w0#1", "w1#1"], res["w0"]["members"]
