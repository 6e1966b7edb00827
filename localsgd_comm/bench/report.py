"""Result files: machine/versions/commit/load metadata, JSON writing, Markdown tables, plots."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Dict, Iterable, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def repo_checkout() -> Optional[str]:
    """The source tree this package runs from, if it is one (has benchmarks/ and setup.py)."""
    if os.path.isdir(os.path.join(REPO_ROOT, "benchmarks")) and os.path.isfile(
            os.path.join(REPO_ROOT, "setup.py")):
        return REPO_ROOT
    return None


def default_out_dir(what: str = "run") -> str:
    """A fresh run folder, ``localsgd_bench_results/<UTC time>-<what>``, relative to the working
    directory (paths end up in logs and results, which must not carry the layout of the machine
    they were measured on). Never the committed ``benchmarks/results``: that takes
    ``--update-results``. The folder name is in the project's .gitignore, so a run inside a
    checkout leaves ``git status`` clean."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return os.path.join("localsgd_bench_results", f"{stamp}-{what}")


def committed_results_dir() -> Optional[str]:
    """``benchmarks/results`` of the checkout this package runs from (None: not a checkout),
    relative to the working directory when it lies below it."""
    root = repo_checkout()
    if root is None:
        return None
    path = os.path.join(root, "benchmarks", "results")
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


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


def write_artifacts(out_dir: str, name: str, result: dict, markdown: str, plot_fn=None) -> Dict[str, str]:
    """The four artefacts every suite writes, under one schema: ``name.json`` (``benchmark``,
    ``quick``, ``environment`` = machine, versions, commit, date, command, load; then the suite's
    figures), ``name.md`` (the tables), ``name.png`` (``plot_fn(result, path)``, or a figure
    that states why there is nothing to plot); the log is the run's ``localsgd_bench_*.log``."""
    result.setdefault("environment", environment())
    paths = {"json": write_json(os.path.join(out_dir, name + ".json"), result)}
    paths["md"] = os.path.join(out_dir, name + ".md")
    with open(paths["md"], "w") as f:
        f.write(markdown.rstrip() + "\n")
    paths["png"] = os.path.join(out_dir, name + ".png")
    if plot_fn is not None:
        plot_fn(result, paths["png"])
    else:
        placeholder_png(paths["png"], name, markdown.strip().splitlines()[0] if markdown.strip() else "no data")
    return paths


def placeholder_png(path: str, title: str, text: str) -> None:
    """A figure that says why a suite has nothing to plot (e.g. skipped: no network namespaces)."""
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 1.8))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, text[:200], ha="center", va="center", wrap=True)
    fig.savefig(path, dpi=90)
    pyplot.close(fig)


def plt():
    import matplotlib
    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as pyplot
    return pyplot


def rerender(json_path: str, analyse_fn, markdown_fn, plot_fn) -> dict:
    """Recompute a saved suite's figures (``out.update(analyse_fn(out))``), Markdown and PNG:
    analysis changes need no rerun."""
    with open(json_path) as f:
        out = json.load(f)
    out.update(analyse_fn(out))
    write_json(json_path, out)
    base = json_path[:-len(".json")]
    with open(base + ".md", "w") as f:
        f.write(markdown_fn(out).rstrip() + "\n")
    plot_fn(out, base + ".png")
    return out
