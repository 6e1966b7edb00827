"""tools/gpu_check.sh, the prepared GPU check: its dry run lists every step and touches nothing,
and every file a step runs exists (a step pointing at a moved test would only show on a GPU)."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")


def test_gpu_check_dry_run_lists_every_step_and_writes_nothing():
    before = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    r = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = re.findall(r"^== (\S+) \(limit (\d+)s\): (.*)$", r.stdout, re.M)
    assert [s[0] for s in steps] == ["facts", "preflight", "build", "errors", "ops", "backend", "streams", "train", "bench",
                                     "build_triton_only", "triton_only"]
    assert re.search(r"budget 480s", r.stdout)  # the whole check within 8 minutes
    for path in re.findall(r"((?:tests|benchmarks|tools)/\S+\.py)", r.stdout):
        assert os.path.isfile(os.path.join(ROOT, path)), path
    for mod in re.findall(r"-m (localsgd_comm\S+)", r.stdout):
        assert os.path.isfile(os.path.join(ROOT, *mod.split(".")) + ".py"), mod
    # what comes back from a device run: at most 8 files in the output folder
    outs = {os.path.basename(p) for p in re.findall(r"--out (\S+\.json)", r.stdout)}
    assert len(outs | {"gpu_check.log", "build.log", "ops.log", "backend.log", "train.log", "bench.log"}) <= 8
    after = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    assert after == before


def test_failed_steps_are_named_and_later_steps_still_run(tmp_path):
    """Without a GPU the preflight and the training step fail; both are named in the summary, the
    step between them runs anyway, and the exit status says the check failed."""
    r = subprocess.run(["bash", SCRIPT, "--only", "preflight,ops,train", "--budget", "200", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    log = (tmp_path / "gpu_check.log").read_text()
    assert r.returncode == 1, log
    assert re.search(r"^-- preflight: exit 1 after", log, re.M), log
    assert re.search(r"^-- ops: exit 0 after", log, re.M), log  # every GPU test skips cleanly
    assert re.search(r"^-- train: exit 2 after", log, re.M), log
    assert "gpu_check: failed: preflight train" in log
    assert "no CUDA device visible" in (tmp_path / "train.log").read_text()
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.log", "ops.log", "train.log"]


def test_a_spent_budget_skips_the_remaining_steps(tmp_path):
    r = subprocess.run(["bash", SCRIPT, "--only", "preflight,ops", "--budget", "3", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    log = (tmp_path / "gpu_check.log").read_text()
    assert r.returncode == 1
    assert "-- preflight: SKIPPED: the budget of 3s is spent" in log
    assert "gpu_check: failed: preflight ops" in log
