"""Smoke tests of the benchmark harness (localsgd-bench): launcher, namespaces, reporting.

Budget ~60-90 s on 2 cores: one quick loopback collectives run through the CLI (2 ranks per
method), one 100 Mbit/s shaped-link check, and pure-function checks. Speed is never asserted;
the shaped-link test only checks that the shaping is in force (a rate within a wide band).
"""
import json
import math
import os
import sys
import subprocess

import pytest

from localsgd_comm.bench import cli, collectives, launch, netns, time_to_loss
from localsgd_comm import functional

NETNS_WHY = netns.availability()


def _our_namespaces(prefix):
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith(prefix)]


@pytest.mark.parametrize("fmt", ["none", "int8", "int4"])
@pytest.mark.parametrize("numel", [1, 127, 128, 1000, 1 << 20])
def test_ideal_bytes_matches_wire_format(fmt, numel):
    # The ideal volume must use the real encoded size (payload + one fp32 scale per block),
    # else every wire/ideal ratio in the results would be off.
    for world in (2, 4):
        want = 2 * (world - 1) / world * functional.compressed_nbytes(fmt, numel, 128)
        assert collectives.ideal_bytes_per_rank(fmt, numel, world, 128) == want


def test_smooth_and_analyse():
    assert time_to_loss.smooth([4.0, 2.0, 0.0, 2.0], 2) == [4.0, 3.0, 1.0, 1.0]
    steps = 10
    ddp = {"net": "10mbit", "rate_mbit": 10, "method": "ddp-gloo", "steps": steps,
           "loss_mean": [5.0 - 0.4 * i for i in range(steps)],  # ends at 1.4
           "elapsed_s_max": [float(i + 1) * 10 for i in range(steps)],
           "tx_bytes_per_rank_mean": [1e6 * (i + 1) for i in range(steps)]}
    fast = dict(ddp, method="diloco-int4", loss_mean=[5.0 - 0.8 * i for i in range(steps)],
                elapsed_s_max=[float(i + 1) for i in range(steps)])
    never = dict(ddp, method="diloco-int8", loss_mean=[3.0] * steps)
    rows = {r["method"]: r for r in time_to_loss.analyse([ddp, fast, never], window=1)}
    assert rows["ddp-gloo"]["target_loss"] == pytest.approx(1.4)
    assert rows["ddp-gloo"]["speedup_to_ddp_final_loss"] == pytest.approx(1.0)
    # 5 - 0.8 i <= 1.4 first at i = 5 (t = 6 s) vs DDP's 100 s
    assert rows["diloco-int4"]["steps_to_target"] == 6
    assert rows["diloco-int4"]["speedup_to_ddp_final_loss"] == pytest.approx(100 / 6)
    assert rows["diloco-int8"]["time_to_target_s"] is None
    # common loss 3.0: DDP gets there at i = 5 (60 s), the flat run at i = 0 (10 s)
    assert rows["diloco-int8"]["common_loss"] == pytest.approx(3.0)
    assert rows["diloco-int8"]["speedup_at_common_loss"] == pytest.approx(6.0)


def test_default_output_directory_is_a_fresh_relative_run_folder(tmp_path, monkeypatch):
    # Logs and results record it: no path of the measuring machine may end up in them; and a run
    # never writes into the committed benchmarks/results unless asked (--update-results).
    from localsgd_comm.bench import report
    d = report.default_out_dir("kernels-quick")
    assert not os.path.isabs(d)
    assert d.startswith("localsgd_bench_results" + os.sep) and d.endswith("-kernels-quick")
    assert "benchmarks" not in d
    monkeypatch.chdir(tmp_path)  # outside a checkout: the same
    assert report.default_out_dir("x").startswith("localsgd_bench_results" + os.sep)
    assert report.committed_results_dir().endswith(os.path.join("benchmarks", "results"))


