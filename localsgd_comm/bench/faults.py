"""``localsgd-bench faults``: elastic DiLoCo through a worker death and a restart.

4 workers train the tiny byte-level GPT with ``ElasticDiLoCo`` (int8, each worker its own
process, found through a ``localsgd-coordinator`` process), twice with the same seeds:

* fault-free;
* worker w3 SIGKILLed in the middle of the all-reduce of the round at 30% of the rounds; its
  replacement (same name, a new incarnation) is started at once and is ready to join when the
  job reaches 60% of the rounds (so the interpreter's start-up, seconds on 2 cores, is not
  what is measured); it joins at the next round boundary and receives the state from a live
  member.

Reported: final validation loss of both runs (target: within 2%), the time the fault cost (the
survivors' recovery: failure detection, new quorum, the round redone), the join's wait and its
bytes, and the wall time of both runs; the plot draws the training loss against the step with
the membership of every round.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Optional

from .launch import free_port

WORKERS = 4


def _worker(a) -> int:
    import torch
    torch.set_num_threads(1)
    import localsgd_comm
    from localsgd_comm.data import ByteData, load_corpus
    from localsgd_comm.model import GPT, config_for
    from localsgd_comm.train import _evaluate
    torch.manual_seed(a.seed)
    data = ByteData(load_corpus(), seq_len=a.seq_len, seed=a.seed)
    model = GPT(config_for("tiny", a.seq_len))
    inner = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    if a.join_at_round is not None:
        # the replacement process is up (interpreter, torch, model: seconds on 2 cores) and becomes
        # ready to join once the job reached this round, as a restarted machine would
        st = localsgd_comm.elastic.connect(a.coordinator)
        while localsgd_comm.elastic.job_round(st) < a.join_at_round:
            time.sleep(0.02)
    opt = localsgd_comm.ElasticDiLoCo(model, inner, coordinator=a.coordinator, worker_id=a.id,
                                      sync_every=a.sync_every, compression="int8", outer_lr=0.7,
                                      outer_momentum=0.6, min_workers=2, initial_workers=WORKERS,
                                      join_timeout_s=5.0, dead_after_s=2.0, heartbeat_s=0.5, timeout_s=30.0,
                                      quorum_timeout_s=60.0)
    shard = int(a.id.lstrip("w"))  # data shard by name: a restarted worker reads its own shard on
    curve, losses, last_round, t0 = [], [], opt.round, time.monotonic()
    while opt.local_step < a.steps:
        x, y = data.batch(shard, opt.local_step, a.batch_size)
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if opt.round != last_round:
            curve.append({"round": opt.round, "step": opt.local_step, "t": time.monotonic() - t0,
                          "loss": sum(losses) / len(losses), "members": len(opt.members)})
            losses, last_round = [], opt.round
    val = _evaluate(model, data.val_batches(8, a.batch_size), "cpu")
    out = {"id": a.id, "me": opt.me, "val_loss": val, "curve": curve, "stats": opt.stats, "events": opt.events,
           "wall_s": time.monotonic() - t0, "rounds": opt.round, "params": sum(p.numel() for p in model.parameters())}
    opt.close()
    with open(a.out, "w") as f:
        json.dump(out, f)
    return 0


def _run(tmp: str, steps: int, sync_every: int, fault: bool, log, timeout_s: float = 1200) -> dict:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LOCALSGD_ELASTIC_KILL", None)
    coord = subprocess.Popen([sys.executable, "-m", "localsgd_comm.coordinator", "--host", "127.0.0.1", "--port",
                              str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs = {}
    rounds = steps // sync_every
    kill_round, restart_round = int(0.3 * rounds), int(0.6 * rounds)
    tag = "fault" if fault else "clean"

    def start(wid, kill="", join_at=None):
        e = dict(env, LOCALSGD_ELASTIC_KILL=kill) if kill else env
        out = os.path.join(tmp, f"{tag}-{wid}.json")
        extra = [] if join_at is None else ["--join-at-round", str(join_at)]
        procs[wid] = subprocess.Popen(
            [sys.executable, "-m", "localsgd_comm.bench.faults", "--worker", "--coordinator", f"127.0.0.1:{port}",
             "--id", wid, "--steps", str(steps), "--sync-every", str(sync_every), "--out", out] + extra,
            env=e, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, f"{tag}-{wid}.log"), "a"))

    try:
        line = coord.stdout.readline()
        if "serving" not in line:
            raise RuntimeError(f"the coordinator did not start: {line}")
        t0 = time.monotonic()
        for i in range(WORKERS):
            wid = f"w{i}"
            start(wid, f"{wid}:{kill_round}:allreduce" if fault and i == WORKERS - 1 else "")
        restarted_at = None
        if fault:
            procs[f"w{WORKERS - 1}"].wait(timeout=timeout_s)
            log(f"  w{WORKERS - 1} killed in round {kill_round} (mid all-reduce), "
                f"{time.monotonic() - t0:.1f} s into the run; its replacement starts now and is ready to join "
                f"at round {restart_round}")
            restarted_at = time.monotonic() - t0
            start(f"w{WORKERS - 1}", join_at=restart_round)
        for wid, p in procs.items():
            p.wait(timeout=max(timeout_s - (time.monotonic() - t0), 1))
        wall = time.monotonic() - t0
    finally:
        for p in list(procs.values()) + [coord]:
            if p.poll() is None:
                p.kill()
                p.wait()
    res = {}
    for i in range(WORKERS):
        path = os.path.join(tmp, f"{tag}-w{i}.json")
        if os.path.exists(path):
            res[f"w{i}"] = json.load(open(path))
    missing = [f"w{i}" for i in range(WORKERS) if f"w{i}" not in res]
    if missing:
        tails = {w: open(os.path.join(tmp, f"{tag}-{w}.log")).read()[-1500:] for w in missing}
        raise RuntimeError(f"faults benchmark ({tag}): no result from {missing}: {tails}")
    return {"workers": res, "wall_s": wall, "kill_round": kill_round if fault else None,
            "restart_round": restart_round if fault else None, "restarted_at_s": restarted_at, "rounds": rounds}


def run_suite(out_dir: str, quick: bool = False, log=print) -> Optional[dict]:
    from . import report
    # quick: long enough that the restarted worker (a fresh interpreter: ~3 s to import torch on
    # 2 cores) joins before the job ends
    steps, sync_every = (400, 10) if quick else (1000, 10)
    log(f"faults: {WORKERS} workers, tiny GPT, {steps} steps, H = {sync_every}, int8; fault-free run first")
    tmp = os.path.join(out_dir, "faults_workers")  # every worker's log and result, kept
    os.makedirs(tmp, exist_ok=True)
    clean = _run(tmp, steps, sync_every, False, log)
    log(f"  fault-free: {clean['wall_s']:.1f} s, val loss {clean['workers']['w0']['val_loss']:.4f}")
    faulty = _run(tmp, steps, sync_every, True, log)
    w0, wc = faulty["workers"]["w0"], clean["workers"]["w0"]
    joiner = faulty["workers"][f"w{WORKERS - 1}"]
    survivors = [faulty["workers"][f"w{i}"] for i in range(WORKERS)]
    identical = len({json.dumps(round(w["val_loss"], 12)) for w in survivors}) == 1
    join_ev = [e for e in joiner["events"] if e["kind"] == "joined"]
    out = {
        "benchmark": "faults", "quick": quick, "workers": WORKERS, "steps": steps, "sync_every": sync_every,
        "params": w0["params"], "compression": "int8",
        "clean": {"val_loss": wc["val_loss"], "wall_s": clean["wall_s"], "curve": wc["curve"]},
        "fault": {"val_loss": w0["val_loss"], "wall_s": faulty["wall_s"], "curve": w0["curve"],
                  "kill_round": faulty["kill_round"], "restart_round": faulty["restart_round"],
                  "restarted_at_s": faulty["restarted_at_s"], "recovery_s": w0["stats"]["recovery_s"],
                  "redone_rounds": w0["stats"]["redone_rounds"],
                  "join_round": join_ev[0]["round"] if join_ev else None,
                  "join_wait_s": join_ev[0].get("wait_s") if join_ev else None,
                  "join_bytes": joiner["stats"]["join_bytes_received"],
                  "val_losses_identical": identical, "events_w0": w0["events"]},
    }
    out["val_loss_rel_diff"] = (out["fault"]["val_loss"] - out["clean"]["val_loss"]) / out["clean"]["val_loss"]
    round_s = clean["wall_s"] / max(clean["rounds"], 1)
    out["round_s_clean"] = round_s
    rows = [["fault-free", f"{wc['val_loss']:.4f}", f"{clean['wall_s']:.1f}", "-", "-", "-"],
            ["w3 killed mid all-reduce at round {0}, restarted at round {1}".format(
                faulty["kill_round"], faulty["restart_round"]), f"{w0['val_loss']:.4f}", f"{faulty['wall_s']:.1f}",
             f"{w0['stats']['recovery_s']:.2f}", f"{out['fault']['join_round']}",
             f"{joiner['stats']['join_bytes_received']:,}"]]
    md = (f"Elastic DiLoCo through a fault ({WORKERS} workers, tiny GPT {w0['params']:,} params, {steps} steps, "
          f"H = {sync_every}, int8; `localsgd-bench faults{' --quick' if quick else ''}`)\n\n"
          + report.md_table(["run", "final val loss", "wall (s)", "recovery of the survivors (s)", "joined at round",
                             "join bytes"], rows)
          + f"\n\nval loss, fault vs fault-free: {100 * out['val_loss_rel_diff']:+.2f}% (target: within 2%); one "
            f"fault-free round takes {round_s:.2f} s; all final replicas identical: {identical}.\n")
    report.write_artifacts(out_dir, "faults" + ("_quick" if quick else ""), out, md, _plot)
    log(md)
    return out


def _plot(out: dict, path: str) -> None:
    from . import report
    plt = report.plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for key, style in (("clean", "-"), ("fault", "--")):
        c = out[key]["curve"]
        ax.plot([p["step"] for p in c], [p["loss"] for p in c], style, label=f"{key} (val {out[key]['val_loss']:.3f})")
    ax.set_xlabel("inner step")
    ax.set_ylabel("training loss (mean over the round)")
    ax2 = ax.twinx()
    c = out["fault"]["curve"]
    ax2.step([p["step"] for p in c], [p["members"] for p in c], where="post", color="gray", alpha=0.6,
             label="members (fault run)")
    ax2.set_ylabel("members of the round")
    ax2.set_ylim(0, out["workers"] + 1)
    ax.legend(loc="upper right")
    ax.set_title("elastic DiLoCo: a worker killed mid all-reduce and restarted")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help="internal: run one worker")
    ap.add_argument("--coordinator")
    ap.add_argument("--id")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--sync-every", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--join-at-round", type=int, default=None, help="internal: wait for this round, then join")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.worker:
        return _worker(a)
    ap.error("run it through `localsgd-bench faults` (this module's --worker mode is internal)")
    return 2


if __name__ == "__main__":
    sys.exit(main())
