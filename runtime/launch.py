"""Spawn ranks as real processes, watch them, and stop all of them on the first failure.

:func:`launch` runs one command per rank with torchrun-style environment variables,
either plainly on this machine or inside a :class:`~runtime.testbed.Testbed`'s node
namespaces. Each rank gets its own process group (session), so a failing run kills the
rank *and everything it started*. Guarantees:

- the first rank to exit non-zero (or be killed) fails the run; the others get SIGTERM,
  then SIGKILL after ``grace_s``; the error names the dead rank and its last output line;
- ``timeout_s`` bounds the wall-clock time of the whole run;
- a Ctrl-C or exception in the launcher kills every rank before it propagates;
- if the launcher itself is SIGKILLed, ranks die with it (``setpriv --pdeathsig``).

:func:`run_entry` is the one-call API: testbed up, ``python -m runtime.entry MODE``
in every rank, per-rank results back, testbed down.
"""

from __future__ import annotations

import collections
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lina_sim.errors import ConfigError, LinaSimError
from runtime.testbed import IFNAME, Testbed, TestbedSpec

DEFAULT_TIMEOUT_S = 600.0
RESULT_FILE = "rank{rank}.pkl"


class LaunchError(LinaSimError):
    """A rank failed, the run timed out, or the launch could not start. ``exit_code`` is
    the failed rank's (2 = it rejected its input, e.g. a world size mismatch)."""

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RankProc:
    """One running rank: its process, node, and the last lines it printed."""

    rank: int
    node: int
    proc: subprocess.Popen
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))
    reader: threading.Thread | None = None

    def last_line(self) -> str:
        lines = [ln for ln in self.tail if ln.strip()]
        return lines[-1].strip() if lines else ""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for plain local launches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _pump(rp: RankProc, echo: bool) -> None:
    """Copy a rank's merged stdout/stderr to ours with a ``[rank i]`` prefix."""
    assert rp.proc.stdout is not None
    for line in rp.proc.stdout:
        rp.tail.append(line)
        if echo:
            sys.stdout.write(f"[rank {rp.rank}] {line}")
            sys.stdout.flush()


