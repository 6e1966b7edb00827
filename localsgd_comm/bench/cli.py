"""``localsgd-bench``: measure the kernels, the collectives and DiLoCo's time to loss.

Every run writes into a fresh folder, ``./localsgd_bench_results/<time>-<suite>/`` by default (or
``--out DIR``); the results committed in a checkout's ``benchmarks/results`` change only with
``--update-results``. Each suite writes the same four artefacts: ``<suite>.json`` (machine,
versions, commit, load, then the figures), ``<suite>.md`` (tables), ``<suite>.png`` (plots) and
the run's log. Shaped-link parts need root and network namespaces; elsewhere they are skipped
with the reason.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

SUITES = {
    "kernels": "fused CPU ops (compress_delta, quantize, dequantize_reduce, outer step) against the eager "
               "PyTorch composition, torch.compile and a memcpy of the same bytes. --quick: about 30-90 s",
    "collectives": "all-reduce time, wire bytes and error of gloo fp32 and the localsgd backend (none, int8, "
                   "int4) on loopback and on shaped 1 Gbit/s and 100 Mbit/s links, 2 and 4 ranks; writes plan_profile.json "
                   "(this machine's costs) for localsgd-plan --profile. --quick: about 30 s (full: about 10 min)",
    "time-to-loss": "4 workers train the tiny GPT with DDP and DiLoCo on shaped 1 Gbit/s, 100 Mbit/s and "
                    "10 Mbit/s links: wall time to DDP's loss. --quick: about 1 min on 100 Mbit/s (full: about "
                    "10 min)",
    "faults": "elastic DiLoCo, 4 workers, tiny GPT: one worker killed mid all-reduce at 30% of the rounds and "
              "restarted at 60%, against the fault-free run: final loss, recovery time, join bytes. --quick: about "
              "1-2 min (full: about 3-4 min)",
    "clusters": "2 clusters x 2 workers (torchrun per cluster, 100 Mbit/s between clusters): flat DDP, flat and "
                "hierarchical DiLoCo; and 4 edge workers behind 50 Mbit/s links with and without a half-speed "
                "straggler; measured against the planner's prediction. --quick: about 2 min (full: about 8 min)",
    "clusters-fsdp": "sharded replicas on the clusters layout (2 clusters x 2 workers, 100 Mbit/s between them): "
                     "FSDP2 inside each cluster + DiLoCo across, against HSDP (fp32 gradient all-reduce across "
                     "clusters every step): time to HSDP's loss, bytes on the slow link. --quick: about 2 min",
    "plan-check": "the planner (localsgd-plan) against the committed time-to-loss and clusters results: "
                  "predicted vs measured step time and time to DDP's loss. Seconds; runs nothing",
    "scaling": "the science behind the planner: DiLoCo's loss gap to DDP at equal tokens and compute for 4 GPT "
               "sizes (0.09M-1.9M params), M = 2/4 workers, H = 10/50, int8/int4, and the critical batch size at two "
               "token budgets; workers simulated in-process with the library's kernels (no network). --jobs runs at "
               "once; resumes an interrupted study. --quick: about 1-2 min (full: about 70 min with --jobs 2)",
    "streaming": "streaming DiLoCo, 4 workers, small GPT, shaped 100 and 10 Mbit/s links: DDP, DiLoCo (P=1), "
                 "fragments P in {2, 4}, overlap TAU in {0, 1, 2}, int8/int4: compute utilisation, bytes, peak bytes "
                 "per sync event, loss at equal tokens. --quick: 7 runs on 10 Mbit/s without DDP, about 5 min on an "
                 "idle machine (full: 30 runs, DDP at 10 Mbit/s alone about 16 min)",
    "all": "kernels, collectives and time-to-loss (not faults). --quick: about 2-3 min",
    "linkcheck": "checks that the shaped links reach their rates (gloo send/recv); writes plan_profile.json (the "
                 "links' efficiency) for localsgd-plan --profile",
    "cleanup": "removes network namespaces left behind by killed runs",
}
COLLECTIVE_NETS = ("loopback", "1gbit", "100mbit")


def _log_to(path):
    f = open(path, "a", buffering=1)

    def log(msg=""):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        f.write(line + "\n")
    return log, f


def _parser() -> argparse.ArgumentParser:
    epilog = "suites:\n" + "\n".join(f"  {k:<13} {v}" for k, v in SUITES.items())
    ap = argparse.ArgumentParser(prog="localsgd-bench", description=__doc__.split("\n\n")[0],
                                 epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=list(SUITES), metavar="SUITE", help="one of: " + ", ".join(SUITES))
    ap.add_argument("--quick", action="store_true",
                    help="small sizes and steps (times per suite below; 'all --quick' under 5 min on 2 cores)")
    ap.add_argument("--out", default=None,
                    help="output directory (default: a fresh ./localsgd_bench_results/<time>-<suite>)")
    ap.add_argument("--update-results", action="store_true",
                    help="write into the checkout's benchmarks/results (the committed results) instead")
    ap.add_argument("--nets", default=None,
                    help="comma-separated subset of links: loopback, 1gbit, 100mbit (collectives); "
                         "1gbit, 100mbit, 10mbit (time-to-loss); 100mbit, 10mbit (streaming). Default: all of the "
                         "suite's links")
    ap.add_argument("--methods", default=None,
                    help="time-to-loss and streaming: comma-separated subset of the methods (streaming: ddp, "
                         "diloco-<fmt>, stream-<fmt>-P<p>-T<tau>)")
    ap.add_argument("--steps", type=int, default=None, help="time-to-loss and streaming: training steps per run")
    ap.add_argument("--sync-every", type=int, default=None, help="time-to-loss and streaming: DiLoCo's H")
    ap.add_argument("--jobs", type=int, default=None, help="scaling only: runs at once, one thread each (default 2)")
    ap.add_argument("--sizes", default=None, help="scaling only: comma-separated subset of the model sizes")
    ap.add_argument("--all-pids", action="store_true", help="cleanup only: also namespaces of live runs")
    return ap


def _check(a, ap) -> None:
    """Every flag is checked before anything runs (an unknown name would silently select nothing)."""
    from .time_to_loss import METHODS, NETS
    from . import streaming as _streaming
    ttl_nets = tuple(n for n, _ in NETS)
    known = {"collectives": COLLECTIVE_NETS, "time-to-loss": ttl_nets,
             "streaming": tuple(n for n, _ in _streaming.NETS),
             "all": tuple(dict.fromkeys(COLLECTIVE_NETS + ttl_nets))}
    if a.nets is not None:
        if a.what not in known:
            ap.error(f"--nets applies to collectives, time-to-loss, streaming and all, not to {a.what}")
        bad = [n for n in a.nets.split(",") if n not in known[a.what]]
        if bad or not a.nets:
            ap.error(f"--nets: unknown link(s) {bad or [a.nets]} for {a.what}; expected a comma-separated subset "
                     f"of {', '.join(known[a.what])}")
    time_only = {"--methods": a.methods, "--steps": a.steps, "--sync-every": a.sync_every}
    for flag, v in time_only.items():
        if v is not None and a.what not in ("time-to-loss", "all", "streaming"):
            ap.error(f"{flag} applies to time-to-loss, streaming (and all) only, not to {a.what}")
    if a.methods is not None and a.what == "streaming":
        for m in a.methods.split(","):
            try:
                _streaming.parse_method(m)
            except ValueError as e:
                ap.error(f"--methods: {e}")
    elif a.methods is not None:
        bad = [m for m in a.methods.split(",") if m not in METHODS]
        if bad or not a.methods:
            ap.error(f"--methods: unknown method(s) {bad or [a.methods]}; expected a comma-separated subset of "
                     f"{', '.join(METHODS)}")
    for flag, v in (("--steps", a.steps), ("--sync-every", a.sync_every)):
        if v is not None and v < 1:
            ap.error(f"{flag}: expected an integer >= 1, got {v}")
    for flag, v in (("--jobs", a.jobs), ("--sizes", a.sizes)):
        if v is not None and a.what != "scaling":
            ap.error(f"{flag} applies to scaling only, not to {a.what}")
    if a.jobs is not None and a.jobs < 1:
        ap.error(f"--jobs: expected an integer >= 1, got {a.jobs}")
    if a.sizes is not None:
        from .scaling import SIZES
        bad = [s for s in a.sizes.split(",") if s not in SIZES]
        if bad or not a.sizes:
            ap.error(f"--sizes: unknown size(s) {bad or [a.sizes]}; expected a comma-separated subset of "
                     f"{', '.join(SIZES)}")
    if a.all_pids and a.what != "cleanup":
        ap.error("--all-pids applies to cleanup only")
    if a.update_results and a.out:
        ap.error("--update-results writes into benchmarks/results; it cannot be combined with --out")


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    _check(a, ap)
    from . import netns, report
    if a.what == "cleanup":
        removed = netns.cleanup_leftovers(all_pids=a.all_pids)
        print(f"removed {len(removed)} namespace(s): {' '.join(removed) or '-'}")
        return 0
    if a.update_results:
        out_dir = report.committed_results_dir()
        if out_dir is None:
            ap.error("--update-results: this localsgd_comm is not running from a source checkout "
                     "(no benchmarks/results to update)")
    else:
        out_dir = a.out or report.default_out_dir(a.what + ("-quick" if a.quick else ""))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        ap.error(f"--out: {out_dir!r} exists and is not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        ap.error(f"--out: cannot create {out_dir!r} ({e.strerror or e})")

    import torch
    torch.set_num_threads(1)
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
            checks = []
            for rate in (1000, 100, 10):
                with netns.ShapedNetwork(2, rate) as net:
                    r = verify_link(net, 2, mbytes=max(1.0, rate / 1000 * 32))
                log(f"{rate} Mbit/s link: gloo send/recv {r['mbit_s']:.1f} Mbit/s "
                    f"({100 * r['mbit_s'] / rate:.0f}%)")
                checks.append({"rate_mbit": rate, "mbit_s": r["mbit_s"]})
            from localsgd_comm.plan.project import profile_from_linkcheck, write_profile
            path = write_profile(os.path.join(out_dir, "plan_profile.json"),
                                 profile_from_linkcheck(checks, report.environment()))
            log(f"planner profile (link efficiency only): {path} (localsgd-plan --profile {path})")
        if a.what == "plan-check":
            from . import plan_check
            plan_check.run_suite(out_dir, log=log)
        if a.what == "streaming":
            from . import streaming
            streaming.run_suite(out_dir, quick=a.quick, log=log, only_nets=nets,
                                methods=a.methods.split(",") if a.methods else None, steps=a.steps,
                                sync_every=a.sync_every)
        if a.what == "clusters":
            from . import clusters
            clusters.run_suite(out_dir, quick=a.quick, log=log)
        if a.what == "clusters-fsdp":
            from . import clusters
            clusters.run_suite(out_dir, quick=a.quick, log=log, fsdp=True)
        if a.what == "scaling":
            from . import scaling
            scaling.run_suite(out_dir, quick=a.quick, log=log, jobs=a.jobs or 2,
                              sizes=a.sizes.split(",") if a.sizes else None)
        if a.what == "faults":
            from . import faults
            faults.run_suite(out_dir, quick=a.quick, log=log)
        if a.what in ("kernels", "all"):
            from . import kernels
            if kernels.run_suite(out_dir, quick=a.quick, log=log) is None and a.what == "kernels":
                rc = 1
        if a.what in ("collectives", "all") and (nets is None or set(nets) & set(COLLECTIVE_NETS)):
            from . import collectives
            collectives.run_suite(out_dir, quick=a.quick, log=log, only_nets=nets)
        if a.what in ("time-to-loss", "all"):
            from . import time_to_loss
            ttl = None if nets is None else [n for n in nets if n in {x for x, _ in time_to_loss.NETS}]
            if ttl != []:
                time_to_loss.run_suite(out_dir, quick=a.quick, log=log, only_nets=ttl,
                                       methods=a.methods.split(",") if a.methods else None, steps=a.steps,
                                       sync_every=a.sync_every)
    except KeyboardInterrupt:
        log("interrupted: namespaces removed, partial results (if any) are in " + out_dir)
        rc = 130
    finally:
        netns._teardown_all()
        log(f"done in {time.time() - t0:.0f} s; load: {report.load_snapshot()}; results in {out_dir}")
        logf.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
