"""What the call header costs: every collective of the localsgd backend first sends each peer a
64-byte header and compares them before data moves (``BackendOptions.check_calls``).

2 ranks on loopback (one process each, one thread). Four configurations, {int8, none} x
{check_calls on, off}, each run in its own pair of fresh processes (one group per process, as a
training job has), alternating configuration after configuration for ``--rounds`` rounds so that
machine noise hits all alike. Each run times ``--calls`` blocking all-reduces one by one per
size, after a warm-up. Reports the 10th percentile and the median over all timed calls, and on /
off for each: on a 2-core machine running 2 ranks of several threads each, 10-50% of the calls
of any configuration stall for a scheduler tick or two (4-8 ms), which moves medians by more than
the header costs; the 10th percentile is the cost of a call that was not preempted::

    python benchmarks/call_check_overhead.py --out benchmarks/results/call_check_overhead

"int8" is the compressed all-reduce (every DiLoCo sync), "none" the pass-through all-reduce
(what DDP traffic, broadcasts and small tensors take).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_GROUPS = [("int8", True), ("int8", False), ("none", True), ("none", False)]


def _worker(rank: int, world: int, store_file: str, fmt: str, check: bool, sizes, calls: int, out: str) -> None:
    torch.set_num_threads(1)
    from localsgd_comm import BackendOptions
    dist.init_process_group("localsgd", store=dist.FileStore(store_file, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=120), pg_options=BackendOptions(format=fmt, check_calls=check))
    times = {}
    for n in sizes:
        x = torch.randn(n // 4, generator=torch.Generator().manual_seed(rank))
        for _ in range(5):  # warm-up: connections, workspace
            dist.all_reduce(x)
        dist.barrier()
        ts = []
        for _ in range(calls):
            t0 = time.perf_counter()
            dist.all_reduce(x)
            ts.append(time.perf_counter() - t0)
        times[n] = ts
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(times, fh)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="4096,65536,1048576,4194304", help="tensor bytes (fp32)")
    ap.add_argument("--calls", type=int, default=100, help="timed calls per configuration, size and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="call_check_overhead")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    times = {f"{f}/{'on' if c else 'off'}/{n}": [] for f, c in _GROUPS for n in sizes}
    for _ in range(a.rounds):
        for f, c in _GROUPS:
            with tempfile.TemporaryDirectory() as tmp:
                raw = os.path.join(tmp, "times.json")
                mp.start_processes(_worker, args=(2, os.path.join(tmp, "store"), f, c, sizes, a.calls, raw),
                                   nprocs=2, join=True, start_method="spawn")
                with open(raw) as fh:
                    for n, ts in json.load(fh).items():
                        times[f"{f}/{'on' if c else 'off'}/{n}"] += ts
    med = {k: statistics.median(v) for k, v in times.items()}
    p10 = {k: sorted(v)[len(v) // 10] for k, v in times.items()}
    rows = []
    for f in ("int8", "none"):
        for n in sizes:
            on, off = f"{f}/on/{n}", f"{f}/off/{n}"
            rows.append({"format": f, "bytes": n, "on_p10_ms": 1e3 * p10[on], "off_p10_ms": 1e3 * p10[off],
                         "ratio_p10": p10[on] / p10[off], "on_median_ms": 1e3 * med[on],
                         "off_median_ms": 1e3 * med[off], "ratio_median": med[on] / med[off]})
    result = {
        "what": "time of one blocking all-reduce (rank 0; 10th percentile and median), 2 ranks on loopback, check_calls on vs off",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "calls": a.calls, "rounds": a.rounds, "rows": rows, "all_s": times,
    }
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as fh:
        json.dump(result, fh, indent=1)
    lines = ["| format | tensor | p10 on (ms) | p10 off (ms) | on / off (p10) | median on (ms) | median off (ms) |"
             " on / off (median) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['bytes'] / 1024:g} KiB | {r['on_p10_ms']:.3f} | {r['off_p10_ms']:.3f} | "
                     f"{r['ratio_p10']:.3f} | {r['on_median_ms']:.3f} | {r['off_median_ms']:.3f} | "
                     f"{r['ratio_median']:.3f} |")
    md = "\n".join(lines)
    with open(a.out + ".md", "w") as fh:
        fh.write(f"Call-header cost (2 ranks, loopback, torch {torch.__version__}, {a.rounds} rounds x {a.calls} "
                 f"calls per configuration and size; `{result['command']}`)\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
