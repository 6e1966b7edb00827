"""Start one process per rank, torchrun-style (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
GLOO_SOCKET_IFNAME), each optionally inside its own network namespace via ``ip netns exec``.

torchrun itself cannot place ranks in different namespaces, hence this small launcher. Every
rank runs ``python -m <module> <args>`` with one intra-op thread (the machine this was built
on has 2 cores; oversubscribed ranks are ~5x slower). A rank that fails or a run that exceeds
its timeout kills the whole group, so nothing is left behind.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence

from .netns import ShapedNetwork

_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    # A port free in the root namespace; inside fresh namespaces every port is free anyway.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankFailure(RuntimeError):
    pass


def run_ranks(world: int, module: str, args: Sequence[str], net: Optional[ShapedNetwork] = None,
              timeout_s: float = 600.0, extra_env: Optional[dict] = None) -> dict:
    """Run ``world`` ranks of ``python -m module args --result FILE``; return rank 0's JSON."""
    if world < 1:
        raise ValueError(f"expected world >= 1, got {world}")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="lsgdb-") as tmp:
        result = os.path.join(tmp, "result.json")
        procs: List[subprocess.Popen] = []
        logs = []
        try:
            for r in range(world):
                env = dict(os.environ)
                env.update({
                    "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                    "LOCAL_WORLD_SIZE": str(world),
                    "MASTER_ADDR": net.addr(0) if net else "127.0.0.1",
                    "MASTER_PORT": str(port),
                    "GLOO_SOCKET_IFNAME": net.ifname if net else "lo",
                    "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": _PKG_PARENT + os.pathsep + env.get("PYTHONPATH", ""),
                })
                env.update(extra_env or {})
                cmd = [sys.executable, "-m", module, *args, "--result", result]
                if net is not None:
                    cmd = net.exec_prefix(r) + cmd
                log = open(os.path.join(tmp, f"rank{r}.log"), "w+")
                logs.append(log)
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            supervise(procs, logs, timeout_s, f"{module} {' '.join(args)}", "rank")
            with open(result) as f:
                return json.load(f)
        finally:
            kill_all(procs, logs)


def supervise(procs: List[subprocess.Popen], logs: list, timeout_s: float, what: str, unit: str) -> None:
    """Wait until every process exits 0; raise :class:`RankFailure` with every log's tail as soon
    as one fails or the deadline passes (the caller's ``finally`` kills the rest)."""
    deadline = time.monotonic() + timeout_s
    failed = None
    while True:
        codes = [p.poll() for p in procs]
        bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if bad:
            failed = f"{unit} {bad[0][0]} exited with code {bad[0][1]}"
            break
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > deadline:
            failed = f"timed out after {timeout_s:.0f} s"
            break
        time.sleep(0.05)
    tails = []
    for i, log in enumerate(logs):
        log.flush()
        log.seek(0)
        tails.append(f"--- {unit} {i} ---\n" + log.read()[-3000:])
    raise RankFailure(f"{what}: {failed}\n" + "\n".join(tails))


def kill_all(procs: List[subprocess.Popen], logs: list) -> None:
    """Kill every process still running (each leads its own session: its whole group), close the logs."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, 9)
            except ProcessLookupError:
                pass
            p.wait()
    for log in logs:
        log.close()


def write_result(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)
