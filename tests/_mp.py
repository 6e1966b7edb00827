"""Multi-process runner for the DiLoCo / train tests.

``run_workers(fn, world_size, *args)`` spawns ``world_size`` processes, each with one intra-op
thread, initializes a process group over a FileStore (no port races between concurrent test
runs) and returns ``[fn(rank, world_size, *args) for each rank]``. A worker exception is
re-raised in the parent with the worker's traceback; a worker that has not finished after
``timeout`` seconds fails the test and every worker is killed (a hung peer cannot hang CI).
``fn`` must be a module-level function (spawn pickles it by reference).
"""
from __future__ import annotations

import io
import os
import queue
import sys
import tempfile
import time
import traceback

import multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entry(fn, rank, world_size, backend, store_path, args, q):
    try:
        os.environ["OMP_NUM_THREADS"] = "1"
        if REPO not in sys.path:
            sys.path.insert(0, REPO)
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        import localsgd_comm  # noqa: F401  registers the "localsgd" backend

        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # serialized to bytes: torch.multiprocessing would pass tensors as shared-memory file
        # descriptors, which die with the worker before the parent reads them
        buf = io.BytesIO()
        torch.save(out, buf)
        q.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent verbatim
        q.put((rank, False, traceback.format_exc()))


def run_workers(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 120.0):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        store_path = os.path.join(d, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, backend, store_path, args, q), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results, errors = {}, []
        deadline = time.monotonic() + timeout
        try:
            while len(results) + len(errors) < world_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{world_size - len(results) - len(errors)} of {world_size} workers "
                                       f"did not finish within {timeout:.0f} s")
                try:
                    rank, ok, out = q.get(timeout=min(left, 1.0))
                except queue.Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead and not errors:
                        time.sleep(0.5)  # let a dying worker's report arrive first
                        if q.empty():
                            raise RuntimeError(f"worker exited with code {dead[0].exitcode} without a report")
                    continue
                if ok:
                    import torch

                    results[rank] = torch.load(io.BytesIO(out), weights_only=False)
                else:
                    errors.append(f"--- rank {rank} ---\n{out}")
                    break  # peers of a failed rank would block in a collective: stop now
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 0.5)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        if errors:
            raise RuntimeError("worker failed:\n" + "\n".join(errors))
        return [results[r] for r in range(world_size)]
