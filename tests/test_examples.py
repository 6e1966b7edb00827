"""examples/: the DDP and DiLoCo scripts differ by at most three lines, and both run."""
import difflib
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX = os.path.join(REPO, "examples")


def _read(name):
    with open(os.path.join(EX, name)) as f:
        return f.read().splitlines()


def test_examples_differ_by_at_most_three_lines():
    diff = list(difflib.unified_diff(_read("ddp_train.py"), _read("diloco_train.py"), lineterm="", n=0))
    removed = [l for l in diff if l.startswith("-") and not l.startswith("---")]
    added = [l for l in diff if l.startswith("+") and not l.startswith("+++")]
    assert 0 < max(len(removed), len(added)) <= 3, "\n".join(diff)
    assert any("DiLoCo" in l for l in added)


@pytest.mark.parametrize("script,label", [("ddp_train.py", "ddp"), ("diloco_train.py", "diloco")])
def test_example_runs(script, label):
    env = dict(os.environ, OMP_NUM_THREADS="1", EXAMPLE_STEPS="20")  # 20 steps = one DiLoCo sync
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.join(EX, script)], env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(rf"{label}: validation loss (\S+)", r.stdout)
    assert m, r.stdout
    assert float(m.group(1)) < 5.0  # ln(256) = 5.55 at init: 20 steps must have learned something


@pytest.mark.parametrize("script", ["ddp_train.py", "diloco_train.py"])
def test_example_help_and_bad_steps(script):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.join(EX, script), "--help"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "differ by three lines" in r.stdout and "step" not in r.stdout.split("\n")[0]
    r = subprocess.run([sys.executable, os.path.join(EX, script)], env=dict(env, EXAMPLE_STEPS="abc"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "EXAMPLE_STEPS: expected a positive integer" in r.stderr and "Traceback" not in r.stderr