def _kill_all(ranks: Sequence[RankProc], grace_s: float) -> None:
    """SIGTERM every live rank's process group, SIGKILL what is left after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        live = [rp for rp in ranks if rp.proc.poll() is None]
        for rp in live:
            try:
                os.killpg(rp.proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while live and time.monotonic() < deadline:
            live = [rp for rp in live if rp.proc.poll() is None]
            time.sleep(0.02)
    for rp in ranks:
        # Members of a rank's group that outlive the rank itself (it forked helpers).
        try:
            os.killpg(rp.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def rank_env(
    rank: int,
    world: int,
    ranks_per_node: int,
    master_addr: str,
    master_port: int,
    ifname: str,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """torchrun-style environment for one rank."""
    env = dict(os.environ)
    env.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank % ranks_per_node),
            "LOCAL_WORLD_SIZE": str(ranks_per_node),
            "GROUP_RANK": str(rank // ranks_per_node),
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port),
            # gloo picks its address from this device: the node's NIC inside a testbed, lo otherwise.
            "GLOO_SOCKET_IFNAME": ifname,
            "NCCL_SOCKET_IFNAME": ifname,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "LINA_LAUNCHER_PID": str(os.getpid()),
        }
    )
    # c10d warns on every connection that reverse DNS fails inside a namespace; keep errors.
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    env.update(extra or {})
    return env


def launch(
    cmd: Sequence[str],
    nprocs: int | None = None,
    *,
    testbed: Testbed | None = None,
    ranks_per_node: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    grace_s: float = 3.0,
    env: dict[str, str] | None = None,
    echo: bool = True,
) -> list[int]:
    """Run ``cmd`` once per rank and wait for all; return exit codes (all 0) by rank.

    With ``testbed``, world size and node layout come from its spec and rank ``r`` runs in
    node ``r // ranks_per_node``'s namespace. Without, ``nprocs`` ranks run here, as
    ``nprocs // ranks_per_node`` pretend nodes (default: one node) that share loopback.
    Raises :class:`LaunchError` naming the first rank that failed, or on timeout.
    """
    if testbed is not None:
        world, rpn = testbed.spec.world_size, testbed.spec.ranks_per_node
        master_addr, port, ifname = testbed.master_addr, 29500, IFNAME
    else:
        world = int(nprocs or 1)
        rpn = int(ranks_per_node or world)
        if world < 1 or rpn < 1 or world % rpn:
            raise ConfigError(
                "--ranks-per-node", f"{world} ranks cannot be split into nodes of {rpn}", "a divisor of the rank count"
            )
        master_addr, port, ifname = "127.0.0.1", free_port(), "lo"
    guard = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
    ranks: list[RankProc] = []
    try:
        for r in range(world):
            argv = guard + list(cmd)
            if testbed is not None:
                argv = testbed.wrap(argv, r)
            proc = subprocess.Popen(
                argv,
                env=rank_env(r, world, rpn, master_addr, port, ifname, env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
            )
            rp = RankProc(r, r // rpn, proc)
            rp.reader = threading.Thread(target=_pump, args=(rp, echo), daemon=True)
            rp.reader.start()
            ranks.append(rp)
        return _monitor(ranks, timeout_s, grace_s)
    finally:
        _kill_all(ranks, grace_s)
        for rp in ranks:
            if rp.reader:
                rp.reader.join(timeout=2.0)


def _monitor(ranks: list[RankProc], timeout_s: float, grace_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [rp.proc.poll() for rp in ranks]
        failed = [rp for rp, c in zip(ranks, codes) if c not in (None, 0)]
        if failed:
            # We poll every 50 ms and stop everyone at the first failure, so these are the
            # ranks that failed first; prefer one killed by a signal (an outside cause).
            first = min(failed, key=lambda rp: (rp.proc.returncode >= 0, rp.rank))
            _kill_all(ranks, grace_s)
            if first.reader:
                first.reader.join(timeout=2.0)
            last = first.last_line()
            raise LaunchError(
                f"rank {first.rank} (node {first.node}) {_describe_exit(first.proc.returncode)}"
                + (f": {last}" if last else "")
                + f"; stopped the other {len(ranks) - 1} ranks",
                exit_code=first.proc.returncode,
            )
        if all(c == 0 for c in codes):
            return [0] * len(ranks)
        if time.monotonic() > deadline:
            running = [rp.rank for rp, c in zip(ranks, codes) if c is None]
            _kill_all(ranks, grace_s)
            raise LaunchError(f"timed out after {timeout_s:.0f} s with ranks {running} still running; killed all ranks")
        time.sleep(0.05)


# -- the one-call API ---------------------------------------------------------------------
def run_entry(
    mode: str,
    args: Sequence[str] = (),
    *,
    testbed: TestbedSpec | None = None,
    nprocs: int = 1,
    ranks_per_node: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    echo: bool = True,
) -> list[Any]:
    """Run ``runtime.entry`` ``MODE`` in every rank; return each rank's result, by rank.

    With ``testbed`` the emulated cluster is built for the run and always torn down.
    """
    with ExitStack() as stack:
        run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lina-run-")))
        tb = stack.enter_context(Testbed(testbed)) if testbed is not None else None
        world = testbed.world_size if testbed is not None else nprocs
        cmd = [sys.executable, "-m", "runtime.entry", mode, *args]
        launch(
            cmd,
            nprocs,
            testbed=tb,
            ranks_per_node=ranks_per_node,
            timeout_s=timeout_s,
            echo=echo,
            env={
                "LINA_RUN_DIR": str(run_dir),
                "LINA_CLOCK_T0": repr(time.monotonic()),
                "PYTHONPATH": rank_pythonpath(),
            },
        )
        return [read_result(run_dir, r) for r in range(world)]


def rank_pythonpath() -> str:
    """Ranks import ``runtime`` and ``lina_sim`` from the same tree as the launcher."""
    root = str(Path(__file__).resolve().parent.parent)
    old = os.environ.get("PYTHONPATH")
    return root + (os.pathsep + old if old else "")


def write_result(run_dir: str | os.PathLike, rank: int, obj: Any) -> Path:
    """Rank side: pickle ``obj`` atomically where :func:`read_result` finds it."""
    path = Path(run_dir) / RESULT_FILE.format(rank=rank)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(obj, f)
    os.replace(tmp, path)
    return path


def read_result(run_dir: str | os.PathLike, rank: int) -> Any:
    path = Path(run_dir) / RESULT_FILE.format(rank=rank)
    if not path.exists():
        raise LaunchError(f"rank {rank} exited cleanly but wrote no result ({path.name})")
    with open(path, "rb") as f:
        return pickle.load(f)
