"""One elastic DiLoCo worker for tests/test_elastic.py and ``localsgd-bench faults``: trains a
small regression MLP until the job has committed ``--rounds`` outer rounds, then writes what it
ended with (anchor and momentum digests, counters, events) as JSON to ``--out``.

    python tests/scripts/elastic_worker.py --coordinator 127.0.0.1:29600 --id w0 --rounds 6 --out w0.json

Fault injection: LOCALSGD_ELASTIC_KILL=<id>:<round>:<phase> (see localsgd_comm.elastic).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time

import torch
from torch import nn


def digest(ts) -> str:
    h = hashlib.sha256()
    for t in ts:
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--id", required=True)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--until-members", type=int, default=0,
                    help="after --rounds, go on (up to 10x the rounds) until the job has this many members again: "
                         "a test that restarts a worker does not depend on how fast the machine starts it")
    ap.add_argument("--until-joined", type=int, default=0, help="the same, until this many workers joined")
    ap.add_argument("--sync-every", type=int, default=4)
    ap.add_argument("--min-workers", type=int, default=1)
    ap.add_argument("--initial-workers", type=int, default=None)
    ap.add_argument("--compression", default="int8")
    ap.add_argument("--fragments", type=int, default=None, help="streaming: fragments of the model, a round each")
    ap.add_argument("--overlap-steps", type=int, default=0,
                    help="streaming: inner steps each fragment's all-reduce runs behind (merged with mixing 0.5)")
    ap.add_argument("--error-feedback", action="store_true")
    ap.add_argument("--join-timeout", type=float, default=5.0)
    ap.add_argument("--dead-after", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--quorum-timeout", type=float, default=60.0)
    ap.add_argument("--step-sleep", type=float, default=0.0, help="seconds per inner step (a slower worker)")
    ap.add_argument("--replica-size", type=int, default=1, help="processes of this worker (DDP inside)")
    ap.add_argument("--replica-rank", type=int, default=0)
    ap.add_argument("--replica-port", type=int, default=0, help="the replica's own rendezvous port")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (every worker on GPU 0)")
    ap.add_argument("--batchnorm", action="store_true", help="a BatchNorm1d in the model (module buffers)")
    ap.add_argument("--plain-logging", action="store_true", help="configure no logging (the library's default)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if not a.plain_logging:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    import localsgd_comm
    try:
        return train(a, localsgd_comm)
    except Exception as exc:  # noqa: BLE001 - the test reads the message
        with open(a.out, "w") as f:
            json.dump({"id": a.id, "error": f"{type(exc).__name__}: {exc}"}, f)
        return 1


def train(a, localsgd_comm) -> int:
    torch.manual_seed(0)
    dev = torch.device(a.device)
    norm = [nn.BatchNorm1d(64)] if a.batchnorm else []
    model = nn.Sequential(nn.Linear(32, 64), *norm, nn.Tanh(), nn.Linear(64, 8)).to(dev)
    target = torch.randn(32, 8, generator=torch.Generator().manual_seed(123)).to(dev)
    replica = None
    wrapped = model
    if a.replica_size > 1:
        import torch.distributed as dist
        from datetime import timedelta
        from torch.nn.parallel import DistributedDataParallel as DDP
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.replica_port}", rank=a.replica_rank,
                                world_size=a.replica_size, timeout=timedelta(seconds=20))
        replica = dist.group.WORLD
        wrapped = DDP(model)
    opt = localsgd_comm.ElasticDiLoCo(
        wrapped, torch.optim.AdamW(model.parameters(), lr=3e-3), replica_group=replica,
        coordinator=a.coordinator, worker_id=a.id,
        sync_every=a.sync_every, compression=a.compression, error_feedback=a.error_feedback,
        fragments=a.fragments, overlap_steps=a.overlap_steps,
        min_workers=a.min_workers, initial_workers=a.initial_workers, join_timeout_s=a.join_timeout,
        dead_after_s=a.dead_after, heartbeat_s=a.dead_after / 4, timeout_s=a.timeout, quorum_timeout_s=a.quorum_timeout)
    loss = torch.tensor(float("nan"))
    t0 = time.monotonic()
    # every member sees the same rounds, members and joins, so all stop at the same round
    def more():
        waiting = len(opt.members) < a.until_members or opt.stats["joined"] < a.until_joined
        return opt.round < a.rounds or (waiting and opt.round < 10 * a.rounds)

    while more():
        seed = int(hashlib.sha256(f"{a.id}/{a.replica_rank}:{opt.local_step}".encode()).hexdigest()[:8], 16)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(16, 32, generator=g).to(dev)
        loss = ((wrapped(x) - x @ target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if a.step_sleep:
            time.sleep(a.step_sleep)
    opt.flush()  # a fragment round still in flight (overlap_steps > 0): finished at the same step everywhere
    buffers = digest(list(model.buffers()))  # before the evaluation forward (train mode) moves them
    with torch.no_grad():  # on a fixed batch: the same value on every member (identical parameters)
        x = torch.randn(64, 32, generator=torch.Generator().manual_seed(7)).to(dev)
        loss = ((model(x) - x @ target) ** 2).mean()
    moms = [f.momentum for f in opt._flats if f.momentum is not None]
    out = {"id": a.id, "me": opt.me, "round": opt.round, "local_step": opt.local_step, "members": opt.members,
           "anchor": digest(opt.anchors()), "momentum": digest(moms), "params": digest(list(model.parameters())),
           "buffers": buffers,
           "loss": float(loss.detach()), "stats": opt.stats, "events": opt.events, "seconds": time.monotonic() - t0}
    opt.close()
    with open(a.out, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