@pytest.mark.parametrize("argv,needle", [
    (["collectives", "--quick", "--nets", "foo"], "--nets: unknown link(s) ['foo']"),
    (["time-to-loss", "--nets", "loopback"], "--nets: unknown link(s) ['loopback']"),
    (["kernels", "--nets", "1gbit"], "--nets applies to"),
    (["time-to-loss", "--methods", "diloco-int3"], "--methods: unknown method(s) ['diloco-int3']"),
    (["collectives", "--methods", "ddp-gloo"], "--methods applies to time-to-loss"),
    (["time-to-loss", "--steps", "0"], "--steps: expected an integer >= 1"),
    (["kernels", "--update-results", "--out", "x"], "cannot be combined with --out"),
    (["faults", "--nets", "1gbit"], "--nets applies to"),
    (["faults", "--steps", "10"], "--steps applies to time-to-loss"),
    (["frobnicate"], "invalid choice"),
])
def test_bench_flags_are_checked_before_anything_runs(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "localsgd_bench_results").exists()  # nothing was started or written


def test_bench_help_says_what_each_suite_measures(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for suite in ("kernels", "collectives", "time-to-loss", "faults", "all", "linkcheck", "cleanup"):
        assert f"  {suite} " in text
    assert text.count("--quick: about") >= 4


def test_bench_run_in_a_checkout_leaves_git_status_clean(tmp_path):
    """The default output folder is a fresh, git-ignored run folder: no tracked or untracked file
    of the checkout changes (the committed results stay as they are)."""
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(repo, ".git")):
        pytest.skip("not a git checkout")
    before = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "localsgd_comm.bench.cli", "time-to-loss", "--quick",
                        "--methods", "ddp-gloo", "--steps", "2"], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    after = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    assert after == before
    m = [line for line in r.stdout.splitlines() if "results in " in line]
    out = m[-1].split("results in ")[-1].strip()
    assert out.startswith("localsgd_bench_results")
    for ext in ("json", "md", "png"):
        assert os.path.isfile(os.path.join(repo, out, f"time_to_loss_quick.{ext}")), ext
    import shutil
    shutil.rmtree(os.path.join(repo, out))


def test_time_to_loss_ranks_train_with_the_configured_method():
    # The driver's command lines: every config key passed on, the -2x run with twice the steps.
    cfg = time_to_loss.config(quick=True)
    args = time_to_loss.rank_args(cfg, "diloco-int4-2x", "veth0")
    assert f"--steps={2 * cfg['steps']}" in args and f"--outer-momentum={cfg['outer_momentum']}" in args
    assert f"--steps={cfg['steps']}" in time_to_loss.rank_args(cfg, "diloco-int4", "veth0")
    # A rank of that run on loopback (2 workers, 6 steps, H=3): int4 syncs, a finite loss.
    args = time_to_loss.rank_args(dict(cfg, steps=3, sync_every=3), "diloco-int4-2x", "")
    r = launch.run_ranks(2, "localsgd_comm.bench.time_to_loss", args, timeout_s=120)
    assert r["method"] == "diloco-int4-2x" and r["steps"] == 6 and r["world"] == 2
    assert len(r["loss_mean"]) == 6 and all(math.isfinite(v) for v in r["loss_mean"])
    st = r["diloco_stats"]
    # int4 on the wire: about a quarter of a byte per parameter and sync, far below fp32's 4
    assert st["syncs"] == 2 and 0 < st["bytes_sent"] < 2 * 0.6 * r["n_params"], st


