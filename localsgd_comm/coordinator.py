"""``localsgd-coordinator``: hosts the store through which elastic DiLoCo workers find each
other (``localsgd_comm.ElasticDiLoCo``). It is not a worker, so no worker's death takes the store
down; it holds no training state (a few small keys per round)."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from datetime import timedelta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="localsgd-coordinator", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    ap.add_argument("--port", type=int, default=29600, help="TCP port (0: any free port, printed at start)")
    a = ap.parse_args(argv)
    if not 0 <= a.port < 65536:
        ap.error(f"--port: expected 0..65535, got {a.port}")
    import torch.distributed as dist
    try:
        store = dist.TCPStore(a.host, a.port, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=30))
    except Exception as exc:  # noqa: BLE001
        print(f"localsgd-coordinator: cannot listen on {a.host}:{a.port} ({exc})", file=sys.stderr)
        return 1
    print(f"localsgd-coordinator: serving the elastic DiLoCo store on {a.host}:{store.port} "
          "(workers: ElasticDiLoCo(coordinator='HOST:PORT', ...)); Ctrl-C stops it", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    print("localsgd-coordinator: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
