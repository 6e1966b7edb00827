"""``localsgd-bench``: kernels | collectives | time-to-loss | all | linkcheck | cleanup.

Results (JSON with machine, versions, commit and load; Markdown tables; PNG plots) go to
``--out`` (default: benchmarks/results inside a checkout, else ./localsgd_bench_results).
Shaped-link parts need root and network namespaces; elsewhere they are skipped with the reason.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _log_to(path):
    f = open(path, "a", buffering=1)

    def log(msg=""):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        f.write(line + "\n")
    return log, f


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="localsgd-bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["kernels", "collectives", "time-to-loss", "all", "linkcheck", "cleanup"])
    ap.add_argument("--quick", action="store_true",
                    help="small sizes/steps: the whole 'all' run takes < 5 min on 2 cores")
    ap.add_argument("--out", default=None, help="output directory")
    ap.add_argument("--nets", default=None,
                    help="comma-separated subset of links: loopback,1gbit,100mbit,10mbit")
    ap.add_argument("--methods", default=None, help="time-to-loss: comma-separated subset of methods")
    ap.add_argument("--steps", type=int, default=None, help="time-to-loss: training steps per run")
    ap.add_argument("--sync-every", type=int, default=None, help="time-to-loss: DiLoCo H")
    ap.add_argument("--all-pids", action="store_true", help="cleanup: also namespaces of live runs")
    a = ap.parse_args(argv)

    from . import netns, report
    if a.what == "cleanup":
        removed = netns.cleanup_leftovers(all_pids=a.all_pids)
        print(f"removed {len(removed)} namespace(s): {' '.join(removed) or '-'}")
        return 0

    import torch
    torch.set_num_threads(1)
    out_dir = a.out or report.default_out_dir()
    os.makedirs(out_dir, exist_ok=True)
    log, logf = _log_to(os.path.join(out_dir, "localsgd_bench_" + ("quick_" if a.quick else "") + a.what + ".log"))
    nets = a.nets.split(",") if a.nets else None
    t0 = time.time()
    log(f"localsgd-bench {' '.join(sys.argv[1:] if argv is None else argv)} -> {out_dir}")
    log(f"load: {report.load_snapshot()}")
    removed = netns.cleanup_leftovers()
    if removed:
        log(f"removed leftover namespaces of dead runs: {removed}")
    rc = 0
    try:
        if a.what == "linkcheck":
            from .collectives import verify_link
            why = netns.availability()
            if why:
                log(f"SKIP: {why}")
                return 0
            for rate in (1000, 100, 10):
                with netns.ShapedNetwork(2, rate) as net:
                    r = verify_link(net, 2, mbytes=max(1.0, rate / 1000 * 32))
                log(f"{rate} Mbit/s link: gloo send/recv {r['mbit_s']:.1f} Mbit/s "
                    f"({100 * r['mbit_s'] / rate:.0f}%)")
        if a.what in ("kernels", "all"):
            from . import kernels
            if kernels.run_suite(out_dir, quick=a.quick, log=log) is None and a.what == "kernels":
                rc = 1
        if a.what in ("collectives", "all"):
            from . import collectives
            collectives.run_suite(out_dir, quick=a.quick, log=log, only_nets=nets)
        if a.what in ("time-to-loss", "all"):
            from . import time_to_loss
            time_to_loss.run_suite(out_dir, quick=a.quick, log=log, only_nets=nets,
                                   methods=a.methods.split(",") if a.methods else None, steps=a.steps,
                                   sync_every=a.sync_every)
    finally:
        netns._teardown_all()
        log(f"done in {time.time() - t0:.0f} s; load: {report.load_snapshot()}")
        logf.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
