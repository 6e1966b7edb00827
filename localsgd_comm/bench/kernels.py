"""``localsgd-bench kernels``: runs the CPU op microbenchmarks of :mod:`localsgd_comm.bench.ops` (C++
op vs eager composition vs torch.compile vs a memcpy baseline) in a child process, so that a
crash or a hang of one case cannot take the CLI with it. Works from an installed package too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Optional, Sequence

import localsgd_comm

from . import report


def run_suite(out_dir: str, quick: bool = False, log=print, timeout_s: float = 3600,
              extra_args: Sequence[str] = ()) -> Optional[dict]:
    """``extra_args``: more options of ``python -m localsgd_comm.bench.ops`` (e.g. ``--sizes``)."""
    name = "kernels_quick" if quick else "kernels"
    out = os.path.join(out_dir, name + ".json")
    cmd = [sys.executable, "-m", "localsgd_comm.bench.ops", "--out", out] + (["--quick"] if quick else [])
    cmd += list(extra_args)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the child runs the package this process runs (a checkout that is not installed, too)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(localsgd_comm.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in [env.get("PYTHONPATH")] if p])
    log(f"[kernels] {' '.join(cmd[1:])} "
        f"({'about 30-90 s' if quick else 'about 20-40 min'} on 2 cores; one line per case as it finishes)")
    load0 = report.load_snapshot()
    # Streamed line by line: the suite runs for minutes and must show that it is alive.
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail = []
    try:
        for line in p.stdout:
            line = line.rstrip("\n")
            tail = (tail + [line])[-40:]
            log(f"[kernels] {line}")
        rc = p.wait(timeout=timeout_s)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if rc != 0:
        log(f"[kernels] FAILED (exit {rc}); last lines above")
        return None
    with open(out) as f:
        res = json.load(f)
    res.update(benchmark="kernels", quick=quick, load_before=load0)
    res["environment"] = report.environment()
    report.write_artifacts(out_dir, name, res, markdown(res), plot)
    return res


_MEMCPY_NOTE = ("% of memcpy: the op's bandwidth, (bytes it reads + bytes it writes) / median time, over the "
                "bandwidth of a memcpy of the same number of bytes measured in the same run. Above 100% the op "
                "moves its bytes faster than a plain copy, e.g. when its output stays in cache.")


def markdown(res: dict) -> str:
    rows = [(s["case"], s["numel"], s["threads"], s.get("ours_gbps"), s.get("eager_gbps"), s.get("compile_gbps"),
             s.get("speedup_vs_eager"), s.get("speedup_vs_compile"), s.get("pct_of_memcpy"))
            for s in res.get("summary", [])]
    head = ("case", "elements", "threads", "ours GB/s", "eager GB/s", "torch.compile GB/s", "x eager",
            "x compile", "% of memcpy")
    env = res.get("environment", {})
    return (f"# CPU kernels ({'quick' if res.get('quick') else 'full'})\n\n"
            f"Machine: {env.get('machine', {}).get('cpu_model')}, {env.get('machine', {}).get('cores')} cores; "
            f"torch {env.get('versions', {}).get('torch')}; commit {env.get('git_commit')}.\n\n"
            + report.md_table(head, rows) + f"\n\n{_MEMCPY_NOTE}\n")


def plot(res: dict, path: str) -> None:
    pyplot = report.plt()
    summ = res.get("summary", [])
    if not summ:
        report.placeholder_png(path, "kernels", "no results")
        return
    n = max(s["numel"] for s in summ)
    rows = [s for s in summ if s["numel"] == n and s["threads"] == min(x["threads"] for x in summ)]
    fig, axes = pyplot.subplots(1, 2, figsize=(13, 4.5))
    names = [s["case"] for s in rows]
    axes[0].barh(names, [s.get("pct_of_memcpy", 0) for s in rows], color="tab:blue")
    axes[0].axvline(100, color="k", lw=0.8)
    axes[0].set_xlabel("% of memcpy bandwidth (same bytes, same run)")
    axes[1].barh(names, [s.get("speedup_vs_eager", 0) for s in rows], color="tab:green", label="vs eager")
    axes[1].barh(names, [s.get("speedup_vs_compile", 0) for s in rows], color="tab:orange", alpha=0.6,
                 label="vs torch.compile")
    axes[1].axvline(1, color="k", lw=0.8)
    axes[1].set_xlabel("speedup of the fused C++ op")
    axes[1].legend()
    fig.suptitle(f"CPU kernels at {n:,} elements, {rows[0]['threads']} thread(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot.close(fig)
