"""All-reduce benchmark: fp32 gloo vs the ``localsgd`` backend (none/int8/int4).

Per (network, world size, method) one group of ranks is started (see launch.py) and runs every
size. Per size: ``warmup`` untimed calls, then ``iters`` timed calls; each timed call starts
after a barrier, and its time is the slowest rank's (MAX all-reduce of the per-rank times).
We report the median. Wire bytes come from two independent sources:

* the interface counters of the rank's own network namespace (``tx_bytes``; includes TCP/IP
  headers and ACKs, i.e. what really crossed the shaped link), when ranks run in namespaces;
* ``localsgd_comm.get_backend_stats(group)`` for the ``localsgd`` backend (payload bytes).

Both are compared with the ideal per-rank volume ``2 (p-1)/p x N x bytes/element`` (+ the fp32
block scales for int8/int4). The result of the first timed call is checked against the exact
sum (inputs are ``base * (rank + 1)``, so the sum is ``base * p(p+1)/2``) and the relative
L2 error is reported: a fast but wrong all-reduce shows up here.

Rank entry point: ``python -m localsgd_comm.bench.collectives --worker ...``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import List, Optional

METHODS = {
    # name: (process-group backend, localsgd format or None)
    "gloo-fp32": ("gloo", None),
    "localsgd-none": ("localsgd", "none"),
    "localsgd-int8": ("localsgd", "int8"),
    "localsgd-int4": ("localsgd", "int4"),
}


def ideal_bytes_per_rank(fmt: Optional[str], numel: int, world: int, block_size: int) -> float:
    """Bandwidth-optimal per-rank send volume: 2 (p-1)/p x (bytes of the encoded tensor)."""
    if fmt in (None, "none"):
        enc = 4 * numel
    else:
        payload = numel if fmt in ("int8", "fp8") else (numel + 1) // 2
        enc = payload + 4 * -(-numel // block_size)
    return 2 * (world - 1) / world * enc


# ------------------------------------------------------------------------------------------
# rank side
# ------------------------------------------------------------------------------------------
def _stats_snapshot(group) -> Optional[dict]:
    try:
        import localsgd_comm
        s = localsgd_comm.get_backend_stats(group)
    except Exception:
        return None
    # counters only (options such as block_size are not per-call quantities); passthrough_calls
    # includes the 8-byte MAX all-reduce of the timing, one per call
    keys = ("bytes_sent", "bytes_received", "compressed_calls", "passthrough_calls")
    return {k: s[k] for k in keys if isinstance(s.get(k), (int, float))}


def _rel_l2_error(x, base, factor: float) -> float:
    """||x - factor*base|| / ||factor*base|| in float64, in 4M-element chunks (a whole 256 MB
    tensor in float64 would add ~1.5 GB per rank, times 4 ranks on a shared machine)."""
    num = den = 0.0
    step = 1 << 22
    for lo in range(0, x.numel(), step):
        e = base[lo:lo + step].double() * factor
        num += float((x[lo:lo + step].double() - e).square().sum())
        den += float(e.square().sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def _worker(a) -> None:
    import torch
    import torch.distributed as dist
    from datetime import timedelta

    from .launch import write_result
    from .netns import read_iface_bytes

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend, fmt = METHODS[a.method]
    kwargs = {}
    if backend == "localsgd":
        import localsgd_comm
        kwargs["pg_options"] = localsgd_comm.BackendOptions(format=fmt, block_size=a.block_size)
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=timedelta(seconds=a.timeout), **kwargs)
    group = dist.group.WORLD
    # The single-namespace loopback setup shares one lo between all ranks: rank 0 reads it and
    # divides by p. With one namespace per rank each rank reads its own veth and we sum.
    shared_lo = a.ifname == "lo"
    rows = []
    for size_mb in a.sizes_mb:
        numel = int(size_mb * 2**20) // 4
        g = torch.Generator().manual_seed(1234)
        base = torch.randn(numel, generator=g)
        src = base * float(rank + 1)
        x = torch.empty_like(src)
        t_start = time.perf_counter()
        for _ in range(a.warmup):
            x.copy_(src)
            dist.all_reduce(x)
        warm_s = (time.perf_counter() - t_start) / max(a.warmup, 1)
        # Slow points (big sizes on slow links): fewer iterations, but never below 3.
        iters = a.iters if warm_s * a.iters <= a.point_budget_s else max(3, int(a.point_budget_s / max(warm_s, 1e-9)))
        times: List[float] = []
        rel_err = None
        dist.barrier()
        c0 = read_iface_bytes(a.ifname) if a.ifname else None
        s0 = _stats_snapshot(group) if backend == "localsgd" else None
        for i in range(iters):
            x.copy_(src)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            times.append(float(dt))
            if i == 0:
                rel_err = _rel_l2_error(x, base, world * (world + 1) / 2)
        dist.barrier()
        c1 = read_iface_bytes(a.ifname) if a.ifname else None
        s1 = _stats_snapshot(group) if backend == "localsgd" else None
        wire = None
        if c0 and c1:
            tx = torch.tensor([float(c1["tx_bytes"] - c0["tx_bytes"])], dtype=torch.float64)
            if not shared_lo:
                dist.all_reduce(tx)  # sum over ranks' own interfaces
            wire = float(tx) / world / iters  # per rank per call
        stats = None
        if s0 is not None and s1 is not None:
            stats = {k: (s1[k] - s0[k]) / iters for k in s1 if k in s0}
        med = statistics.median(times)
        nbytes = 4 * numel
        rows.append({
            "size_mb": size_mb, "numel": numel, "iters": iters, "warmup": a.warmup,
            "time_s_median": med, "time_s_min": min(times), "time_s_max": max(times),
            "times_s": times,
            "algbw_gbit_s": nbytes * 8 / med / 1e9,
            "busbw_gbit_s": nbytes * 8 * 2 * (world - 1) / world / med / 1e9,
            "wire_tx_bytes_per_rank": wire,
            "backend_stats_per_call": stats,
            "ideal_bytes_per_rank": ideal_bytes_per_rank(fmt, numel, world, a.block_size),
            "rel_l2_error": rel_err,
        })
        del base, src, x
    if rank == 0:
        write_result(a.result, {"method": a.method, "world": world, "rows": rows})
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------
# driver side
# ------------------------------------------------------------------------------------------
_PROBE = """
import torch, torch.distributed as dist, localsgd_comm
dist.init_process_group("localsgd", store=dist.HashStore(), rank=0, world_size=1,
                        pg_options=localsgd_comm.BackendOptions(format="int8"))
