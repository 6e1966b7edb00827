"""Elastic DiLoCo: workers die at any moment and join at round boundaries; the survivors finish
bitwise identical. Each test runs a real coordinator process and 3-4 worker processes
(``tests/scripts/elastic_worker.py``, each launched on its own as a user would), with
deterministic fault injection (``LOCALSGD_ELASTIC_KILL``); every process runs under a timeout
and the test kills whatever is left."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from localsgd_comm.bench.launch import free_port as _free_port
from localsgd_comm.elastic import connect, job_round

# Long multi-process suite: run by CI and `pytest -m slow`, left out of the README's quick command.
pytestmark = pytest.mark.slow


HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "scripts", "elastic_worker.py")
ROOT = os.path.dirname(HERE)


class Job:
    """A coordinator and workers in separate processes, all killed at the end."""

    def __init__(self, tmp_path, **worker_args):
        self.tmp = tmp_path
        self.port = _free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        OMP_NUM_THREADS="1")
        self.env.pop("LOCALSGD_ELASTIC_KILL", None)
        self.args = {"rounds": 6, "sync-every": 4, "min-workers": 1, **worker_args}
        self.procs = {}
        self.coord = subprocess.Popen([sys.executable, "-m", "localsgd_comm.coordinator", "--host", "127.0.0.1",
                                       "--port", str(self.port)], env=self.env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
        line = self.coord.stdout.readline()
        assert "serving" in line, line

    def start(self, wid: str, kill: str = "", name: str = "", **extra):
        """Worker ``wid`` (``name``: the process's own key, for the ranks of a multi-process worker)."""
        name = name or wid
        args = {**self.args, **extra}
        cmd = [sys.executable, WORKER, "--coordinator", self.addr, "--id", wid, "--out", str(self.tmp / f"{name}.json")]
        for k, v in args.items():
            if v is True:
                cmd.append(f"--{k}")
            elif v is not None and v is not False:
                cmd += [f"--{k}", str(v)]
        env = dict(self.env, LOCALSGD_ELASTIC_KILL=kill) if kill else self.env
        self.procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                            stderr=open(self.tmp / f"{name}.log", "a"))
        return self.procs[name]

    def round_cursor(self) -> int:
        return job_round(connect(self.addr, 10))

    def wait_round(self, r: int, timeout: float = 60) -> None:
        t0 = time.monotonic()
        while self.round_cursor() < r:
            assert time.monotonic() - t0 < timeout, f"the job did not reach round {r} in {timeout} s"
            time.sleep(0.05)

    def wait(self, timeout: float = 120):
        deadline = time.monotonic() + timeout
        codes = {}
        for wid, p in self.procs.items():
            try:
                codes[wid] = p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                codes[wid] = "hang"
        return codes

    def result(self, wid: str):
        path = self.tmp / f"{wid}.json"
        return json.load(open(path)) if path.exists() else None

    def log(self, wid: str) -> str:
        return (self.tmp / f"{wid}.log").read_text()[-3000:]

    def close(self):
        for p in list(self.procs.values()) + [self.coord]:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def job_factory(tmp_path):
    jobs = []

    def make(**kw):
        j = Job(tmp_path, **kw)
        jobs.append(j)
        return j

    yield make
    for j in jobs:
        j.close()


def _survivors_identical(job, ids, rounds):
    res = {w: job.result(w) for w in ids}
    for w, r in res.items():
        assert r is not None and "error" not in r, (w, r, job.log(w))
        assert r["round"] >= rounds, (w, r["round"])
        assert r["loss"] == r["loss"] and abs(r["loss"]) < 1e6, (w, r["loss"])  # finite
    first = res[ids[0]]
    for w in ids[1:]:
        for k in ("anchor", "momentum", "params", "local_step", "round"):
            assert res[w][k] == first[k], (k, {x: res[x][k] for x in ids})
    return res


