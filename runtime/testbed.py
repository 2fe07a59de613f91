"""An emulated multi-node cluster on one machine: Linux network namespaces + ``tc`` shaping.

Layout for ``nodes`` nodes (run prefix ``lina-<pid>-<k>``)::

    <prefix>-sw   switch namespace holding bridge ``br0`` and one port ``p<i>`` per node
    <prefix>-n<i> node namespace: ``lo`` and ``eth0`` (10.77.0.<i+1>/24), peer of ``p<i>``

Ranks of node ``i`` run inside ``<prefix>-n<i>``; traffic between them stays on that
namespace's local stack (loopback speed), traffic between nodes crosses ``eth0 -> p<i> ->
br0 -> p<j> -> eth0``. Both ends of every node link shape their egress with HTB to the
NIC rate, so a node's upload and download are each limited to ``nic`` bits/s, the way a
full-duplex NIC is. The subnet's route acknowledges every segment at once (``quickack``)
and the node links carry GSO super-packets of at most ``GSO_MAX_SEGS`` segments.
Nothing is created in, or routed to, the host's own namespace: the
subnet exists only inside these namespaces.

Teardown always runs: on ``__exit__`` (success, error, Ctrl-C), from SIGTERM/SIGINT
handlers, from ``atexit``; ``cleanup_stale()`` removes what a SIGKILLed run left behind.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lina_sim.errors import ConfigError, LinaSimError

PREFIX = "lina-"
MAX_NODES = 250  # node addresses .1 .. .250 of the /24 subnet
GSO_MAX_SEGS = 4  # TCP segments per GSO super-packet on a node link
SUBNET = "10.77.0"  # /24, private, exists only inside the testbed's namespaces
IFNAME = "eth0"  # each node's NIC, inside its namespace
_RUN_IDS = itertools.count()
_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}

_RATE_UNITS = {
    "bit": 1.0,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "tbit": 1e12,
    "b/s": 1.0,
    "kb/s": 1e3,
    "mb/s": 1e6,
    "gb/s": 1e9,
    "tb/s": 1e12,
}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


class TestbedError(LinaSimError):
    """The testbed cannot be built (not root, no namespaces, a tc failure)."""

    __test__ = False  # not a pytest test class


class TestbedTimeout(TestbedError):
    """Building the testbed ran past the run's deadline (a failed run, not bad input)."""

    __test__ = False


def parse_topology(text: str) -> tuple[int, int]:
    """``"2x4"`` -> (nodes, ranks_per_node)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise ConfigError("--testbed", f"bad NODESxRANKS {text!r}", "e.g. 2x2, 4x1 (both >= 1)")
    if int(m[1]) > MAX_NODES:
        raise ConfigError("--testbed", f"{m[1]} nodes do not fit the testbed's /24 subnet", f"1..{MAX_NODES} nodes")
    return int(m[1]), int(m[2])


def parse_rate(text: str) -> float:
    """A NIC rate such as ``400mbit``, ``10gbit`` or ``25Gb/s`` -> bits/s."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-zA-Z/]+)\s*", str(text))
    unit = m[2].lower() if m else ""
    if not m or unit not in _RATE_UNITS or float(m[1]) <= 0:
        raise ConfigError(
            "--nic",
            f"bad rate {text!r}",
            "a positive number with bit, kbit, mbit, gbit, tbit (or Mb/s, Gb/s), e.g. 400mbit",
        )
    return float(m[1]) * _RATE_UNITS[unit]


