"""Shaped links for the multi-process benchmarks: Linux network namespaces, veth pairs, tc tbf.

Topology for ``world`` ranks (everything created here, nothing else touched)::

    <prefix>h          hub namespace holding a bridge ``br0``
    <prefix>0..p-1     one namespace per rank, interface ``lsb0`` = 10.213.7.(rank+1)/24,
                       veth peer ``p<rank>`` attached to the hub's bridge

With a rate, a ``tbf`` qdisc sits on both ends of every veth: each rank gets its own
full-duplex link of that rate (rank egress on ``lsb0``, rank ingress on the hub-side port).
No namespace gets a default route and the subnet exists only on these veths, so traffic can
only reach the other ranks. ``rate_mbit=None`` gives the same topology unshaped ("loopback"
class speed, but with private interface counters that no other process on the machine
touches).

netem is not available in this kernel, so no delay is emulated: the links have bandwidth
limits only (tbf's ``latency`` is its queueing bound, not a propagation delay).

Safety: every name starts with a per-run prefix ``lsgdb<pid>x``; teardown runs in ``finally``,
at exit (atexit) and on SIGTERM/SIGINT; ``cleanup_leftovers()`` removes namespaces of earlier
runs whose process no longer exists (``localsgd-bench cleanup``).
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
from typing import List, Optional

PREFIX = "lsgdb"  # every namespace this module creates starts with it
SUBNET = "10.213.7"  # private; exists only on veths inside our own namespaces
IFNAME = "lsb0"  # rank-side interface name, identical in every rank namespace

_live: List["ShapedNetwork"] = []
_handlers_installed = False


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be created here (not root, no ``ip``/``tc``, or not permitted)."""


def _run(cmd: List[str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {' '.join(cmd)}: {p.stderr.strip()}")
    return p


def availability() -> Optional[str]:
    """None when shaped links can be built here, else the reason why not (for a skip message)."""
    if os.geteuid() != 0:
        return "shaped links need root (network namespaces + tc); running as uid %d" % os.geteuid()
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) not found on PATH"
    probe = f"{PREFIX}{os.getpid()}xprobe"
    p = _run(["ip", "netns", "add", probe], check=False)
    if p.returncode != 0:
        return f"'ip netns add' is not permitted here: {p.stderr.strip()}"
    try:
        q = _run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
                  "rate", "100mbit", "burst", "64kb", "latency", "500ms"], check=False)
        if q.returncode != 0:
            return f"'tc qdisc add ... tbf' is not permitted here: {q.stderr.strip()}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return None


def _burst_bytes(rate_mbit: float, loopback: bool = False) -> int:
    # tbf needs burst >= rate/HZ; 64 KiB (what docs/platform.md records at 100 Mbit/s, 94% of the
    # rate reached) is too small for 1 Gbit/s (the bucket empties every 0.5 ms), so scale it
    # with the rate: ~4 ms worth of bytes, at least 64 KiB. On lo (MTU 65536) a packet larger
    # than the bucket can never be sent and the link stalls for good: at least 4 such packets.
    floor = 4 * 65536 + 4096 if loopback else 64 * 1024
    return max(floor, int(rate_mbit * 1e6 / 8 * 0.004))


