"""Result files: machine/versions/commit/load metadata, JSON writing, Markdown tables, plots."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Iterable, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def repo_checkout() -> Optional[str]:
    """The source tree this package runs from, if it is one (has benchmarks/ and setup.py)."""
    if os.path.isdir(os.path.join(REPO_ROOT, "benchmarks")) and os.path.isfile(
            os.path.join(REPO_ROOT, "setup.py")):
        return REPO_ROOT
    return None


def default_out_dir() -> str:
    # Relative to the working directory: the path ends up in the logs and results, which must
    # not carry the layout of the machine they were measured on.
    root = repo_checkout()
    if root is not None and os.path.abspath(os.getcwd()).startswith(root):
        return os.path.relpath(os.path.join(root, "benchmarks", "results"))
    return "localsgd_bench_results"


def _cmd(args: List[str], cwd: Optional[str] = None) -> Optional[str]:
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_snapshot() -> dict:
    """Load average and the number of runnable tasks: other work on the same cores skews every
    timing, so each result records the load it was measured under."""
    snap = {}
    try:
        snap["loadavg_1_5_15"] = [float(v) for v in os.getloadavg()]
    except OSError:
        pass
    try:
        with open("/proc/loadavg") as f:
            snap["runnable_tasks"] = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        pass
    return snap


def environment() -> dict:
    import torch
    try:
        import triton
        triton_v = triton.__version__
    except Exception:
        triton_v = None
    gcc = _cmd(["gcc", "--version"])
    root = repo_checkout()
    commit = _cmd(["git", "rev-parse", "HEAD"], cwd=root) if root else None
    dirty = _cmd(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root) if root else None
    return {
        "machine": {
            "cpu_model": _cpu_model(),
            "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton_v,
            "gcc": gcc.splitlines()[0] if gcc else None,
            "localsgd_comm": _pkg_version(),
        },
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([_prog()] + sys.argv[1:]),
        "load": load_snapshot(),
    }


def _prog() -> str:
    name = os.path.basename(sys.argv[0])
    # ``python -m localsgd_comm.bench.cli`` is the console script under another name
    return "localsgd-bench" if name in ("cli.py", "__main__.py", "localsgd-bench") else name


def _pkg_version() -> Optional[str]:
    try:
        import localsgd_comm
        return localsgd_comm.__version__
    except Exception:
        return None


def write_json(path: str, obj: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)
    return path


def md_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            if v == 0:
                return "0"
            if abs(v) >= 100:
                return f"{v:.0f}"
            if abs(v) >= 1:
                return f"{v:.2f}"
            return f"{v:.3g}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def plt():
    import matplotlib
    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as pyplot
    return pyplot
