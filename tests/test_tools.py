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
    assert [s[0] for s in steps] == ["facts", "build", "gpu_op_tests", "gpu_backend_tests", "bench_native",
                                     "bench_triton"]
    assert sum(int(s[1]) for s in steps) <= 8 * 60  # the budget for the whole check
    for path in re.findall(r"(tests/\S+\.py|benchmarks/\S+\.py)", r.stdout):
        assert os.path.isfile(os.path.join(ROOT, path)), path
    after = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    assert after == before