x = torch.ones(1 << 16)
dist.all_reduce(x)
assert float(x[0]) == 1.0, float(x[0])
dist.destroy_process_group()
"""


def localsgd_available() -> Optional[str]:
    """None if a ``localsgd`` process group can be created and all-reduces here, else why.
    Probed in a child process (world size 1): registration alone does not prove the compiled
    backend class is present in this build."""
    import subprocess
    import sys
    from .launch import _PKG_PARENT
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=_PKG_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        p = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                           timeout=120, env=env)
    except subprocess.TimeoutExpired:
        return "creating a 1-rank localsgd process group timed out (120 s)"
    if p.returncode != 0:
        last = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        return "a 1-rank localsgd process group failed: " + (last[-1] if last else f"exit {p.returncode}")
    return None


def verify_link(net, world: int = 2, mbytes: float = 8.0, timeout_s: float = 300.0) -> dict:
    """Plain-gloo send/recv from rank 0 to rank 1 through ``net``: the achieved rate must follow
    the shaping before any other number on that link is worth anything."""
    from .launch import run_ranks
    return run_ranks(world, "localsgd_comm.bench.collectives",
                     ["--linkcheck", "--mbytes", str(mbytes)], net=net, timeout_s=timeout_s)


def _linkcheck_worker(a) -> None:
    import torch
    import torch.distributed as dist

    from .launch import write_result

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.zeros(int(a.mbytes * 2**20), dtype=torch.uint8)
    small = torch.zeros(1024, dtype=torch.uint8)
    # warm-up: opens the pair's connection and fills TCP's window
    if rank == 0:
        dist.send(small, 1)
    elif rank == 1:
        dist.recv(small, 0)
    dist.barrier()
    t0 = time.perf_counter()
    if rank == 0:
        dist.send(x, 1)
        dist.recv(small, 1)  # ack: the time covers full delivery, not just the local copy out
    elif rank == 1:
        dist.recv(x, 0)
        dist.send(small, 0)
    dt = time.perf_counter() - t0
    if rank == 0:
        write_result(a.result, {"bytes": x.numel(), "time_s": dt,
                                "mbit_s": x.numel() * 8 / dt / 1e6})
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="rank side of the collectives benchmark")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--linkcheck", action="store_true")
    p.add_argument("--mbytes", type=float, default=8.0)
    p.add_argument("--method", choices=sorted(METHODS))
    p.add_argument("--sizes-mb", type=lambda s: [float(v) for v in s.split(",")])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--point-budget-s", type=float, default=60.0)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--ifname", default="")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--result", required=True)
    a = p.parse_args(argv)
    if a.linkcheck:
        _linkcheck_worker(a)
    else:
        _worker(a)


if __name__ == "__main__":
    main()


# ------------------------------------------------------------------------------------------
# suite
# ------------------------------------------------------------------------------------------
def plan(quick: bool) -> List[dict]:
    """(network, world, sizes) points. Slow links get fewer sizes: a 256 MB fp32 all-reduce
    over 4 ranks at 100 Mbit/s moves 384 MB per rank (~33 s a call)."""
    if quick:
        return [
            {"net": "loopback", "rate_mbit": None, "world": 2, "sizes_mb": [1, 16]},
            {"net": "1gbit", "rate_mbit": 1000, "world": 2, "sizes_mb": [16]},
        ]
    pts = []
    for world in (2, 4):
        pts.append({"net": "loopback", "rate_mbit": None, "world": world, "sizes_mb": [1, 4, 16, 64, 256]})
        pts.append({"net": "1gbit", "rate_mbit": 1000, "world": world, "sizes_mb": [1, 16, 64, 256]})
        pts.append({"net": "100mbit", "rate_mbit": 100, "world": world,
                    "sizes_mb": [1, 16, 64] if world == 2 else [1, 16]})
    return pts


def run_suite(out_dir: str, quick: bool = False, log=print, only_nets: Optional[List[str]] = None) -> dict:
    from . import report
    from .launch import RankFailure, run_ranks
    from .netns import NetnsUnavailable, ShapedNetwork, availability

    env = report.environment()
    why_not_localsgd = localsgd_available()
    methods = ["gloo-fp32"] + ([] if why_not_localsgd else ["localsgd-none", "localsgd-int8", "localsgd-int4"])
    if why_not_localsgd:
        log(f"[collectives] localsgd backend unavailable ({why_not_localsgd}): gloo-fp32 only")
    why_not_netns = availability()
    if why_not_netns:
        log(f"[collectives] SKIP shaped links: {why_not_netns}; loopback runs use the host's lo "
            "without wire-byte counters")
    results, linkchecks, skipped = [], [], []
    for pt in plan(quick):
        if only_nets and pt["net"] not in only_nets:
            continue
        if pt["rate_mbit"] is not None and why_not_netns:
            skipped.append({**pt, "reason": why_not_netns})
            continue
        try:
            if why_not_netns:
                net_cm = None
            elif pt["rate_mbit"] is None:
                net_cm = ShapedNetwork(pt["world"], None, loopback=True)
            else:
                net_cm = ShapedNetwork(pt["world"], pt["rate_mbit"])
            net = net_cm.__enter__() if net_cm else None
        except NetnsUnavailable as exc:
            skipped.append({**pt, "reason": str(exc)})
            continue
        try:
            desc = net.describe() if net else {"kind": "host loopback (lo)", "rate_mbit": None}
            if pt["rate_mbit"] is not None:
                mb = 4.0 if pt["rate_mbit"] <= 100 else 32.0
                lc = verify_link(net, 2, mbytes=mb)
                lc.update(net=pt["net"], world=pt["world"], rate_mbit=pt["rate_mbit"],
                          fraction_of_rate=lc["mbit_s"] / pt["rate_mbit"])
                linkchecks.append(lc)
                log(f"[collectives] link check {pt['net']} p={pt['world']}: gloo send/recv "
                    f"{lc['mbit_s']:.0f} Mbit/s ({100 * lc['fraction_of_rate']:.0f}% of the rate)")
            for m in methods:
                args = ["--worker", "--method", m, "--sizes-mb", ",".join(str(s) for s in pt["sizes_mb"]),
                        "--iters", "3" if quick else "5", "--warmup", "1",
                        "--point-budget-s", "20" if quick else "30",
                        "--ifname", net.ifname if net else ""]
                load0 = report.load_snapshot()
                try:
                    r = run_ranks(pt["world"], "localsgd_comm.bench.collectives", args, net=net,
                                  timeout_s=900)
                except RankFailure as exc:
                    log(f"[collectives] FAILED {pt['net']} p={pt['world']} {m}: {str(exc)[:2000]}")
                    skipped.append({**pt, "method": m, "reason": str(exc)[:4000]})
                    continue
                for row in r["rows"]:
                    row.update(net=pt["net"], rate_mbit=pt["rate_mbit"], world=pt["world"],
                               method=m, link=desc, load_before=load0)
                    results.append(row)
                    log(f"[collectives] {pt['net']:>8} p={pt['world']} {m:<14} {row['size_mb']:>6g} MB "
                        f"{1e3 * row['time_s_median']:9.1f} ms  algbw {row['algbw_gbit_s']:.3f} Gbit/s  "
                        f"wire/ideal {_ratio(row['wire_tx_bytes_per_rank'], row['ideal_bytes_per_rank'])}  "
                        f"err {row['rel_l2_error']:.2e}")
        finally:
            if net_cm:
                net_cm.__exit__(None, None, None)
    out = {"benchmark": "collectives", "quick": quick, "environment": env,
           "methods": methods, "localsgd_unavailable": why_not_localsgd,
           "link_checks": linkchecks, "results": results, "skipped": skipped,
           "speedups_vs_gloo_fp32": speedups(results)}
    name = "collectives_quick" if quick else "collectives"
    report.write_artifacts(out_dir, name, out, markdown(out), plot)
    _write_plan_profile(out_dir, out, log)
    return out


def _write_plan_profile(out_dir: str, out: dict, log) -> None:
    """The planner's profile of this machine from the shaped-link points (``localsgd-plan
    --profile <out_dir>/plan_profile.json``)."""
    from localsgd_comm.plan.project import profile_from_collectives, write_profile
    try:
        path = write_profile(os.path.join(out_dir, "plan_profile.json"), profile_from_collectives(out))
    except ValueError as e:
        log(f"[collectives] no planner profile: {e}")
        return
    log(f"[collectives] planner profile: {path} (localsgd-plan --profile {path})")


def _ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.3f}"


def speedups(results: List[dict]) -> List[dict]:
    base = {(r["net"], r["world"], r["size_mb"]): r["time_s_median"] for r in results
            if r["method"] == "gloo-fp32"}
    out = []
    for r in results:
        k = (r["net"], r["world"], r["size_mb"])
        if r["method"] != "gloo-fp32" and k in base:
            out.append({"net": r["net"], "world": r["world"], "size_mb": r["size_mb"],
                        "method": r["method"], "speedup": base[k] / r["time_s_median"]})
    return out


def markdown(out: dict) -> str:
    from .report import md_table
    e = out["environment"]
    head = (f"Collectives ({'quick' if out['quick'] else 'full'}): {e['machine']['cpu_model']}, "
            f"{e['machine']['cores']} cores, torch {e['versions']['torch']}, python "
            f"{e['versions']['python']}, commit {str(e['git_commit'])[:10]}, "
            f"load before {e['load'].get('loadavg_1_5_15')}\n\n")
    lc = md_table(["link", "ranks", "gloo send/recv Mbit/s", "% of rate"],
                  [(c["net"], c["world"], c["mbit_s"], 100 * c["fraction_of_rate"]) for c in out["link_checks"]])
    rows = []
    sp = {(s["net"], s["world"], s["size_mb"], s["method"]): s["speedup"] for s in out["speedups_vs_gloo_fp32"]}
    for r in out["results"]:
        rows.append((r["net"], r["world"], r["method"], r["size_mb"], 1e3 * r["time_s_median"],
                     r["algbw_gbit_s"], sp.get((r["net"], r["world"], r["size_mb"], r["method"])),
                     None if r["wire_tx_bytes_per_rank"] is None else r["wire_tx_bytes_per_rank"] / 2**20,
                     r["ideal_bytes_per_rank"] / 2**20,
                     None if r["wire_tx_bytes_per_rank"] is None else r["wire_tx_bytes_per_rank"] / r["ideal_bytes_per_rank"],
                     r["rel_l2_error"], r["iters"]))
    t = md_table(["link", "ranks", "method", "MB", "median ms", "algbw Gbit/s", "speedup vs gloo fp32",
                  "wire MiB/rank", "ideal MiB/rank", "wire/ideal", "rel. L2 error", "iters"], rows)
    return head + "Link checks (plain gloo, rank 0 -> rank 1):\n\n" + lc + "\n\n" + t + "\n"


def plot(out: dict, path: str) -> None:
    from .report import plt as _plt
    res = out["results"]
    if not res:
        return
    plt = _plt()
    rate = {r["net"]: r["rate_mbit"] or float("inf") for r in res}  # loopback first, slowest last
    panels = sorted({(r["net"], r["world"]) for r in res}, key=lambda k: (k[1], -rate[k[0]]))
    ncol = min(3, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.8 * nrow), squeeze=False)
    for ax, (net, world) in zip(axes.flat, panels):
        for m in out["methods"]:
            pts = sorted((r["size_mb"], r["time_s_median"]) for r in res
                         if r["net"] == net and r["world"] == world and r["method"] == m)
            if pts:
                ax.plot([p[0] for p in pts], [1e3 * p[1] for p in pts], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("all-reduce size (MB of fp32)")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{net}, {world} ranks")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