@pytest.mark.timeout(180)
@pytest.mark.parametrize("phase", ["inner", "compress", "allreduce", "commit"])
def test_a_worker_killed_in_any_phase_is_left_out_and_the_survivors_finish_identical(job_factory, phase):
    job = job_factory(**{"initial-workers": 3})
    for w in ("w0", "w1", "w2"):
        job.start(w, kill=f"w1:2:{phase}")
    codes = job.wait()
    assert codes["w1"] == -9 and codes["w0"] == 0 and codes["w2"] == 0, codes
    res = _survivors_identical(job, ["w0", "w2"], 6)
    st = res["w0"]["stats"]
    assert st["left"] == 1, st
    if phase != "inner":  # w1 was a member of round 2's first attempt: that round was redone
        assert st["redone_rounds"] == 1, st
    assert any(e["kind"] == "recovered" for e in res["w0"]["events"])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("compression,ef", [("none", False), ("int4", True)])
def test_every_format_and_error_feedback_survive_a_death_mid_allreduce(job_factory, compression, ef):
    job = job_factory(**{"initial-workers": 3, "compression": compression, "error-feedback": ef})
    for w in ("w0", "w1", "w2"):
        job.start(w, kill="w2:3:allreduce")
    codes = job.wait()
    assert codes["w2"] == -9 and codes["w0"] == 0 and codes["w1"] == 0, codes
    _survivors_identical(job, ["w0", "w1"], 6)


@pytest.mark.timeout(180)
def test_two_deaths_in_one_round(job_factory):
    job = job_factory(**{"initial-workers": 4})
    kills = {"w1": "w1:2:allreduce", "w3": "w3:2:compress"}
    for w in ("w0", "w1", "w2", "w3"):
        job.start(w, kill=kills.get(w, ""))
    codes = job.wait()
    assert codes["w1"] == -9 and codes["w3"] == -9 and codes["w0"] == 0 and codes["w2"] == 0, codes
    res = _survivors_identical(job, ["w0", "w2"], 6)
    assert res["w0"]["stats"]["left"] == 2


@pytest.mark.timeout(240)
def test_a_restarted_worker_joins_after_a_death_and_ends_identical(job_factory):
    job = job_factory(**{"initial-workers": 3, "rounds": 24, "step-sleep": 0.03, "until-members": 3})
    for w in ("w0", "w1", "w2"):
        job.start(w, kill="w1:2:inner")
    job.procs["w1"].wait(timeout=60)
    job.wait_round(4)
    del job.procs["w1"]
    job.start("w1")  # the same name, a new incarnation, no fault this time
    codes = job.wait()
    assert all(c == 0 for c in codes.values()), codes
    res = _survivors_identical(job, ["w0", "w1", "w2"], 24)
    assert res["w1"]["me"] == "w1#2"
    joined = [e for e in res["w1"]["events"] if e["kind"] == "joined"]
    assert joined and joined[0]["round"] >= 4, res["w1"]["events"]
    assert res["w1"]["stats"]["join_bytes_received"] > 0
    assert res["w0"]["stats"]["joined"] >= 1 or res["w2"]["stats"]["joined"] >= 1


@pytest.mark.timeout(240)
def test_a_join_while_another_worker_dies(job_factory):
    job = job_factory(**{"initial-workers": 3, "rounds": 24, "step-sleep": 0.03, "until-joined": 1})
    for w in ("w0", "w1", "w2"):
        job.start(w, kill="w2:3:join")  # w2 dies in the first round (from round 3) that takes a joiner in
    job.wait_round(3)
    job.start("w3")
    codes = job.wait()
    assert codes["w2"] == -9 and codes["w0"] == 0 and codes["w1"] == 0 and codes["w3"] == 0, codes
    res = _survivors_identical(job, ["w0", "w1", "w3"], 24)
    assert res["w0"]["stats"]["left"] == 1