def parse_delay(text: str) -> float:
    """A one-way link delay such as ``1ms`` or ``200us`` -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|ms|us)\s*", str(text))
    if not m:
        raise ConfigError("--delay", f"bad delay {text!r}", "a number with s, ms or us, e.g. 1ms")
    return float(m[1]) * _TIME_UNITS[m[2]]


@dataclass(frozen=True)
class TestbedSpec:
    """``nodes`` x ``ranks_per_node``; each node link shaped to ``nic_bps`` bits/s per
    direction, with an optional one-way ``delay_s`` (needs the kernel's netem qdisc)."""

    __test__ = False

    nodes: int
    ranks_per_node: int
    nic_bps: float
    delay_s: float = 0.0

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @classmethod
    def parse(cls, topology: str, nic: str, delay: str | None = None) -> TestbedSpec:
        nodes, rpn = parse_topology(topology)
        return cls(nodes, rpn, parse_rate(nic), parse_delay(delay) if delay else 0.0)


def _sh(*args: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    """Run one ``ip``/``tc`` command; failures raise TestbedError with its stderr."""
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise TestbedError(f"testbed: `{' '.join(args)}` failed: {p.stderr.strip() or p.returncode}")
    return p


def require_netns() -> None:
    """Raise a one-line TestbedError unless we may create namespaces, veths and tc qdiscs."""
    if os.geteuid() != 0:
        raise TestbedError("testbed: needs root (network namespaces, veth, tc); run as root or without --testbed")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise TestbedError(f"testbed: `{tool}` not found (install iproute2)")


def list_namespaces() -> list[str]:
    p = _sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]


def _ns_pids(ns: str) -> list[int]:
    p = _sh("ip", "netns", "pids", ns, check=False)
    return [int(x) for x in p.stdout.split() if x.isdigit()]


def _kill_ns_processes(namespaces: Sequence[str], grace_s: float = 2.0) -> None:
    """SIGTERM, then SIGKILL, every process still inside ``namespaces``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for ns in namespaces for p in _ns_pids(ns) if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_ns_pids(ns) for ns in namespaces):
            time.sleep(0.05)


def _delete_namespaces(namespaces: Sequence[str]) -> None:
    """Kill what runs inside, then delete; deleting a namespace deletes its veths too."""
    _kill_ns_processes(namespaces)
    for ns in namespaces:
        _sh("ip", "netns", "del", ns, check=False)


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def cleanup_stale(all_runs: bool = False) -> list[str]:
    """Delete namespaces left by crashed runs (those whose creating pid is dead; every
    ``lina-*`` namespace if ``all_runs``). Returns the names removed."""
    stale = []
    for ns in list_namespaces():
        m = re.fullmatch(rf"{re.escape(PREFIX)}(\d+)-\d+-(?:sw|n\d+)", ns)
        if m and (all_runs or not _pid_alive(int(m[1]))):
            stale.append(ns)
    if stale:
        _delete_namespaces(stale)
    return stale


class Testbed:
    """The emulated cluster; use as a context manager::

    with Testbed(TestbedSpec(2, 2, 400e6)) as tb:
        tb.wrap(["python", "-m", "x"], rank=3)   # -> ip netns exec <node 1> python -m x
    """

    __test__ = False

    def __init__(
        self,
        spec: TestbedSpec,
        prefix: str | None = None,
        *,
        deadline: float | None = None,
        progress: Any = None,
    ):
        """``deadline`` (``time.monotonic()`` s): give up building past it (the run's one
        deadline covers start-up); ``progress``: a bar with ``stage``/``set``, one step per node."""
        if spec.nodes < 1 or spec.ranks_per_node < 1 or not spec.nic_bps > 0:
            raise ConfigError("testbed", f"bad spec {spec}")
        if spec.nodes > MAX_NODES:
            raise ConfigError("testbed.nodes", f"{spec.nodes} nodes do not fit the /24 subnet", f"1..{MAX_NODES}")
        self.spec = spec
        self.prefix = prefix or f"{PREFIX}{os.getpid()}-{next(_RUN_IDS)}"
        self.switch_ns = f"{self.prefix}-sw"
        self._created: list[str] = []
        self._lock = threading.Lock()
        self._old_handlers: dict[int, object] = {}
        self.deadline = deadline
        self.progress = progress

    # -- naming --------------------------------------------------------------------------
    def node_ns(self, node: int) -> str:
        return f"{self.prefix}-n{node}"

    def node_addr(self, node: int) -> str:
        return f"{SUBNET}.{node + 1}"

    @property
    def master_addr(self) -> str:
        return self.node_addr(0)

    @property
    def namespaces(self) -> list[str]:
        return [self.switch_ns] + [self.node_ns(i) for i in range(self.spec.nodes)]

    def node_of(self, rank: int) -> int:
        return rank // self.spec.ranks_per_node

    def wrap(self, cmd: Sequence[str], rank: int) -> list[str]:
        """The command line that runs ``cmd`` inside ``rank``'s node namespace."""
        return ["ip", "netns", "exec", self.node_ns(self.node_of(rank)), *cmd]

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> Testbed:
        self._install_handlers()
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        require_netns()
        atexit.register(self.down)
        sw = self.switch_ns
        self._add_ns(sw)
        _sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", sw, "link", "set", "br0", "up")
        if self.progress is not None:
            self.progress.stage("testbed nodes built", total=self.spec.nodes)
        for i in range(self.spec.nodes):
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise TestbedTimeout(f"timed out while building the testbed ({i} of {self.spec.nodes} nodes up)")
            if self.progress is not None:
                self.progress.set(i)
            ns, port = self.node_ns(i), f"p{i}"
            self._add_ns(ns)
            # Both veth ends are born inside our namespaces: the host namespace never sees them.
            _sh("ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", IFNAME, "netns", ns)
            _sh("ip", "-n", sw, "link", "set", port, "master", "br0")
            _sh("ip", "-n", sw, "link", "set", port, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.node_addr(i)}/24", "dev", IFNAME)
            _sh("ip", "-n", ns, "link", "set", IFNAME, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            # ACK every segment at once: with Linux's delayed ACKs, the small tail of a gloo
            # message waits up to ~40 ms behind Nagle, which stalled 5-15% of back-to-back
            # collectives by tens of ms; a NIC fabric has no such stalls to emulate.
            _sh(
                "ip",
                "-n",
                ns,
                "route",
                "replace",
                f"{SUBNET}.0/24",
                "dev",
                IFNAME,
                "proto",
                "kernel",
                "scope",
                "link",
                "src",
                self.node_addr(i),
                "quickack",
                "1",
            )
            # Small GSO super-packets on the shaped link: 64 KB ones against HTB's 64 KB
            # bucket stalled 2-4% of back-to-back collectives by 40-80 ms; 4 segments
            # (~6 KB) removed every stall in 1000 all-to-alls for 4% of the median time.
            for where, dev in ((ns, IFNAME), (sw, port)):
                _sh("ip", "-n", where, "link", "set", dev, "gso_max_segs", str(GSO_MAX_SEGS))
            self._shape(ns, IFNAME)  # node upload
            self._shape(sw, port)  # node download

    def _add_ns(self, ns: str) -> None:
        p = _sh("ip", "netns", "add", ns, check=False)
        if p.returncode != 0:
            raise TestbedError(f"testbed: cannot create network namespace {ns}: {p.stderr.strip()}")
        with self._lock:
            self._created.append(ns)

    def _shape(self, ns: str, dev: str) -> None:
        """HTB at the NIC rate on ``dev``'s egress; netem below it for a delay.

        The burst allows one 64 KB GSO super-packet (veths hand TCP segments up to 64 KB
        to the qdisc); HTB still holds the average to the rate.
        """
        rate = f"{int(self.spec.nic_bps)}bit"
        burst = str(max(64 * 1024, int(self.spec.nic_bps / 8 * 1e-3)))  # >= 1 ms of traffic
        tc = ("ip", "netns", "exec", ns, "tc")
        _sh(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1", "r2q", "1000")
        _sh(
            *tc,
            "class",
            "add",
            "dev",
            dev,
            "parent",
            "1:",
            "classid",
            "1:1",
            "htb",
            "rate",
            rate,
            "ceil",
            rate,
            "burst",
            burst,
            "cburst",
            burst,
        )
        if self.spec.delay_s > 0:
            p = _sh(
                *tc,
                "qdisc",
                "add",
                "dev",
                dev,
                "parent",
                "1:1",
                "netem",
                "delay",
                f"{self.spec.delay_s * 1e6:.0f}us",
                "limit",
                "10000",
                check=False,
            )
            if p.returncode != 0:
                raise TestbedError(
                    f"testbed: --delay needs the netem qdisc, which this kernel lacks ({p.stderr.strip()})"
                )
        else:
            _sh(*tc, "qdisc", "add", "dev", dev, "parent", "1:1", "pfifo", "limit", "10000")

    def down(self) -> None:
        """Kill every process in our namespaces and delete them. Idempotent."""
        main = threading.current_thread() is threading.main_thread()
        # A second Ctrl-C/SIGTERM must not cut the teardown short: hold signals until done,
        # then they reach the restored handlers.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS) if main else None
        try:
            with self._lock:
                created, self._created = self._created, []
            if created:
                _delete_namespaces(created)
            self._restore_handlers()
        finally:
            if held is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        try:
            atexit.unregister(self.down)
        except Exception:  # interpreter shutting down
            pass

    # -- signals: turn SIGTERM/SIGHUP into an exception so __exit__ runs -------------------
    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers live in the main thread only; atexit still covers us

        def on_signal(signum, frame):
            raise KeyboardInterrupt(f"testbed: got signal {signal.Signals(signum).name}")

        for sig in (signal.SIGTERM, signal.SIGHUP):  # SIGINT raises KeyboardInterrupt already
            self._old_handlers[sig] = signal.signal(sig, on_signal)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()
