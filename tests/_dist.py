"""Multi-process test utility: run a worker function on N ranks on loopback.

    from _dist import run_ranks
    results = run_ranks(worker, 3, arg1, timeout=60, backend="localsgd")

* ``worker(rank, world_size, *args, **kwargs)`` must be a module-level function (it is pickled).
* Rendezvous like torchrun: the parent owns a TCPStore on 127.0.0.1 (port picked by the OS, so
  parallel test runs never race for a port) and every rank gets MASTER_ADDR, MASTER_PORT, RANK,
  WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and TORCHELASTIC_USE_AGENT_STORE=True (the flag
  torchrun sets: env:// then connects to the existing store instead of binding a new one).
  So ``dist.init_process_group("localsgd")`` (env://) works unchanged inside the worker;
  :func:`connect_store` gives an explicit ``TCPStore`` client for ``store=`` initialization.
* ``backend=...``: run_ranks initializes the default group (env://, ``pg_timeout``) before
  calling the worker and destroys it afterwards; ``backend=None`` leaves it to the worker.
* One deadline for the whole run (``timeout`` seconds): on timeout, or as soon as one rank fails
  (when ``return_exceptions`` is false), every rank is killed and the parent raises with each
  rank's traceback. A hung rank also dumps its Python stacks to stderr shortly before the
  deadline (faulthandler), so a hang shows where it is.
* ``return_exceptions=True``: failures come back in the result list as :class:`RankError`
  (exception raised in the worker) or :class:`RankDied` (process exited without a result),
  for tests that expect errors. The parent still waits for every rank (or the deadline).
* Processes start from a forkserver that has imported torch and localsgd_comm once, so a rank
  starts in ~0.1 s instead of the ~2 s of a fresh interpreter (2-core CI budget).
"""
from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

_CTX = None


@dataclass
class RankError:
    """A worker raised: ``type_name`` is the exception's class name, ``message`` its str()."""
    rank: int
    type_name: str
    message: str
    traceback: str

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.type_name}: {self.message}"


@dataclass
class RankDied:
    """A rank's process ended without reporting (killed, os._exit, segfault, deadline)."""
    rank: int
    exitcode: Optional[int]
    timed_out: bool

    def __str__(self) -> str:
        why = "killed at the deadline" if self.timed_out else f"exited with code {self.exitcode}"
        return f"rank {self.rank}: died without a result ({why})"


class DistTestError(RuntimeError):
    pass


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        # Imported once in the server, inherited by every forked rank.
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "localsgd_comm"])
    return _CTX


def connect_store(timeout: float = 60.0) -> dist.TCPStore:
    """A client of the parent's store (for ``init_process_group(store=..., rank=..., ...)``)."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         is_master=False, timeout=timedelta(seconds=timeout))


def _child(fn, rank, world_size, args, kwargs, env, backend, pg_timeout, pg_options, deadline_s, conn):
    os.environ.update(env)
    torch.set_num_threads(1)
    # Dump stacks just before the parent's deadline so a hang shows where it is.
    faulthandler.dump_traceback_later(max(deadline_s - 1.0, 1.0), exit=False)
    try:
        if backend is not None:
            dist.init_process_group(backend, timeout=timedelta(seconds=pg_timeout), pg_options=pg_options)
        try:
            result = fn(rank, world_size, *args, **kwargs)
        finally:
            if backend is not None and dist.is_initialized():
                dist.destroy_process_group()
        # Plain pickle by value: torch's multiprocessing reducers would share tensor storage
        # through file descriptors that vanish when this process exits.
        conn.send_bytes(pickle.dumps(("ok", result)))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        try:
            conn.send_bytes(pickle.dumps(("err", (type(exc).__name__, str(exc), traceback.format_exc()))))
        except Exception:  # pragma: no cover - e.g. unpicklable payload
            pass
    finally:
        faulthandler.cancel_dump_traceback_later()
        conn.close()


def run_ranks(fn: Callable, world_size: int, *args, timeout: float = 60.0, backend: Optional[str] = None,
              pg_timeout: float = 30.0, pg_options: Any = None, env: Optional[Dict[str, str]] = None,
              rank_env: Optional[Dict[int, Dict[str, str]]] = None, return_exceptions: bool = False,
              **kwargs) -> List[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes; see the module doc."""
    ctx = _context()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    base_env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(store.port),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "OMP_NUM_THREADS": "1",
    }
    procs, conns = [], []
    try:
        for rank in range(world_size):
            renv = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank), **(env or {}))
            renv.update((rank_env or {}).get(rank, {}))
            parent_conn, child_conn = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(fn, rank, world_size, args, kwargs, renv, backend, pg_timeout,
                                                 pg_options, timeout, child_conn), daemon=True)
            p.start()
            child_conn.close()
            procs.append(p)
            conns.append(parent_conn)

        deadline = time.monotonic() + timeout
        results: List[Any] = [None] * world_size
        done = [False] * world_size
        failed = False
        while not all(done) and time.monotonic() < deadline:
            progressed = False
            for r in range(world_size):
                if done[r]:
                    continue
                if conns[r].poll():
                    try:
                        status, payload = pickle.loads(conns[r].recv_bytes())
                    except EOFError:
                        procs[r].join(1.0)
                        results[r] = RankDied(r, procs[r].exitcode, False)
                        failed = True
                    else:
                        if status == "ok":
                            results[r] = payload
                        else:
                            results[r] = RankError(r, *payload)
                            failed = True
                    done[r] = True
                    progressed = True
                elif not procs[r].is_alive():
                    # It may have sent just before exiting: poll once more before declaring it dead.
                    if not conns[r].poll(0.05):
                        results[r] = RankDied(r, procs[r].exitcode, False)
                        done[r] = True
                        failed = True
                        progressed = True
            if failed and not return_exceptions:
                break
            if not progressed:
                time.sleep(0.01)
        for r in range(world_size):
            if not done[r]:
                results[r] = RankDied(r, None, True)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(5.0)
        for c in conns:
            c.close()
        del store

    bad = [x for x in results if isinstance(x, (RankError, RankDied))]
    if bad and not return_exceptions:
        detail = "\n".join(
            f"--- {x}\n{x.traceback}" if isinstance(x, RankError) else f"--- {x}" for x in bad)
        raise DistTestError(f"{len(bad)} of {world_size} ranks failed:\n{detail}")
    return results


__all__ = ["run_ranks", "connect_store", "RankError", "RankDied", "DistTestError"]