def test_cli_collectives_quick_loopback(tmp_path):
    # The whole CLI path: localsgd probe, namespace (if permitted), 2 ranks per method, JSON,
    # Markdown and PNG. The checks are on correctness of what is reported, not on speed.
    rc = cli.main(["collectives", "--quick", "--nets", "loopback", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "collectives_quick.json").read_text())
    for key in ("cpu_model", "cores"):
        assert key in res["environment"]["machine"]
    for key in ("python", "torch", "triton", "gcc"):
        assert key in res["environment"]["versions"]
    rows = res["results"]
    methods = {r["method"] for r in rows}
    assert "gloo-fp32" in methods
    assert {r["size_mb"] for r in rows} == {1, 16}
    for r in rows:
        assert r["time_s_median"] > 0 and r["iters"] >= 3
        if r["method"] in ("gloo-fp32", "localsgd-none"):
            assert r["rel_l2_error"] < 1e-6  # an fp32 sum of base*(r+1): exact up to rounding
        elif r["method"] == "localsgd-int8":
            # two roundings of <= scale/2 each, scale = absmax/127 of a Gaussian block
            assert r["rel_l2_error"] < 0.05
        elif r["method"] == "localsgd-int4":
            assert r["rel_l2_error"] < 0.5
        if r["wire_tx_bytes_per_rank"] is not None:
            # measured interface bytes >= ideal volume; TCP/IP headers + ACKs add a few %
            assert 0.99 < r["wire_tx_bytes_per_rank"] / r["ideal_bytes_per_rank"] < 1.25
    if NETNS_WHY is None:
        assert all(r["wire_tx_bytes_per_rank"] is not None for r in rows)
    assert (tmp_path / "collectives_quick.md").read_text().count("| loopback |") == len(rows)
    assert (tmp_path / "collectives_quick.png").stat().st_size > 0


@pytest.mark.skipif(NETNS_WHY is not None, reason=f"shaped links unavailable: {NETNS_WHY}")
def test_shaped_link_follows_rate_and_is_removed():
    with netns.ShapedNetwork(2, rate_mbit=100) as net:
        prefix = net.prefix
        assert len(_our_namespaces(prefix)) == 3  # hub + 2 ranks
        r = collectives.verify_link(net, 2, mbytes=2.0, timeout_s=120)
    # tbf caps the rate (the burst lets ~64 KiB of 2 MiB through unshaped: +3%); gloo reaches
    # ~94% of it on an idle machine, much less when other work holds the cores: wide band.
    assert 0.2 < r["mbit_s"] / 100 < 1.1, r
    assert _our_namespaces(prefix) == []


@pytest.mark.skipif(NETNS_WHY is not None, reason=f"shaped links unavailable: {NETNS_WHY}")
def test_cleanup_removes_leftovers_of_dead_runs():
    # A namespace named like one of a run whose process is gone (pid 2^22 + 1 is above the
    # kernel's pid_max limit, so it can never be alive).
    name = f"{netns.PREFIX}{(1 << 22) + 1}x0h"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in netns.cleanup_leftovers()
        assert name not in _our_namespaces(netns.PREFIX)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_shaped_network_rejects_bad_arguments():
    with pytest.raises(ValueError, match="expected 1 <= world"):
        netns.ShapedNetwork(0)
    with pytest.raises(ValueError, match="expected a positive rate"):
        netns.ShapedNetwork(2, rate_mbit=0)


def test_kernels_run_from_an_installed_package(tmp_path):
    """``localsgd-bench kernels`` needs no source tree: the package alone (copied away from the
    checkout, as an installed copy is) runs its op benchmarks and writes the results."""
    import shutil
    import subprocess
    import sys

    import localsgd_comm
    site = tmp_path / "site"
    shutil.copytree(os.path.dirname(localsgd_comm.__file__), site / "localsgd_comm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys; from localsgd_comm.bench import kernels, report; "
            "assert report.repo_checkout() is None, report.repo_checkout(); "
            "r = kernels.run_suite(sys.argv[1], quick=True, extra_args=['--sizes', '4096', '--cases', "
            "'quantize[int8]', '--no-compile']); "
            "assert r is not None and r['summary'], r; print('ran', len(r['results']))")
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "ran" in p.stdout and (tmp_path / "out" / "kernels_quick.json").exists()
