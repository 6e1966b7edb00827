"""The planner (``localsgd_comm.plan`` / ``localsgd-plan``): its models, its fit, its input checks."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from localsgd_comm import plan
from localsgd_comm.functional import compressed_nbytes

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")


def _job(**kw):
    d = dict(params=10_000_000, tokens=1e9, tokens_per_step=16_384, workers=8, clusters=2, step_time_s=0.2)
    d.update(kw)
    return plan.Job(**d)


def test_embedded_constants_are_the_fit_of_the_committed_results():
    """COMM_FIT / CONVERGENCE_FIT are what benchmarks/fit_plan.py computes from benchmarks/results:
    a re-measured result without a refit (or a hand-edited constant) fails here."""
    fit = plan.fit_from_results(RESULTS)
    assert fit["COMM_FIT"] == plan.COMM_FIT
    assert fit["CONVERGENCE_FIT"] == plan.CONVERGENCE_FIT


def test_comm_model_reproduces_the_measured_collectives_within_its_stated_error():
    with open(os.path.join(RESULTS, "collectives.json")) as f:
        col = json.load(f)
    key = {"gloo-fp32": "gloo", "localsgd-none": "none", "localsgd-int8": "int8", "localsgd-int4": "int4"}
    errs = []
    for r in col["results"]:
        if not r.get("rate_mbit"):
            continue
        k = key[r["method"]]
        t = plan.allreduce_time("none" if k == "gloo" else k, r["numel"], r["world"], r["rate_mbit"],
                                backend="gloo" if k == "gloo" else "localsgd")
        errs.append(abs(t / r["time_s_median"] - 1))
    assert max(errs) <= plan.COMM_FIT["rel_error_max"] + 1e-4  # stored rounded to 4 decimals
    # large all-reduces are bandwidth-bound: there the model must be close (the fixed costs are not)
    big = [abs(plan.allreduce_time("int8" if "int8" in r["method"] else "none", r["numel"], r["world"],
                                   r["rate_mbit"], backend="gloo" if r["method"] == "gloo-fp32" else "localsgd")
               / r["time_s_median"] - 1)
           for r in col["results"] if r.get("rate_mbit") and r["size_mb"] >= 64 and r["method"] in
           ("gloo-fp32", "localsgd-none", "localsgd-int8")]
    assert big and max(big) < 0.15


@pytest.mark.parametrize("fmt", ["none", "int8", "int4", "fp8"])
@pytest.mark.parametrize("numel", [1, 255, 256, 1000, 1 << 20])
def test_wire_bytes_equal_the_library_format(fmt, numel):
    assert plan.wire_bytes(fmt, numel, 256) == compressed_nbytes(fmt, numel, 256)


def test_slow_link_bytes_of_the_algorithms():
    S = 1000.0
    # 4 ranks, clusters of 2: gloo's ring has one edge out of each cluster: 2 (p-1)/p of the tensor
    assert plan.slow_link_bytes("ring", S, 4, 2) == pytest.approx(1500.0)
    # ours: all-to-all + all-gather, k (p-k) chunk pairs each way: 2 * 2 * 2 / 4 = 2x the tensor
    assert plan.slow_link_bytes("a2a", S, 4, 2) == pytest.approx(2000.0)
    # one rank per cluster (the edge): both are 2 (p-1)/p
    assert plan.slow_link_bytes("a2a", S, 4, 1) == pytest.approx(plan.slow_link_bytes("ring", S, 4, 1))
    assert plan.slow_link_bytes("ring", S, 2, 2) == 0.0
    with pytest.raises(ValueError, match="algorithm"):
        plan.slow_link_bytes("tree", S, 4, 1)


def test_hierarchical_diloco_halves_the_slow_link_bytes_of_flat_diloco_on_2x2():
    job, net = _job(workers=4, clusters=2), plan.Network(inter_mbit=100)
    flat = plan.predict(job, net, plan.Candidate("diloco", 4, 20, "int8"))
    hier = plan.predict(job, net, plan.Candidate("hierarchical", 4, 20, "int8"))
    ddp = plan.predict(job, net, plan.Candidate("ddp", 4))
    assert hier.slow_link_bytes_per_round == pytest.approx(flat.slow_link_bytes_per_round / 2, rel=0.01)
    assert ddp.slow_link_bytes_per_round == pytest.approx(plan.slow_link_bytes("ring", 4 * job.params, 4, 2))


def test_predictions_move_the_right_way():
    net_fast, net_slow = plan.Network(inter_mbit=10_000), plan.Network(inter_mbit=10)
    job = _job()
    d_fast = plan.predict(job, net_fast, plan.Candidate("ddp", 8))
    d_slow = plan.predict(job, net_slow, plan.Candidate("ddp", 8))
    assert d_slow.step_s > d_fast.step_s and d_slow.comm_share > d_fast.comm_share
    i8 = plan.predict(job, net_slow, plan.Candidate("diloco", 8, 50, "int8"))
    i4 = plan.predict(job, net_slow, plan.Candidate("diloco", 8, 50, "int4"))
    h10 = plan.predict(job, net_slow, plan.Candidate("diloco", 8, 10, "int8"))
    assert i4.slow_link_bytes_per_round < i8.slow_link_bytes_per_round
    assert i8.step_s < h10.step_s < d_slow.step_s
    strag = plan.predict(_job(speeds=[1.0] * 7 + [0.5]), net_slow, plan.Candidate("diloco", 8, 50, "int8"))
    assert strag.step_s == pytest.approx(i8.step_s + job.compute_s, rel=1e-6)  # everybody waits for the slow one
    flops = plan.Job(params=10_000_000, tokens=1e9, tokens_per_step=16_384, workers=8, flops=1e12)
    assert flops.compute_s == pytest.approx(6 * 10_000_000 * 16_384 / 1e12)


def test_critical_batch_grows_with_tokens_and_charges_larger_batches():
    fit = plan.CONVERGENCE_FIT
    d = fit["fitted_tokens_max"]
    inside = plan.critical_batch_tokens(d, fit["fitted_params_range"][0])
    assert inside == pytest.approx(fit["cbs"]["ref_batch_tokens"] * (d / fit["cbs"]["ref_tokens"]) ** fit["cbs"]["exponent"])
    assert plan.critical_batch_tokens(4 * d) >= plan.critical_batch_tokens(d)  # never shrinks with data
    assert plan.critical_batch_tokens(1000 * d) is None  # no estimate far outside the study
    assert plan.critical_batch_tokens(d, 10**9) is None
    assert plan.batch_token_factor(4096, 4096, 1000) == 1.0
    assert plan.batch_token_factor(8192, 4096, 1000) > 1.5
    # past the CBS, doubling the workers buys far less than 2x (diminishing returns), and the plan warns
    job, net = _job(workers=64, clusters=1, step_time_s=1.0), plan.Network(inter_mbit=1e6, intra_mbit=1e6)

    def gain(cbs):
        t = {w: plan.predict(job, net, plan.Candidate("ddp", w), critical_batch=cbs).time_to_ddp_loss_s
             for w in (32, 64)}
        return t[32] / t[64]
    assert gain(1e12) == pytest.approx(2.0, rel=0.02)
    assert gain(16_384) < 1.1
    p = plan.recommend(job, net, critical_batch=16_384)
    assert any("critical batch size" in w and "at most 1 worker" in w for w in p.warnings)


def test_recommend_prefers_diloco_on_a_slow_link_and_ddp_on_a_fast_one():
    slow = plan.recommend(_job(), plan.Network(inter_mbit=10), critical_batch=1e9, max_gap_pct=100)
    assert slow.best.candidate.method in ("diloco", "hierarchical")
    assert slow.best.speedup_vs_ddp > 1
    fast = plan.recommend(_job(clusters=1, step_time_s=10.0), plan.Network(inter_mbit=1e6, intra_mbit=1e6),
                          critical_batch=1e9, max_gap_pct=0.0)
    assert fast.best.candidate.method == "ddp"


@pytest.mark.parametrize("kw,needle", [
    (dict(workers=6, clusters=4), "multiple of clusters"),
    (dict(params=0), "params"),
    (dict(tokens=-1), "tokens"),
    (dict(step_time_s=None), "exactly one of step_time_s and flops"),
    (dict(flops=1e12), "exactly one of step_time_s and flops"),
    (dict(speeds=[1.0, 0.5]), "speeds"),
])
def test_bad_jobs_are_refused_with_the_reason(kw, needle):
    with pytest.raises(ValueError, match=needle):
        _job(**kw)


def test_bad_networks_and_candidates_are_refused():
    with pytest.raises(ValueError, match="inter_mbit"):
        plan.Network(inter_mbit=0)
    with pytest.raises(ValueError, match="latency"):
        plan.Network(inter_mbit=10, inter_latency_ms=-1)
    with pytest.raises(ValueError, match="format"):
        plan.predict(_job(), plan.Network(10), plan.Candidate("diloco", 8, 10, "int2"))
    with pytest.raises(ValueError, match="workers"):
        plan.predict(_job(), plan.Network(10), plan.Candidate("diloco", 9, 10, "int8"))
    with pytest.raises(ValueError, match="hierarchical"):
        plan.predict(_job(), plan.Network(10), plan.Candidate("hierarchical", 2, 10, "int8"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "localsgd_comm.plan", *args], capture_output=True, text=True,
                          timeout=60)


def test_cli_help_and_a_plan():
    h = _cli("--help")
    assert h.returncode == 0 and "localsgd-plan" in h.stdout and "example:" in h.stdout
    p = _cli("--params", "350M", "--tokens", "7B", "--tokens-per-step", "64k", "--step-time", "0.9", "--workers",
             "16", "--clusters", "2", "--inter-mbit", "1000")
    assert p.returncode == 0, p.stderr
    assert "recommended:" in p.stdout and "no critical-batch-size estimate at this scale" in p.stdout
    j = _cli("--params", "1M", "--tokens", "1e8", "--tokens-per-step", "4096", "--step-time", "0.05",
             "--workers", "4", "--inter-mbit", "100", "--json")
    out = json.loads(j.stdout)
    assert out["best"]["label"] and out["candidates"]


@pytest.mark.parametrize("args,needle", [
    (["--tokens", "1e9"], "required"),
    (["--params", "12X", "--tokens", "1e9", "--tokens-per-step", "4096", "--step-time", "1", "--workers", "4",
      "--inter-mbit", "10"], "expected a number"),
    (["--params", "1M", "--tokens", "1e9", "--tokens-per-step", "4096", "--step-time", "1", "--workers", "4",
      "--inter-mbit", "10", "--straggler", "2"], "--straggler"),
    (["--params", "1M", "--tokens", "1e9", "--tokens-per-step", "4096", "--step-time", "1", "--workers", "4",
      "--inter-mbit", "10", "--formats", "int3"], "formats"),
])
def test_cli_bad_input_names_the_problem(args, needle):
    p = _cli(*args)
    assert p.returncode == 2 and needle in p.stderr
