"""The main job: CLI end to end with tiny settings, the reusable API, argument errors."""
import json
import math
import os
import subprocess
import sys

import pytest

from localsgd_comm.train import TrainConfig, main, run_modes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model-size", "tiny", "--steps", "6", "--sync-every", "3", "--eval-every", "3", "--batch-size", "4",
        "--seq-len", "32", "--no-progress"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(args, tmp_path, timeout=180):
    return subprocess.run([sys.executable, "-m", "localsgd_comm.train", *args], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_cli_end_to_end_with_ddp_baseline(tmp_path):
    out = tmp_path / "run"
    r = _cli(TINY + ["--baseline", "ddp", "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validation loss" in r.stdout and "diloco" in r.stdout and "ddp" in r.stdout
    runs = json.loads((out / "metrics.json").read_text())["runs"]
    assert [x["mode"] for x in runs] == ["diloco", "ddp"]
    for run in runs:
        assert len(run["records"]) == 6
        assert run["tokens"] == 6 * 4 * 32 * 2
        assert math.isfinite(run["final_val_loss"]) and run["final_val_loss"] < math.log(256) + 0.5
        assert run["bytes_sent_per_rank"] > 0
        assert [x["step"] for x in run["records"] if "val_loss" in x] == [3, 6]
    dil, ddp = runs
    assert dil["syncs"] == 2
    # 2 int8 syncs vs 6 fp32 gradient all-reduces: far fewer bytes
    assert dil["bytes_sent_per_rank"] < ddp["bytes_sent_per_rank"] / 4
    png = out / "loss.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,msg", [
    (["--compression", "int3"], "compression"),
    (["--workers", "0"], "workers"),
    (["--sync-every", "0"], "sync_every"),
    (["--model-size", "huge"], "model_size"),
    (["--baseline", "ddp-localsgd", "--backend", "gloo"], "ddp-localsgd"),
])
def test_cli_bad_arguments(args, msg, capsys):
    # main() validates before spawning anything: exit status 2 and the problem named
    assert main(TINY + args) == 2
    assert msg in capsys.readouterr().err


def test_api_all_modes_per_rank_env(tmp_path):
    """run_modes: one spawn, three modes; per-rank environment (the hook time-to-loss benchmarks
    use for GLOO_SOCKET_IFNAME inside network namespaces) reaches the workers."""
    cfg = TrainConfig(model_size="tiny", steps=4, sync_every=2, eval_every=4, batch_size=4, seq_len=32,
                      progress=False, warmup_steps=1, rank_env=[{"GLOO_SOCKET_IFNAME": "lo"}] * 2)
    runs = run_modes(cfg, ["diloco", "ddp", "ddp-localsgd"])
    assert [r["mode"] for r in runs] == ["diloco", "ddp", "ddp-localsgd"]
    for r in runs:
        recs = r["records"]
        assert [x["step"] for x in recs] == [1, 2, 3, 4]
        assert all(b["wall_s"] >= a["wall_s"] and b["bytes_sent"] >= a["bytes_sent"] for a, b in zip(recs, recs[1:]))
        assert math.isfinite(r["final_val_loss"])
    # the localsgd backend's counters are the byte source for the two modes that use it
    assert runs[0]["bytes_source"] == "backend counters" and runs[2]["bytes_source"] == "backend counters"
    # same data and init: the first step's loss (before any update) is identical in all modes
    assert runs[0]["records"][0]["loss"] == runs[1]["records"][0]["loss"] == runs[2]["records"][0]["loss"]


def test_config_validation():
    with pytest.raises(ValueError, match="rank_env"):
        TrainConfig(rank_env=[{}]).validate()
    with pytest.raises(ValueError, match="mode"):
        TrainConfig(mode="fsdp").validate()
    with pytest.raises(ValueError, match="data"):
        TrainConfig(data="/nonexistent/file.txt").validate()


def test_overlap_run_applies_every_sync_it_launches():
    """overlap=True with steps not a multiple of sync_every: the closing sync's reduce must be
    applied too (it was launched after the flush, left pending, and the final partial round
    discarded). 5 steps, sync_every=2: syncs at steps 2 and 4 and the closing one."""
    cfg = TrainConfig(model_size="tiny", steps=5, sync_every=2, eval_every=5, batch_size=4, seq_len=32,
                      progress=False, warmup_steps=1, overlap=True)
    (run,) = run_modes(cfg, ["diloco"])
    assert run["syncs"] == 3
    assert run["applied_syncs"] == 3
