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
    (["--compression", "int3"], "--compression: expected one of"),
    (["--workers", "0"], "--workers: expected >= 1"),
    (["--sync-every", "0"], "--sync-every: expected >= 1"),
    (["--model-size", "huge"], "--model-size: expected one of"),
    (["--baseline", "ddp-localsgd", "--backend", "gloo"], "ddp-localsgd"),
    (["--outer-momentum", "1.5"], "--outer-momentum: expected a number in [0, 1)"),
    (["--lr", "0"], "--lr: expected a finite number > 0"),
    (["--error-feedback", "--compression", "none"], "--error-feedback: expected a quantizing compression"),
    (["--batch-size", "0"], "--batch-size / --seq-len"),
    (["--master-port", "70000"], "--master-port: expected a port"),
    (["--out", "/proc/nope"], "--out: cannot write to '/proc/nope'"),
])
def test_cli_bad_arguments(args, msg, capsys):
    # main() validates before spawning anything: exit status 2 and the problem named by its flag
    assert main(TINY + args) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_cli_port_in_use_and_too_little_data_are_one_line_errors(tmp_path, capsys):
    """Both used to end in 20-30-line tracebacks from inside the workers."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(TINY + ["--master-port", str(port), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert f"--master-port: port {port} on 127.0.0.1 cannot be used" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 3000)
    assert main(TINY + ["--data", str(small), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "--data: " in err and "has 3000 bytes" in err and "needs at least 4096" in err
    assert main(TINY + ["--data", str(small), "--seq-len", "3000", "--out", str(tmp_path / "c")]) == 2
    assert "needs at least" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")  # nothing created for a refused run


def test_cli_out_that_is_a_file_fails_before_training(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("keep me")
    assert main(TINY + ["--out", str(f)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert f.read_text() == "keep me"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message of a CPU-only machine")
@pytest.mark.parametrize("args,msg", [
    (["--device", "cuda"], "--device: 'cuda' needs a CUDA build of torch"),
    (["--backend", "nccl"], "--backend: 'nccl' is not available"),
])
def test_cli_unavailable_device_or_backend_is_explained(args, msg, capsys):
    import torch
    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch: the CPU-build message does not apply")
    assert main(TINY + args) == 2
    assert msg in capsys.readouterr().err


def test_cli_help_explains_every_flag():
    from localsgd_comm.train import _parser
    for action in _parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"
    r = subprocess.run([sys.executable, "-m", "localsgd_comm.train", "--help"], env=_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "Train a small byte-level GPT with DiLoCo" in text
    for shown in ("local worker processes (one CPU thread each) (default: 2)", "(H) (default: 25)",
                  "optimizer steps per worker (default: 200)"):
        assert shown in text, shown


def test_cli_start_line_and_link_comparison(tmp_path):
    r = _cli(TINY + ["--out", str(tmp_path / "run")], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("localsgd-train: 2 workers, tiny GPT") and "Expected about" in first
    assert "plain DDP would send" in r.stdout and "on a 10 Mbit/s link" in r.stdout
    assert "localsgd-bench time-to-loss" in r.stdout


def test_cli_ctrl_c_stops_cleanly_with_one_line(tmp_path):
    """Ctrl-C in a terminal signals the whole process group: one line, exit 130, no traceback,
    no worker left behind."""
    import signal
    import time
    p = subprocess.Popen([sys.executable, "-m", "localsgd_comm.train", "--model-size", "tiny", "--steps", "100000",
                          "--out", str(tmp_path / "run")], cwd=tmp_path, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout.readline().startswith("localsgd-train:")
        time.sleep(8)  # workers started and training
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "leaked" not in err, err
    assert err.strip().splitlines()[-1].startswith("localsgd-train: interrupted")
    assert not (tmp_path / "run").exists()  # created by the run, never written to: removed
    # no process of the group is left (multiprocessing's resource tracker exits once it sees the
    # parent's end of its pipe close; give it a moment)
    deadline = time.monotonic() + 15
    while True:
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, subprocess.run(["ps", "-o", "pid,args", "-g", str(p.pid)],
                                                           capture_output=True, text=True).stdout
        time.sleep(0.2)


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
