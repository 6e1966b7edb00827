"""Our streaming DiLoCo next to torchft's, on the same shaped links and the same recipe.

What it measures
----------------
The recipe of ``localsgd-bench streaming --quick`` (``localsgd_comm.bench.streaming.config``):
the small GPT of ``localsgd_comm.model`` (0.83M parameters), the byte data of
``localsgd_comm.data`` (seed 0, batches seeded by (rank, step)), seq 64, batch 8 per worker,
4 workers, H = 24, outer SGD lr 0.7 momentum 0.6 Nesterov, AdamW lr 2e-3 (weight decay 0.01,
betas 0.9/0.95) with the warm-up + cosine schedule, 72 steps, torch seed 0, one thread per rank.
Each rank runs in its own network namespace behind a shaped link (``localsgd_comm.bench.netns``),
so the bytes are what really left the rank: its namespace interface tx, headers included.

* ours:    ``stream-<fmt>-P4-T1`` = ``localsgd_comm.DiLoCo(fragments=4, overlap_steps=1)``
  (mixing 0.5, the default for TAU > 0), run by the streaming suite's own rank code
  (``python -m localsgd_comm.bench.streaming --worker``) on a "localsgd" group;
* torchft: ``torchft-<fp32|quant>-P4-T1`` = ``torchft.local_sgd.DiLoCo`` (torchft 0.2.0, its
  streaming DiLoCo) with 4 model fragments (the same parameters as ours, cut on parameter
  boundaries, see :func:`fragment_bounds`), one outer SGD per fragment, ``sync_every=24``,
  ``fragment_sync_delay=1`` (its tau: a fragment's all-reduce starts one inner step before the
  step it is merged at, where ours starts it at its sync step and merges one step later: one
  inner step of overlap in both), ``fragment_update_alpha=0.5`` (its mixing, same formula as
  ours: ``lerp(global, local, alpha)``), ``should_quantize`` off (its default) or on. Each rank is
  its own replica group (a torchft ``Manager`` with ``ProcessGroupGloo``, ``use_async_quorum=False``
  as its DiLoCo requires, ``init_sync=False``: the replicas start from the same seed, as ours);
  rank 0 also hosts the torchft lighthouse (``min_replicas=4``), so its quorum traffic is in the
  bytes.

Per run: final loss (mean over ranks, moving average of ``max(5, steps // 12)`` steps, as the
streaming suite), tx bytes per rank (interface counter over the loop), loop wall time (the
slowest rank's), compute utilisation (median compute-only step measured just before the loop x
steps / loop time), in-loop compute utilisation (forward, backward and the inner optimizer's own
step / loop time, the lowest rank) and time in sync (what the inner optimizer's ``step()`` call
spent besides the inner optimizer's own step, i.e. torchft's step hooks, / loop time, the
highest rank; for ours, what ``DiLoCo.step()`` and ``flush()`` spent besides it). All from the
same measurement code as the streaming suite.

The torchft side runs in a separate virtual environment used only by this benchmark (torchft is
not a dependency of localsgd-comm). Its ranks import this repository's pure-Python modules
(model, data, the netns counter and the schedule) without importing the ``localsgd_comm``
package itself, whose compiled extension is built for the main environment's torch.

How to run (as root: network namespaces and tc)::

    python3.11 -m venv ../venvs/torchft                  # anywhere outside the repository
    ../venvs/torchft/bin/pip install torch==2.13.0+cpu   # a CPU build of torch (what the results used);
    ../venvs/torchft/bin/pip install torchft==0.2.0      #   without it torchft pulls a CUDA torch, which runs on CPU too
    ../venvs/torchft/bin/pip install --no-deps --target ../venvs/triton_extra triton   # only for the -triton methods
    python benchmarks/torchft_streaming.py --torchft-python ../venvs/torchft/bin/python \
        --triton-path ../venvs/triton_extra --nets 10,100 \
        --methods stream-none-P4-T1,stream-int4-P4-T1,torchft-fp32-P4-T1,torchft-quant-P4-T1,torchft-quant-P4-T1-triton

It writes ``torchft_streaming.json`` and ``.md`` (``--name``) under ``--out`` (default: the
committed ``benchmarks/results``); ``--seed N`` changes the model init and data seed on both sides. ``--rerender FILE.json``
rebuilds the table and Markdown of a saved run.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from typing import Dict, List, Optional, Sequence

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OURS = ["stream-none-P4-T1", "stream-int4-P4-T1"]
TORCHFT = ["torchft-fp32-P4-T1", "torchft-quant-P4-T1"]
LIGHTHOUSE_PORT = 29510
STORE_PORT = 29520


def parse_torchft_method(m: str) -> dict:
    """``torchft-<fp32|quant>-P<p>-T<tau>[-triton]`` -> {"quantize", "fragments", "delay", "triton"};
    ValueError if not. ``-triton``: the ranks also see ``--triton-path`` (a folder holding triton),
    which torchft's quantized all-reduce needs; without it torchft sends fp32 even when asked to
    quantize (its ``Manager.allreduce`` falls back when triton cannot be imported)."""
    import re
    s = re.fullmatch(r"torchft-(fp32|quant)-P(\d+)-T(\d+)(-triton)?", m)
    if not s:
        raise ValueError(f"torchft method: expected torchft-<fp32|quant>-P<p>-T<tau>[-triton], got {m!r}")
    return {"quantize": s.group(1) == "quant", "fragments": int(s.group(2)), "delay": int(s.group(3)),
            "triton": bool(s.group(4))}


def fragment_bounds(sizes: Sequence[int], parts: int) -> List[int]:
    """Cut a list of parameter sizes into ``parts`` contiguous runs, on parameter boundaries,
    minimising the largest run (torchft takes whole modules, so no parameter is split; ties:
    earlier runs as large as the bound allows). Returns the ``parts + 1`` cut indices."""
    n = len(sizes)
    if not 1 <= parts <= n:
        raise ValueError(f"fragments: expected 1 <= fragments <= number of parameters ({n}), got {parts}")
    if any(s < 1 for s in sizes):
        raise ValueError(f"sizes: expected positive parameter sizes, got {list(sizes)}")

    def cuts_for(bound: int) -> Optional[List[int]]:
        cuts, acc = [0], 0
        for i, s in enumerate(sizes):
            # close the run before i when it would overflow, or when the parameters left are
            # just enough for one per remaining run
            left_runs = parts - len(cuts)
            if acc > 0 and (acc + s > bound or n - i == left_runs):
                cuts.append(i)
                acc = 0
                if len(cuts) > parts:
                    return None
            acc += s
            if acc > bound:
                return None
        cuts.append(n)
        return cuts if len(cuts) == parts + 1 else None

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if cuts_for(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    cuts = cuts_for(lo)
    assert cuts is not None
    return cuts


# ------------------------------------------------------------------------------------------
# torchft rank side (runs in the torchft environment)
# ------------------------------------------------------------------------------------------
def _import_pure(name: str):
    """Import ``localsgd_comm.<name>`` without running ``localsgd_comm/__init__`` (which loads
    the compiled extension of the main environment): the package is entered as a bare namespace."""
    for pkg in ("localsgd_comm", "localsgd_comm.bench"):
        if pkg not in sys.modules:
            mod = types.ModuleType(pkg)
            mod.__path__ = [os.path.join(_REPO, *pkg.split("."))]
            sys.modules[pkg] = mod
    return importlib.import_module("localsgd_comm." + name)


def _torchft_worker(a) -> None:
    import logging
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    import torch.nn.functional as Fn
    from torch import nn

    import torchft
    from torchft._torchft import LighthouseServer
    from torchft.local_sgd import DiLoCo as FtDiLoCo
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    logging.basicConfig(level=logging.WARNING)
    model_mod, data_mod = _import_pure("model"), _import_pure("data")
    ttl = _import_pure("bench.time_to_loss")
    netns = _import_pure("bench.netns")

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    spec = parse_torchft_method(a.method)
    addrs = a.addrs.split(",")
    my_ip, ip0 = addrs[rank], addrs[0]
    lighthouse = None
    if rank == 0:
        lighthouse = LighthouseServer(bind=f"[::]:{LIGHTHOUSE_PORT}", min_replicas=world)
    # a plain gloo group for the measurement only (barriers around the loop, the final gather),
    # as the streaming suite's ranks have; nothing of it runs inside the measured loop
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=a.timeout))
    torch.manual_seed(a.seed)
    model = model_mod.GPT(model_mod.config_for(a.model, seq_len=a.seq))
    n_params = sum(p.numel() for p in model.parameters())
    data = data_mod.ByteData(data_mod.load_corpus(), a.seq, seed=a.seed)
    inner = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))

    # P fragments as modules holding the model's own Parameter objects (tied weights once)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    cuts = fragment_bounds([p.numel() for _, p in named], spec["fragments"])
    fragments = []
    for f in range(spec["fragments"]):
        m = nn.Module()
        for n, p in named[cuts[f]:cuts[f + 1]]:
            m.register_parameter(n.replace(".", "_"), p)
        fragments.append(m)
    outer = [torch.optim.SGD(m.parameters(), lr=a.outer_lr, momentum=a.outer_momentum, nesterov=True)
             for m in fragments]

    store = dist.TCPStore(my_ip, STORE_PORT, is_master=True, wait_for_workers=False)
    to = timedelta(seconds=a.timeout)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=to),
        load_state_dict=lambda sd: (model.load_state_dict(sd["model"]), inner.load_state_dict(sd["inner"])),
        state_dict=lambda: {"model": model.state_dict(), "inner": inner.state_dict()},
        min_replica_size=world, use_async_quorum=False, init_sync=False,
        timeout=to, quorum_timeout=to, connect_timeout=to,
        rank=0, world_size=1, store_addr=my_ip, store_port=STORE_PORT,
        lighthouse_addr=f"http://{ip0}:{LIGHTHOUSE_PORT}", replica_id=f"replica{rank}", hostname=my_ip)
    # torchft turns a failed collective into a skipped commit (Manager.report_error): count them
    errors: List[str] = []
    _report = manager.report_error
    manager.report_error = lambda e: (errors.append(f"{type(e).__name__}: {e}"), _report(e))[-1]

    sched = torch.optim.lr_scheduler.LambdaLR(inner, ttl.lr_schedule(a.steps))
    batches = [data.batch(rank, i, a.batch) for i in range(a.steps)]
    dist.barrier()
    compute_s = ttl.measure_compute(model_mod.config_for(a.model, seq_len=a.seq), batches, a.lr, steps=10)
    dist.barrier()
    # registered before torchft's hooks, so they run first: the post hook stops the clock
    # before torchft's sync hook runs (its pre hook, a lock, is counted as compute: negligible)
    inner_s: List[float] = []
    inner.register_step_pre_hook(lambda *_: inner_s.append(-time.perf_counter()))
    inner.register_step_post_hook(lambda *_: inner_s.__setitem__(-1, inner_s[-1] + time.perf_counter()))
    c0 = netns.read_iface_bytes(a.ifname) if a.ifname else None
    losses, times, tx, fb_s, step_s = [], [], [], [], []
    with FtDiLoCo(manager, fragments, inner, outer, sync_every=a.sync_every, backup_device=torch.device("cpu"),
                  pin_memory=False, should_quantize=spec["quantize"], fragment_sync_delay=spec["delay"],
                  fragment_update_alpha=a.alpha) as diloco:
        t0 = time.perf_counter()
        for step in range(a.steps):
            x, y = batches[step]
            tf = time.perf_counter()
            logits = model(x)
            loss = Fn.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            loss.backward()
            fb_s.append(time.perf_counter() - tf)
            ts = time.perf_counter()
            inner.step()  # torchft's DiLoCo runs in this call's post hook
            step_s.append(time.perf_counter() - ts)
            inner.zero_grad()
            sched.step()
            losses.append(loss.detach().item())
            times.append(time.perf_counter() - t0)
            if c0 is not None:
                tx.append(netns.read_iface_bytes(a.ifname)["tx_bytes"] - c0["tx_bytes"])
        total = time.perf_counter() - t0
    commits = manager.current_step()
    in_loop = sum(fb_s) + sum(inner_s)
    blocked = sum(step_s) - sum(inner_s)
    rec = torch.tensor([losses, times, tx if tx else [0.0] * a.steps], dtype=torch.float64)
    allrec = [torch.empty_like(rec) for _ in range(world)]
    dist.all_gather(allrec, rec)
    # the global parameters (torchft's backup copies, what its outer steps update) must agree
    # on every replica after the last sync: a checksum per rank, compared by the driver
    digest = sum(float(t.double().sum()) + float(t.double().abs().sum())
                 for fr in diloco._fragments for t in fr.original_parameters.values())
    small = torch.tensor([compute_s, total, in_loop, blocked, commits, digest, len(errors)], dtype=torch.float64)
    alls = [torch.empty_like(small) for _ in range(world)]
    dist.all_gather(alls, small)
    if rank == 0:
        A = torch.stack(allrec)
        try:
            import triton  # noqa: F401
            triton_v = triton.__version__
        except ImportError:
            triton_v = None
        _import_pure("bench.launch").write_result(a.result, {
            "method": a.method, "world": world, "n_params": n_params, "steps": a.steps,
            "loss_mean": A[:, 0].mean(0).tolist(), "elapsed_s_max": A[:, 1].max(0).values.tolist(),
            "tx_bytes_per_rank_mean": A[:, 2].mean(0).tolist() if tx else None,
            "tx_bytes_per_rank_final": A[:, 2, -1].tolist() if tx else None,
            "compute_s_per_rank": [float(s[0]) for s in alls], "total_s_per_rank": [float(s[1]) for s in alls],
            "in_loop_compute_s_per_rank": [float(s[2]) for s in alls],
            "sync_s_per_rank": [float(s[3]) for s in alls],
            "torchft_commits_per_rank": [int(s[4]) for s in alls],
            "global_params_checksum_per_rank": [float(s[5]) for s in alls],
            "torchft_errors_per_rank": [int(s[6]) for s in alls],
            "torchft_first_error_rank0": errors[0][:2000] if errors else None,
            "fragment_numels": [sum(p.numel() for _, p in named[cuts[f]:cuts[f + 1]])
                                for f in range(spec["fragments"])],
            "versions": {"torch": torch.__version__, "torchft": getattr(torchft, "__version__", None)
                         or _dist_version("torchft"), "triton": triton_v,
                         "python": sys.version.split()[0]},
            "settings": {"fragment_sync_delay": spec["delay"], "fragment_update_alpha": a.alpha,
                         "should_quantize": spec["quantize"], "use_bucketization": False,
                         "process_group": "ProcessGroupGloo"},
        })
    dist.barrier()
    manager.shutdown(wait=False)
    if lighthouse is not None:
        lighthouse.shutdown()
    dist.destroy_process_group()
    del store


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


# ------------------------------------------------------------------------------------------
# driver side (runs in the main environment)
# ------------------------------------------------------------------------------------------
def _run_torchft_ranks(python: str, cfg: dict, method: str, net, alpha: float, timeout_s: float,
                       triton_path: Optional[str] = None) -> dict:
    """The launcher of ``localsgd_comm.bench.launch.run_ranks``, with the torchft environment's
    interpreter running this file's rank side."""
    from localsgd_comm.bench.launch import free_port, kill_all, supervise
    world = cfg["world"]
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="lsgdb-tft-") as tmp:
        result = os.path.join(tmp, "result.json")
        procs, logs = [], []
        args = ["--worker", "--method", method, "--ifname", net.ifname, f"--alpha={alpha}",
                "--addrs", ",".join(net.addr(r) for r in range(world)), "--result", result] + [
            f"--{k.replace('_', '-')}={v}" for k, v in cfg.items() if k != "world"]
        try:
            for r in range(world):
                env = dict(os.environ)
                env.pop("PYTHONPATH", None)  # the torchft environment sees only its own packages
                if parse_torchft_method(method)["triton"]:
                    if not triton_path:
                        raise ValueError(f"{method}: expected --triton-path (a folder holding triton)")
                    env["PYTHONPATH"] = triton_path
                env.update({"RANK": str(r), "WORLD_SIZE": str(world), "MASTER_ADDR": net.addr(0),
                            "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": net.ifname, "OMP_NUM_THREADS": "1"})
                log = open(os.path.join(tmp, f"rank{r}.log"), "w+")
                logs.append(log)
                procs.append(subprocess.Popen(net.exec_prefix(r) + [python, os.path.abspath(__file__), *args],
                                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            supervise(procs, logs, timeout_s, f"torchft {method}", "rank")
            with open(result) as f:
                return json.load(f)
        finally:
            kill_all(procs, logs)


def _total_tx(r: dict) -> Optional[float]:
    """Mean tx bytes per rank of a whole run: the counters read once the run is over (ours: after
    the closing flush, which sends the last fragments' bytes) when recorded, else the loop's last
    sample (torchft merges its last fragment inside the loop; nothing is in flight after it)."""
    if r.get("tx_bytes_per_rank_final"):
        return sum(r["tx_bytes_per_rank_final"]) / len(r["tx_bytes_per_rank_final"])
    return r["tx_bytes_per_rank_mean"][-1] if r.get("tx_bytes_per_rank_mean") else None


def analyse(runs: List[dict], window: int) -> List[dict]:
    """One row per run: loss, bytes, time, utilisation; ratios against our fp32 streaming run on
    the same link (``stream-none-P4-T1``), the like-for-like of torchft without quantization."""
    from localsgd_comm.bench.time_to_loss import smooth
    rows = []
    for r in runs:
        ref = next((q for q in runs if q["net"] == r["net"] and q["method"] == "stream-none-P4-T1"), None)
        final = smooth(r["loss_mean"], window)[-1]
        total = max(r["total_s_per_rank"])
        compute = sorted(r["compute_s_per_rank"])[len(r["compute_s_per_rank"]) // 2]
        tx, ref_tx = _total_tx(r), None if ref is None else _total_tx(ref)
        sums = r.get("global_params_checksum_per_rank")
        rows.append({
            "net": r["net"], "rate_mbit": r["rate_mbit"], "method": r["method"],
            "side": "torchft" if r["method"].startswith("torchft-") else "localsgd-comm",
            "final_loss": final,
            "loss_vs_ours_fp32": None if ref is None else final / smooth(ref["loss_mean"], window)[-1],
            "tx_mb_per_rank": None if tx is None else tx / 1e6,
            "tx_mb_max_rank": None if not r.get("tx_bytes_per_rank_final") else max(r["tx_bytes_per_rank_final"]) / 1e6,
            "tx_vs_ours_fp32": None if tx is None or not ref_tx else tx / ref_tx,
            "total_s": total, "compute_step_s": compute, "compute_util": compute * r["steps"] / total,
            "loop_compute_util": min(c / t for c, t in zip(r["in_loop_compute_s_per_rank"], r["total_s_per_rank"])),
            "sync_share": max(b / t for b, t in zip(r["sync_s_per_rank"], r["total_s_per_rank"])),
            "replicas_agree": None if sums is None else max(sums) == min(sums),
            # fragment syncs whose outer step was applied: ours counts merges, torchft its commits
            "outer_updates": (min(r["torchft_commits_per_rank"]) if "torchft_commits_per_rank" in r
                              else (r.get("diloco_stats") or {}).get("syncs")),
            "errors": max(r.get("torchft_errors_per_rank") or [0]),
        })
    return rows


def markdown(out: dict) -> str:
    from localsgd_comm.bench.report import md_table
    e, c, v = out["environment"], out["config"], out.get("torchft_versions") or {}
    head = (f"Streaming DiLoCo, localsgd-comm vs torchft {v.get('torchft', '?')}: {c['world']} workers on one "
            f"machine (each in its own network namespace, shaped link), GPT '{c['model']}', seq {c['seq']}, "
            f"batch {c['batch']}/worker, seed {c.get('seed', 0)}, {c['steps']} steps, H={c['sync_every']}, P=4 fragments, one inner step "
            f"of overlap (ours: overlap_steps=1; torchft: fragment_sync_delay=1), mixing "
            f"{out['alpha']} (torchft: fragment_update_alpha), outer SGD lr {c['outer_lr']} momentum "
            f"{c['outer_momentum']} Nesterov, AdamW lr {c['lr']} cosine. {e['machine']['cpu_model']}, "
            f"{e['machine']['cores']} cores shared with other work (load in the JSON); ours: torch "
            f"{e['versions']['torch']}, commit {str(e['git_commit'])[:10]}; torchft side: torch "
            f"{v.get('torch', '?')}, python {v.get('python', '?')}, triton {v.get('triton') or 'not installed'}. "
            "tx = the rank's namespace interface tx over the run (ours: until its closing flush is over; headers, and for torchft the lighthouse and "
            "quorum traffic, included), mean over ranks (max: the busiest rank). Loss = mean over ranks, moving "
            f"average of {out['smoothing_window']} steps. Utilisation and time in sync as in streaming_quick.md.\n\n"
            f"Command: `{e['command']}`\n\n")
    rows = [(r["net"], r["side"], r["method"], r["final_loss"], r["loss_vs_ours_fp32"], r["tx_mb_per_rank"],
             r["tx_mb_max_rank"], r["tx_vs_ours_fp32"], r["total_s"], 1e3 * r["compute_step_s"],
             f"{100 * r['compute_util']:.1f}%", f"{100 * r['loop_compute_util']:.1f}%",
             f"{100 * r['sync_share']:.1f}%", r["outer_updates"], r["errors"],
             {None: "-", True: "yes", False: "NO"}[r["replicas_agree"]])
            for r in out["table"]]
    body = md_table(["link", "side", "method", "final loss", "loss / ours fp32", "tx MB/rank", "tx MB busiest rank",
                     "tx / ours fp32", "loop s", "compute ms/step", "compute util", "in-loop compute util",
                     "time in sync", "outer updates applied", "failed collectives",
                     "global params equal on all ranks"], rows) + "\n"
    notes = "".join(f"\n{n}\n" for n in out.get("notes", []))
    notes += "".join(f"\n{r['net']} {r['method']}: torchft's first failed collective (rank 0): "
                     f"`{r['torchft_first_error_rank0'][:300]}`\n"
                     for r in out["runs"] if r.get("torchft_first_error_rank0"))
    fails = "".join(f"\n**Failed**: {f['net']} {f['method']}: `{f['reason'][-600:]}`\n" for f in out.get("failed", []))
    return head + body + notes + fails


def run(out_dir: str, torchft_python: str, nets: Sequence[float], methods: Sequence[str], alpha: float,
        steps: Optional[int], log=print, notes: Sequence[str] = (), triton_path: Optional[str] = None,
        seed: int = 0, name: str = "torchft_streaming") -> dict:
    from localsgd_comm.bench import report
    from localsgd_comm.bench.launch import RankFailure, run_ranks
    from localsgd_comm.bench.netns import ShapedNetwork
    from localsgd_comm.bench.streaming import config

    cfg = config(True, steps)
    if seed:
        cfg["seed"] = seed  # both sides' rank code: model init and data (default 0)
    env = report.environment()
    # no machine paths in the committed command: the two environments' paths become variables
    for path, var in ((torchft_python, "$TORCHFT_PYTHON"), (triton_path, "$TRITON_PATH")):
        if path:
            env["command"] = env["command"].replace(path, var)
    runs, failed, versions = [], [], None
    log(f"[torchft] config {cfg}; methods {list(methods)}; nets {list(nets)} Mbit/s")
    for rate in nets:
        net_name = f"{rate:g}mbit"
        with ShapedNetwork(cfg["world"], rate) as net:
            for m in methods:
                load0 = report.load_snapshot()
                try:
                    if m.startswith("torchft-"):
                        parse_torchft_method(m)
                        r = _run_torchft_ranks(torchft_python, cfg, m, net, alpha, 1200, triton_path)
                        versions = r.get("versions") or versions
                    else:
                        args = ["--worker", "--method", m, "--ifname", net.ifname] + [
                            f"--{k.replace('_', '-')}={v}" for k, v in cfg.items() if k != "world"]
                        r = run_ranks(cfg["world"], "localsgd_comm.bench.streaming", args, net=net, timeout_s=1200)
                except RankFailure as exc:
                    log(f"[torchft] FAILED {net_name} {m}: {str(exc)[-3000:]}")
                    failed.append({"net": net_name, "method": m, "reason": str(exc)[-4000:]})
                    continue
                r.update(net=net_name, rate_mbit=rate, load_before=load0, load_after=report.load_snapshot())
                runs.append(r)
                tx = (r.get("tx_bytes_per_rank_mean") or [0])[-1]
                log(f"[torchft] {net_name:>8} {m:<20} {max(r['total_s_per_rank']):7.1f} s  "
                    f"final loss {r['loss_mean'][-1]:.3f}  tx {tx / 1e6:.2f} MB/rank")
    window = max(5, cfg["steps"] // 12)
    out = {"benchmark": "torchft_streaming", "quick": True, "config": cfg, "smoothing_window": window,
           "alpha": alpha, "environment": env, "torchft_versions": versions, "runs": runs,
           "table": analyse(runs, window), "failed": failed, "notes": list(notes)}
    report.write_json(os.path.join(out_dir, name + ".json"), out)
    with open(os.path.join(out_dir, name + ".md"), "w") as f:
        f.write(markdown(out))
    return out


def rerender(path: str) -> dict:
    from localsgd_comm.bench import report
    with open(path) as f:
        out = json.load(f)
    out["table"] = analyse(out["runs"], out["smoothing_window"])
    report.write_json(path, out)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(markdown(out))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help="rank side (torchft environment)")
    p.add_argument("--torchft-python", default=os.environ.get("TORCHFT_PYTHON"),
                   help="the torchft environment's python (or $TORCHFT_PYTHON)")
    p.add_argument("--nets", default="10", help="comma-separated link rates in Mbit/s")
    p.add_argument("--methods", default=",".join(OURS + TORCHFT))
    p.add_argument("--alpha", type=float, default=0.5, help="mixing (ours' default for TAU > 0)")
    p.add_argument("--out", default=os.path.join(_REPO, "benchmarks", "results"))
    p.add_argument("--triton-path", default=None,
                   help="a folder holding triton, put on the PYTHONPATH of the '-triton' torchft methods")
    p.add_argument("--note", action="append", default=[], help="a line added under the table")
    p.add_argument("--rerender", default=None)
    p.add_argument("--name", default="torchft_streaming", help="the results' file name (without extension)")
    # rank side
    p.add_argument("--method", default="")
    p.add_argument("--ifname", default="")
    p.add_argument("--addrs", default="")
    p.add_argument("--model", default="small")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--sync-every", type=int, default=24)
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.6)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--timeout", type=float, default=1200.0)
    p.add_argument("--seed", type=int, default=0, help="model init and data seed")
    p.add_argument("--result", default="")
    a = p.parse_args(argv)
    if a.worker:
        _torchft_worker(a)
        return
    if a.rerender:
        rerender(a.rerender)
        return
    methods = [m for m in a.methods.split(",") if m]
    if any(m.startswith("torchft-") for m in methods) and not a.torchft_python:
        p.error("--torchft-python (or $TORCHFT_PYTHON): the torchft environment's interpreter is needed")
    run(a.out, a.torchft_python, [float(x) for x in a.nets.split(",")], methods, a.alpha, a.steps, notes=a.note,
        triton_path=a.triton_path, seed=a.seed, name=a.name)


if __name__ == "__main__":
    main()
