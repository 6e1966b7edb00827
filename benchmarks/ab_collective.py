"""A/B of the compressed all-reduce between two builds of localsgd-comm, interleaved.

Single calls on the shaped links scatter by 10-35 ms on a 2-core machine, so two suite runs
taken minutes apart cannot tell a small regression from noise. This runs the same point
(2 ranks, shaped 1 Gbit/s link, 64 MB, int8 and int4) for each given checkout in turn, round
after round, each in its own processes::

    git worktree add /path/to/old <commit> && (cd /path/to/old && python setup.py build_ext --inplace)
    python benchmarks/ab_collective.py /path/to/old . --rounds 2

Needs root (network namespaces), like ``localsgd-bench collectives``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from localsgd_comm.bench.launch import run_ranks
from localsgd_comm.bench.netns import ShapedNetwork
out = {}
with ShapedNetwork(2, int(sys.argv[2])) as net:
    for m in sys.argv[4].split(","):
        args = ["--worker", "--method", m, "--sizes-mb", sys.argv[3], "--iters", "7", "--warmup", "1",
                "--point-budget-s", "30", "--ifname", net.ifname]
        row = run_ranks(2, "localsgd_comm.bench.collectives", args, net=net, timeout_s=300)["rows"][0]
        out[m] = row["time_s_median"]
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkouts", nargs="+", help="source trees with a built localsgd_comm._C")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rate-mbit", type=int, default=1000)
    ap.add_argument("--size-mb", default="64")
    ap.add_argument("--methods", default="localsgd-int8,localsgd-int4")
    a = ap.parse_args()
    for c in a.checkouts:
        if not os.path.isdir(os.path.join(c, "localsgd_comm")):
            ap.error(f"{c}: not a localsgd-comm source tree")
    rows = []
    for rnd in range(a.rounds):
        for c in a.checkouts:
            r = subprocess.run([sys.executable, "-c", _CHILD, os.path.abspath(c), str(a.rate_mbit), a.size_mb,
                                a.methods], capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                print(r.stdout + r.stderr, file=sys.stderr)
                return 1
            times = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append({"round": rnd, "checkout": c, **times})
            print(f"round {rnd} {c}: " + ", ".join(f"{m} {1e3 * t:.1f} ms" for m, t in times.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
