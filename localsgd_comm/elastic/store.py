"""The coordinator's store: its address, the connection, failures turned into one clear error, and
the heartbeat thread."""
from __future__ import annotations

import atexit
import threading
from datetime import timedelta
from typing import List, Optional

import torch.distributed as dist


class CoordinatorUnreachable(RuntimeError):
    """The coordinator's store cannot be reached (it died, or the address is wrong)."""


def parse_address(addr: str):
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator: expected 'host:port', got {addr!r}")
    return host, int(port)


def namespace(run_id: str) -> str:
    return f"localsgd/elastic/{run_id}"


def job_round(store, run_id: str = "run") -> int:
    """The outer round a job's members are at (-1 before the first), read from the coordinator's
    store: for launchers and tests that act when a job reaches a round."""
    key = f"{namespace(run_id)}/cursor"
    return int(store.get(key).decode().split(":")[0]) if store.check([key]) else -1


def connect(coordinator: str, timeout_s: float = 30.0) -> "dist.TCPStore":
    """A client of the coordinator's store; a clear error when nothing answers there."""
    host, port = parse_address(coordinator)
    try:
        return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for this
        raise CoordinatorUnreachable(
            f"localsgd elastic: no coordinator store answers at {coordinator} within {timeout_s:g} s ({exc}); start "
            "one with `localsgd-coordinator --port PORT` on a machine every worker can reach") from exc


class CoordinatorStore:
    """The coordinator's store with every failure turned into CoordinatorUnreachable."""

    def __init__(self, store, addr: str):
        self.raw, self.addr = store, addr

    def _do(self, what, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001
            raise CoordinatorUnreachable(
                f"localsgd elastic: the coordinator store at {self.addr} failed ({what}: {exc}); it died or became "
                "unreachable. Training cannot go on without it: restart it and the workers (from checkpoints)") from exc

    def add(self, key: str, n: int) -> int:
        return int(self._do("add", self.raw.add, key, n))

    def set(self, key: str, value: str) -> None:
        self._do("set", self.raw.set, key, value)

    def get(self, key: str) -> Optional[str]:
        """The value, or None when the key does not exist (never blocks)."""
        if not self._do("check", self.raw.check, [key]):
            return None
        return self._do("get", self.raw.get, key).decode()

    def compare_set(self, key: str, desired: str) -> str:
        """Set key to desired unless it exists; returns the value that won."""
        return self._do("compare_set", self.raw.compare_set, key, "", desired).decode()


_live_heartbeats: List["Heartbeat"] = []


@atexit.register
def _stop_heartbeats() -> None:
    """Join the heartbeat threads before Python finalizes: a thread inside a store call when
    finalization begins is ended by a forced unwind that aborts the process (measured: SIGABRT,
    "terminate called without an active exception", in about 1 of 8 jobs whose coordinator died)."""
    for hb in list(_live_heartbeats):
        hb.stop.set()
    for hb in list(_live_heartbeats):
        hb.join(timeout=5.0)


class Heartbeat(threading.Thread):
    """Increments this worker's counter every ``period`` seconds on a store connection of its
    own (the training thread's connection may be busy in a long wait)."""

    def __init__(self, coordinator: str, key: str, period: float, timeout_s: float):
        super().__init__(name="localsgd-elastic-heartbeat", daemon=True)
        self.store = connect(coordinator, timeout_s)
        self.key, self.period = key, period
        self.stop = threading.Event()
        self.error: Optional[str] = None

    def start(self) -> None:
        _live_heartbeats.append(self)
        super().start()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    self.store.add(self.key, 1)
                except Exception as exc:  # noqa: BLE001 - the training thread reports it at the next store call
                    self.error = str(exc)
                    return
                self.stop.wait(self.period)
        finally:
            if self in _live_heartbeats:
                _live_heartbeats.remove(self)