class ShapedNetwork:
    """Context manager: ``with ShapedNetwork(4, rate_mbit=100) as net: net.exec_prefix(r)``."""

    def __init__(self, world: int, rate_mbit: Optional[float] = None, loopback: bool = False):
        """``loopback=True``: one namespace whose ``lo`` carries all ranks (127.0.0.1), shaped
        by a single tbf when a rate is given (then all ranks share that one rate)."""
        if world < 1 or world > 200:
            raise ValueError(f"expected 1 <= world <= 200 ranks, got {world}")
        if rate_mbit is not None and not rate_mbit > 0:
            raise ValueError(f"expected a positive rate in Mbit/s or None, got {rate_mbit!r}")
        self.world = world
        self.rate_mbit = rate_mbit
        self.prefix = f"{PREFIX}{os.getpid()}x{len(_live)}"
        self.hub = self.prefix + "h"
        self.created: List[str] = []
        self.loopback = loopback
        self.ifname = "lo" if loopback else IFNAME

    # --- names -------------------------------------------------------------------------
    def ns(self, rank: int) -> str:
        return self.prefix + "l" if self.loopback else f"{self.prefix}{rank}"

    def addr(self, rank: int) -> str:
        return "127.0.0.1" if self.loopback else f"{SUBNET}.{rank + 1}"

    def exec_prefix(self, rank: int) -> List[str]:
        return ["ip", "netns", "exec", self.ns(rank)]

    # --- life cycle --------------------------------------------------------------------
    def __enter__(self) -> "ShapedNetwork":
        reason = availability()
        if reason is not None:
            raise NetnsUnavailable(reason)
        _install_handlers()
        _live.append(self)
        try:
            self._create()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def _add_ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self.created.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _tbf(self, ns: str, dev: str) -> None:
        rate = self.rate_mbit
        _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
              "rate", f"{rate}mbit", "burst", str(_burst_bytes(rate, dev == "lo")), "latency", "500ms"])

    def _create(self) -> None:
        if self.loopback:
            self._add_ns(self.ns(0))
            if self.rate_mbit is not None:
                self._tbf(self.ns(0), "lo")
            return
        self._add_ns(self.hub)
        _run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for r in range(self.world):
            ns = self.ns(r)
            self._add_ns(ns)
            # Created directly inside the two namespaces: no interface ever appears in the
            # root namespace, so nothing can collide with the machine's own interfaces.
            _run(["ip", "link", "add", IFNAME, "netns", ns, "type", "veth",
                  "peer", "name", f"p{r}", "netns", self.hub])
            _run(["ip", "-n", self.hub, "link", "set", f"p{r}", "master", "br0"])
            _run(["ip", "-n", self.hub, "link", "set", f"p{r}", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.addr(r)}/24", "dev", IFNAME])
            _run(["ip", "-n", ns, "link", "set", IFNAME, "up"])
            if self.rate_mbit is not None:
                self._tbf(ns, IFNAME)
                self._tbf(self.hub, f"p{r}")

    def teardown(self) -> None:
        # Deleting a namespace deletes its veth ends, which deletes the peers and qdiscs too.
        while self.created:
            _run(["ip", "netns", "del", self.created.pop()], check=False)
        if self in _live:
            _live.remove(self)

    def describe(self) -> dict:
        return {
            "kind": "one namespace, all ranks on its lo (127.0.0.1)" if self.loopback
            else "veth pairs to a bridge, one namespace per rank",
            "rate_mbit": self.rate_mbit,
            "tbf_burst_bytes": None if self.rate_mbit is None else _burst_bytes(self.rate_mbit, self.loopback),
            "shaping": "none" if self.rate_mbit is None else
            ("one tbf on lo (all ranks share the rate)" if self.loopback else
             "tbf on both ends of each rank's veth (rate up and rate down per rank)"),
            "delay_emulation": "none (netem not available)",
        }


def _teardown_all(*_a) -> None:
    for net in list(_live):
        net.teardown()


def _install_handlers() -> None:
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_teardown_all)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        prev = signal.getsignal(sig)

        def handler(signum, frame, _prev=prev):
            _teardown_all()
            if callable(_prev):
                _prev(signum, frame)
            else:
                raise SystemExit(128 + signum)

        signal.signal(sig, handler)


def cleanup_leftovers(all_pids: bool = False) -> List[str]:
    """Delete namespaces named ``lsgdb<pid>x...`` whose creating process is gone (or all of
    them with ``all_pids``). Returns the names deleted."""
    if shutil.which("ip") is None:
        return []
    out = _run(["ip", "netns", "list"], check=False).stdout
    removed = []
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}(\d+)x\w+", name)
        if not m:
            continue
        pid = int(m.group(1))
        alive = pid != os.getpid() and os.path.exists(f"/proc/{pid}")
        if all_pids or not alive:
            if _run(["ip", "netns", "del", name], check=False).returncode == 0:
                removed.append(name)
    return removed


def read_iface_bytes(ifname: str) -> Optional[dict]:
    """tx/rx byte counters of ``ifname`` as seen from the calling process's namespace (a rank
    calls it inside its own namespace, where ``ip netns exec`` mounted a private /sys)."""
    base = f"/sys/class/net/{ifname}/statistics"
    try:
        with open(f"{base}/tx_bytes") as f:
            tx = int(f.read())
        with open(f"{base}/rx_bytes") as f:
            rx = int(f.read())
    except OSError:
        return None
    return {"tx_bytes": tx, "rx_bytes": rx}
