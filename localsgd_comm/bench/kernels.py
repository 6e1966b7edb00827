"""``localsgd-bench kernels``: runs the CPU op microbenchmarks of benchmarks/bench_ops.py (C++ op
vs eager composition vs torch.compile vs a memcpy baseline) in a child process.

The script lives in the source tree, not in the installed package: from an installed copy
this reports that the checkout is needed instead of failing obscurely.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Optional

from . import report


def script_path() -> Optional[str]:
    root = report.repo_checkout()
    if root is None:
        return None
    p = os.path.join(root, "benchmarks", "bench_ops.py")
    return p if os.path.isfile(p) else None


def run_suite(out_dir: str, quick: bool = False, log=print, timeout_s: float = 3600) -> Optional[dict]:
    script = script_path()
    if script is None:
        log("[kernels] SKIP: the kernel microbenchmarks are benchmarks/bench_ops.py in the "
            "localsgd-comm source tree; run localsgd-bench from a checkout to include them")
        return None
    name = "kernels_quick" if quick else "kernels"
    out = os.path.join(out_dir, name + ".json")
    cmd = [sys.executable, script, "--out", out] + (["--quick"] if quick else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log(f"[kernels] {' '.join(os.path.basename(c) if c == script else c for c in cmd[1:])}")
    load0 = report.load_snapshot()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    log(p.stdout[-6000:])
    if p.returncode != 0:
        log(f"[kernels] FAILED (exit {p.returncode}):\n{p.stderr[-4000:]}")
        return None
    with open(out) as f:
        res = json.load(f)
    res.setdefault("load_before", load0)
    res.setdefault("environment_localsgd_bench", report.environment())
    report.write_json(out, res)
    return res
