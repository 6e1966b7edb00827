"""DiLoCo over FSDP2-sharded replicas against unsharded DiLoCo: loss, bytes per sync on the
replicate group, outer-state memory per rank (2 replicas x 2 shards on CPU; the workers of
tests/test_fsdp.py). Prints a markdown table.

    python benchmarks/fsdp_replicas.py [--steps 24] [--sync-every 4]
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import localsgd_comm  # noqa: E402
from localsgd_comm import functional as LF  # noqa: E402

import test_fsdp as T  # noqa: E402
from _dist import run_ranks  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--sync-every", type=int, default=4)
    a = ap.parse_args()
    print(f"| compression | eval loss 2x2 sharded | eval loss unsharded (2 ranks) | rel. diff | local shard numel "
          f"(rank 0) | replicate-group bytes/sync/rank | ideal | ratio | outer state B/rank sharded | unsharded "
          f"| ratio | init broadcast B (rank 0) | FSDP shard-group B/step (rank 0) |")
    print("|" + "---|" * 14)
    for comp in ("none", "int8"):
        sh = run_ranks(T._sharded_worker, 4, comp, a.steps, a.sync_every, backend="localsgd", timeout=600)
        ref = run_ranks(T._unsharded_worker, 2, comp, a.steps, a.sync_every, backend="localsgd", timeout=600)
        n = sh[0]["local_numel"]
        bpe = 4.0 if comp == "none" else LF.compressed_nbytes(comp, n, localsgd_comm.DEFAULT_BLOCK_SIZE) / n
        ideal = n * bpe  # x 2(R-1)/R = 1 at R = 2
        per = max(max(s["per_sync"]) for s in sh)
        print(f"| {comp} | {sh[0]['eval']:.4f} | {ref[0]['eval']:.4f} | "
              f"{abs(sh[0]['eval'] - ref[0]['eval']) / ref[0]['eval']:.2e} | {n:,} | {per:,} | {ideal:,.0f} | "
              f"{per / ideal:.4f} | {sh[0]['state_bytes']:,} | {ref[0]['state_bytes']:,} | "
              f"{sh[0]['state_bytes'] / ref[0]['state_bytes']:.3f} | {sh[0]['init_stat']:,} | "
              f"{sh[0]['shard_group_bytes'] / a.steps:,.0f} |")


if __name__ == "__main__":
    main()