@pytest.mark.timeout(240)
def test_a_worker_that_is_a_ddp_cluster_dies_as_one_and_rejoins_as_one(job_factory):
    """Worker B is 2 processes with DDP inside (its own gloo group); its rank 1 dies in round 2's
    inner steps: B's leader fails at its next DDP all-reduce, A goes on alone; B restarted as a
    whole joins, hands the state to its rank 1, and all three processes end identical."""
    job = job_factory(**{"initial-workers": 2, "rounds": 24, "step-sleep": 0.03, "until-members": 2})
    job.start("A")
    port = _free_port()
    for r in (0, 1):
        job.start("B", name=f"B{r}", kill="B/1:2:inner", **{"replica-size": 2, "replica-rank": r, "replica-port": port})
    assert job.procs["B1"].wait(timeout=90) == -9
    assert job.procs["B0"].wait(timeout=60) == 1  # raised (DDP's peer is gone), did not hang
    assert "error" in job.result("B0"), job.result("B0")
    job.wait_round(5)
    port = _free_port()
    for r in (0, 1):
        job.start("B", name=f"B{r}", **{"replica-size": 2, "replica-rank": r, "replica-port": port})
    codes = job.wait()
    assert all(c == 0 for c in codes.values()), codes
    res = _survivors_identical(job, ["A", "B0", "B1"], 24)
    assert res["B0"]["me"] == "B#2" and res["B1"]["me"] == "B/1"
    assert res["A"]["stats"]["left"] == 1 and res["A"]["stats"]["joined"] == 1


@pytest.mark.timeout(120)
def test_below_the_minimum_a_worker_waits_up_to_its_deadline_then_raises(job_factory):
    job = job_factory(**{"initial-workers": 2, "min-workers": 2, "quorum-timeout": 3})
    job.start("w0")
    job.start("w1", kill="w1:2:inner")
    t0 = time.monotonic()
    codes = job.wait(timeout=90)
    assert codes == {"w0": 1, "w1": -9}, codes
    err = job.result("w0")["error"]
    assert "fewer than min_workers=2" in err and "quorum_timeout_s=3" in err, err
    assert time.monotonic() - t0 < 60


def test_a_dead_coordinator_makes_every_worker_raise_clearly(job_factory):
    job = job_factory(**{"initial-workers": 3, "rounds": 1000, "step-sleep": 0.01})
    for w in ("w0", "w1", "w2"):
        job.start(w)
    job.wait_round(2)
    job.coord.kill()
    t0 = time.monotonic()
    codes = job.wait(timeout=60)
    took = time.monotonic() - t0
    assert all(c == 1 for c in codes.values()), codes  # an error, not a hang (the timeout) or a crash
    for w in ("w0", "w1", "w2"):
        r = job.result(w)
        assert "CoordinatorUnreachable" in r["error"] and "coordinator store" in r["error"], r
    assert took < 30, f"workers took {took:.1f} s to notice"


def test_bad_options_are_refused_with_clear_errors():
    import torch
    import localsgd_comm
    m = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for kw, msg in (({"coordinator": "nohost"}, "host:port"),
                    ({"overlap": True}, "overlap=True is not supported"),
                    ({"worker_id": "a#b"}, "worker_id"),
                    ({"min_workers": 0}, "min_workers"),
                    ({"heartbeat_s": 5.0}, "heartbeat_s"),
                    ({"initial_workers": 0, "min_workers": 2}, "initial_workers")):
        args = {"coordinator": "127.0.0.1:1", "worker_id": "w0", "sync_every": 4, **kw}
        with pytest.raises((ValueError, TypeError), match=msg):
            localsgd_comm.ElasticDiLoCo(m, opt, **args)
    with pytest.raises(localsgd_comm.CoordinatorUnreachable, match="no coordinator store answers"):
        localsgd_comm.ElasticDiLoCo(m, opt, coordinator=f"127.0.0.1:{_free_port()}", worker_id="w0", sync_every=4,
                                    timeout_s=1)


@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_cuda_workers_survive_a_death_mid_allreduce_and_finish_identical(job_factory):
    """Workers whose parameters are on a GPU (outer state in host memory, rounds over gloo)."""
    job = job_factory(**{"initial-workers": 3, "device": "cuda"})
    for w in ("w0", "w1", "w2"):
        job.start(w, kill="w1:2:allreduce")
    codes = job.wait()
    assert codes["w1"] == -9 and codes["w0"] == 0 and codes["w2"] == 0, (codes, job.log("w0"))
    res = _survivors_identical(job, ["w0", "w2"], 6)
    assert res["w0"]["stats"]["redone_rounds"] == 1
