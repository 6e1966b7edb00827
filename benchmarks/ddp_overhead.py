"""Per-step cost of a DDP model under DiLoCo against the bare module (the drop-in's overhead).

One process, one thread, world size 1 over the "localsgd" backend, the ``small`` byte-level GPT
(seq 128, batch 16), AdamW, gradient accumulation of 2 micro-steps with the script toggling
``require_backward_grad_sync`` as public scripts do. Timed variants, interleaved round by round
so that machine noise hits all of them alike:

* ``bare``: the module itself, AdamW, no DDP, no DiLoCo;
* ``diloco``: ``DDP(module)`` wrapped by ``DiLoCo`` (H larger than the timed steps, so the
  numbers are inner steps only; a sync's cost is the collectives benchmark's business);
* ``ddp``: plain DDP (world size 1: its reducer, bucket copies and hooks run; nothing is sent).

Reports the median step time of each and the ratios to ``bare``; writes JSON + Markdown::

    python benchmarks/ddp_overhead.py --out benchmarks/results/ddp_overhead
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import localsgd_comm
from localsgd_comm.data import ByteData, load_corpus
from localsgd_comm.model import GPT, config_for


def build(variant: str, size: str):
    torch.manual_seed(0)
    module = GPT(config_for(size))
    inner = torch.optim.AdamW(module.parameters(), lr=1e-3)
    if variant == "bare":
        return module, inner
    model = DDP(module)
    if variant == "ddp":
        return model, inner
    return model, localsgd_comm.DiLoCo(model, inner, sync_every=10**9)


def timed_steps(model, opt, data, steps: int, accum: int, start: int) -> float:
    t0 = time.perf_counter()
    for it in range(start, start + steps):
        for micro in range(accum):
            x, y = data.batch(0, it * accum + micro, 16)
            if isinstance(model, DDP):
                model.require_backward_grad_sync = micro == accum - 1
            loss = model(x, y) / accum
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    ap.add_argument("--out", default="ddp_overhead")
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("localsgd", store=dist.HashStore(), rank=0, world_size=1)
    data = ByteData(load_corpus(), seq_len=128, seed=0)
    variants = ["bare", "diloco", "ddp"]
    built = {v: build(v, a.size) for v in variants}
    for v in variants:  # warm-up (allocator, first-step autograd setup, DDP's bucket rebuild)
        timed_steps(*built[v], data, 3, 2, 0)
    times = {v: [] for v in variants}
    for r in range(a.rounds):
        for v in variants:
            times[v].append(timed_steps(*built[v], data, a.steps, 2, 100 + r * a.steps))
    med = {v: statistics.median(times[v]) for v in variants}
    result = {
        "what": "median step time (2 micro-steps), one process, one thread",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "model": a.size, "params": built["bare"][0].num_params(), "rounds": a.rounds, "steps": a.steps,
        "median_s": med, "all_s": times,
        "ratio_to_bare": {v: med[v] / med["bare"] for v in variants},
    }
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    lines = ["| variant | median step (ms) | vs bare |", "|---|---|---|"]
    for v in variants:
        lines.append(f"| {v} | {1e3 * med[v]:.1f} | {med[v] / med['bare']:.3f}x |")
    md = "\n".join(lines)
    with open(a.out + ".md", "w") as f:
        f.write(f"DDP-under-DiLoCo step overhead ({a.size} GPT, {result['params']:,} params, torch "
                f"{torch.__version__}, {a.rounds} rounds x {a.steps} steps)\n\n{md}\n")
    print(md)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
