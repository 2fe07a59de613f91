"""Start ranks with torch's own launcher, watch them, and stop all of them on the first
failure, a timeout, or a signal.

:func:`launch` runs one ``torchrun`` agent (``python -m torch.distributed.run``, static
rendezvous at the master's address) per node: plainly on this machine, or inside a
:class:`~runtime.testbed.Testbed` node's namespace (``ip netns exec NS python -m
torch.distributed.run --nnodes N --node-rank i --nproc-per-node R ...``). Each agent
starts its node's ranks with the torchrun environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and writes each
rank's stdout and stderr to a file, which this module echoes as ``[rank i] ...``.
Guarantees:

- the first rank to exit non-zero (or be killed) fails the run; the error names the
  rank, its node, its exit code or signal and its last line of stderr (else stdout);
- one deadline (``deadline``, ``time.monotonic()`` s, or ``timeout_s`` from now) bounds
  everything: start-up, rendezvous and the run;
- on a failure, timeout, Ctrl-C or SIGTERM every agent gets SIGTERM (torchrun forwards
  it to its ranks' process groups, then SIGKILLs them after ``grace_s``), then every
  process of the run still alive (tagged ``LINA_RUN_TAG`` in its environment) and its
  process group is SIGKILLed;
- if the launcher itself is SIGKILLed, agents and ranks die with their parents
  (``setpriv --pdeathsig``).

:func:`check_fits` refuses, before anything starts, more ranks than this machine holds.
:func:`run_entry` is the one-call API: testbed up, ``python -m runtime.entry MODE`` in
every rank, per-rank results back, testbed down.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lina_sim.errors import ConfigError, LinaSimError
from runtime.testbed import IFNAME, Testbed, TestbedSpec, TestbedTimeout

DEFAULT_TIMEOUT_S = 600.0
RESULT_FILE = "rank{rank}.pkl"
# Memory one rank needs, MiB: an idle torch 2.13 (CPU) + gloo rank measured 294 MiB RSS
# (216 MiB PSS) on this project's 2-core VM (/proc/PID/status of `lina-run --nproc 2 --
# runtime.entry idle`); the testbed scenarios' models and activations add tens of MiB,
# so 400 leaves room. Each node's torchrun agent imports torch as well: measured 221 MiB
# RSS (166 MiB PSS) the same way.
RANK_MEM_MIB = 400
AGENT_MEM_MIB = 250
# Ranks per core: a chosen rule, not a measured limit. Every CPU rank runs a Python
# thread plus gloo's I/O threads; past 8 per core the ranks' start-up alone (each imports
# torch, ~3 s of CPU) would eat most of the default connect timeout (30 s).
RANKS_PER_CORE = 8
# Share of the memory available now that a run may plan to use (the rest: page cache,
# the launcher, whatever else runs).
MEM_SHARE = 0.8
_FAILURE = re.compile(r"rank\s*:\s*(\d+) \(local_rank: (\d+)\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


class LaunchError(LinaSimError):
    """A rank failed, the run timed out, or the launch could not start. ``exit_code`` is
    the failed rank's (2 = it rejected its input, e.g. a world size mismatch)."""

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code


# -- what this machine holds ----------------------------------------------------------------
@dataclass(frozen=True)
class Host:
    """This machine's cores (affinity mask) and memory available now (bytes)."""

    cores: int
    mem_available: int

    @classmethod
    def detect(cls) -> Host:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        mem = 0
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        mem = int(line.split()[1]) * 1024
        except OSError:
            pass
        return cls(cores, mem or 1 << 62)  # unknown memory: cores alone decide

    def max_ranks(self, nodes: int = 1) -> int:
        """The most ranks this machine runs at once in ``nodes`` nodes (one agent each)."""
        by_cores = RANKS_PER_CORE * self.cores
        by_mem = int((self.mem_available * MEM_SHARE / 2**20 - nodes * AGENT_MEM_MIB) // RANK_MEM_MIB)
        return max(0, min(by_cores, by_mem))


def check_fits(world: int, nodes: int, asked: str, host: Host | None = None) -> None:
    """One ConfigError naming ``asked`` (e.g. ``--testbed 99x99``) if ``world`` ranks in
    ``nodes`` nodes do not fit this machine; says how many do and why."""
    host = host or Host.detect()
    if world <= host.max_ranks(nodes):
        return
    gib = host.mem_available / 2**30
    per_node = f", {host.max_ranks(nodes)} in {nodes} nodes" if nodes > 1 else ""
    raise ConfigError(
        asked,
        f"asks for {world} ranks; this machine ({host.cores} cores, {gib:.1f} GiB available) fits at most "
        f"{host.max_ranks(1)} ranks{per_node} ({RANKS_PER_CORE} per core; {RANK_MEM_MIB} MiB per rank and "
        f"{AGENT_MEM_MIB} MiB per node's torchrun agent within {MEM_SHARE:.0%} of the available memory)",
    )


# -- one run's agents and ranks -----------------------------------------------------------
@dataclass
class Layout:
    """Where a run's ranks go: ``nodes`` x ``ranks_per_node``, node-major."""

    nodes: int
    ranks_per_node: int
    master_addr: str
    master_port: int
    ifname: str

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node


@dataclass
class RankLog:
    """One rank's stdout and stderr files (written by its torchrun agent), what has been
    read of them, and their last lines."""

    rank: int
    node: int
    files: dict[str, Path | None] = field(default_factory=lambda: {"stdout": None, "stderr": None})
    offsets: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})
    partial: dict[str, str] = field(default_factory=lambda: {"stdout": "", "stderr": ""})
    tails: dict[str, collections.deque] = field(
        default_factory=lambda: {k: collections.deque(maxlen=20) for k in ("stdout", "stderr")}
    )

    def last_line(self) -> str:
        """The last non-empty line of stderr, else of stdout."""
        for stream in ("stderr", "stdout"):
            lines = [ln for ln in [*self.tails[stream], self.partial[stream]] if ln.strip()]
            if lines:
                return lines[-1].strip()
        return ""


@dataclass
class Agent:
    """One node's torchrun agent: its process, log directory and own output file."""

    node: int
    proc: subprocess.Popen
    log_dir: Path
    out_path: Path
    failed_at: float | None = None

    def output(self) -> str:
        try:
            return self.out_path.read_text(errors="replace")
        except OSError:
            return ""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for plain local launches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def agent_env(layout: Layout, tag: str, up_dir: str | None, extra: dict[str, str] | None) -> dict[str, str]:
    """The environment of every agent, which torchrun passes on to its ranks."""
    env = dict(os.environ)
    env.update(
        {
            # gloo picks its address from this device: the node's NIC inside a testbed, lo otherwise.
            "GLOO_SOCKET_IFNAME": layout.ifname,
            "NCCL_SOCKET_IFNAME": layout.ifname,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",  # rank output reaches its log file line by line
            "LINA_LAUNCHER_PID": str(os.getpid()),
            "LINA_RUN_TAG": tag,
        }
    )
    if up_dir:
        env["LINA_UP_DIR"] = up_dir
    # c10d warns on every connection that reverse DNS fails inside a namespace; keep errors.
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    env.update(extra or {})
    return env


def torchrun_argv(layout: Layout, node: int, cmd: Sequence[str], log_dir: Path, grace_s: float) -> list[str]:
    """``python -m torch.distributed.run`` for node ``node``, running ``cmd`` per rank."""
    guard = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
    return [
        *guard,
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(layout.nodes),
        "--node-rank",
        str(node),
        "--nproc-per-node",
        str(layout.ranks_per_node),
        "--rdzv-backend",
        "static",
        "--master-addr",
        layout.master_addr,
        "--master-port",
        str(layout.master_port),
        "--max-restarts",
        "0",  # a failed rank fails the run: no elastic restarts
        "--monitor-interval",
        "0.1",
        "--shutdown-timeout",
        str(max(1, round(grace_s))),
        "--log-dir",
        str(log_dir),
        "--redirects",
        "3",  # stdout and stderr of every rank to files; this module echoes them
        "--no-python",
        # Each rank dies with its agent, as the agent dies with us.
        *guard,
        *cmd,
    ]


def launch(
    cmd: Sequence[str],
    nprocs: int | None = None,
    *,
    testbed: Testbed | None = None,
    ranks_per_node: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    deadline: float | None = None,
    grace_s: float = 3.0,
    env: dict[str, str] | None = None,
    echo: bool = True,
    progress: Progress | None = None,
) -> list[int]:
    """Run ``cmd`` once per rank under torchrun and wait for all; return exit codes (all
    0) by rank.

    With ``testbed``, world size and node layout come from its spec and node ``i``'s
    agent runs in its namespace. Without, ``nprocs`` ranks run here, as ``nprocs //
    ranks_per_node`` pretend nodes (default: one node, one agent) that share loopback.
    ``deadline`` (``time.monotonic()`` s; default ``timeout_s`` from now) ends the run.
    ``progress`` counts the ranks through rendezvous.
    Raises :class:`LaunchError` naming the first rank that failed, or on timeout.
    """
    if testbed is not None:
        layout = Layout(testbed.spec.nodes, testbed.spec.ranks_per_node, testbed.master_addr, 29500, IFNAME)
    else:
        world = int(nprocs or 1)
        rpn = int(ranks_per_node or world)
        if world < 1 or rpn < 1 or world % rpn:
            raise ConfigError(
                "--ranks-per-node", f"{world} ranks cannot be split into nodes of {rpn}", "a divisor of the rank count"
            )
        layout = Layout(world // rpn, rpn, "127.0.0.1", free_port(), "lo")
    deadline = deadline if deadline is not None else time.monotonic() + timeout_s
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    agents: list[Agent] = []
    with tempfile.TemporaryDirectory(prefix="lina-launch-") as tmp:
        work = Path(tmp)
        up_dir = work / "up"
        up_dir.mkdir()
        logs = [RankLog(r, r // layout.ranks_per_node) for r in range(layout.world)]
        try:
            for node in range(layout.nodes):
                log_dir = work / f"node{node}"
                argv = torchrun_argv(layout, node, cmd, log_dir, grace_s)
                if testbed is not None:
                    argv = testbed.wrap(argv, node * layout.ranks_per_node)
                out_path = work / f"agent{node}.log"
                with open(out_path, "wb") as out:
                    proc = subprocess.Popen(
                        argv,
                        env=agent_env(layout, tag, str(up_dir), env),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                agents.append(Agent(node, proc, log_dir, out_path))
            return _monitor(agents, logs, layout, deadline, timeout_s, grace_s, up_dir, echo, progress)
        finally:
            _stop(agents, tag, grace_s)
            _pump_logs(agents, logs, layout, echo)  # what the ranks printed last


def _pump_logs(agents: Sequence[Agent], logs: Sequence[RankLog], layout: Layout, echo: bool) -> None:
    """Read what the ranks wrote since the last call; echo whole lines as ``[rank i]``."""
    for rl in logs:
        agent = agents[rl.node] if rl.node < len(agents) else None
        if agent is None:
            continue
        local = rl.rank % layout.ranks_per_node
        for stream in ("stdout", "stderr"):
            path = rl.files[stream]
            if path is None:
                # torchrun's layout: <log-dir>/<run id>_<random>/attempt_0/<local rank>/<stream>.log
                found = sorted(agent.log_dir.glob(f"*/attempt_*/{local}/{stream}.log"))
                if not found:
                    continue
                path = rl.files[stream] = found[-1]
            try:
                with open(path, "rb") as fh:
                    fh.seek(rl.offsets[stream])
                    data = fh.read()
            except OSError:
                continue
            if not data:
                continue
            rl.offsets[stream] += len(data)
            text = rl.partial[stream] + data.decode(errors="replace")
            *lines, rl.partial[stream] = text.split("\n")
            for line in lines:
                rl.tails[stream].append(line)
                if echo:
                    _echo(f"[rank {rl.rank}] {line}")


def _echo(line: str) -> None:
    # Through tqdm's writer, so that a progress bar on the terminal is redrawn below the line.
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)


def _root_cause(agent: Agent) -> tuple[int, int] | None:
    """(global rank, exit code) of the first failure torchrun's agent reports, if any."""
    text = agent.output()
    root = text.rsplit("Root Cause (first observed failure):", 1)
    m = _FAILURE.search(root[-1]) if len(root) == 2 else _FAILURE.search(text)
    return (int(m[1]), int(m[3])) if m else None


def _failure_error(agents: Sequence[Agent], logs: Sequence[RankLog]) -> LaunchError:
    """The error of a failed run: the rank that failed first (one killed by a signal, an
    outside cause, before one that exited; else the first agent to report)."""
    causes = []
    for agent in sorted((a for a in agents if a.failed_at is not None), key=lambda a: a.failed_at or 0.0):
        cause = _root_cause(agent)
        if cause is not None:
            causes.append(cause)
    if not causes:
        agent = min((a for a in agents if a.failed_at is not None), key=lambda a: a.failed_at or 0.0)
        lines = [ln for ln in agent.output().splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else ""
        return LaunchError(
            f"node {agent.node}'s torchrun agent {_describe_exit(agent.proc.returncode)}"
            + (f": {last}" if last else ""),
            exit_code=agent.proc.returncode,
        )
    rank, code = next((c for c in causes if c[1] < 0), causes[0])
    rl = logs[rank]
    last = rl.last_line()
    return LaunchError(
        f"rank {rank} (node {rl.node}) {_describe_exit(code)}"
        + (f": {last}" if last else "")
        + (f"; stopped the other {len(logs) - 1} ranks" if len(logs) > 1 else ""),
        exit_code=code,
    )


def _ranks_up(up_dir: Path) -> int:
    try:
        return sum(1 for _ in up_dir.glob("up.*"))  # not rank 0's progress report beside them
    except OSError:
        return 0


def _monitor(
    agents: list[Agent],
    logs: list[RankLog],
    layout: Layout,
    deadline: float,
    timeout_s: float,
    grace_s: float,
    up_dir: Path,
    echo: bool,
    progress: Progress | None,
) -> list[int]:
    if progress is not None:
        progress.stage("ranks through rendezvous", total=layout.world)
    settle_until = None
    while True:
        _pump_logs(agents, logs, layout, echo)
        now = time.monotonic()
        for a in agents:
            if a.failed_at is None and a.proc.poll() not in (None, 0):
                a.failed_at = now
                # The other nodes' ranks fail soon after (their peer is gone); give their
                # agents a moment to report, so the cause is told apart from the echoes.
                settle_until = settle_until or now + min(2.0, grace_s)
        if settle_until is not None and (now >= settle_until or all(a.proc.poll() is not None for a in agents)):
            _stop(agents, "", grace_s)
            for a in agents:
                if a.failed_at is None and a.proc.returncode not in (None, 0):
                    a.failed_at = time.monotonic()
            _pump_logs(agents, logs, layout, echo)
            raise _failure_error(agents, logs)
        if settle_until is None and all(a.proc.poll() == 0 for a in agents):
            return [0] * layout.world
        up = _ranks_up(up_dir)
        if progress is not None:
            done = _reported(up_dir) if up == layout.world else None
            if done is None:
                progress.set(up, "running, ranks up" if up == layout.world else None)
            else:
                progress.follow(*done)
        if now > deadline:
            what = (
                f"with {up} of {layout.world} ranks through rendezvous"
                if up < layout.world
                else f"with ranks {[rl.rank for rl in logs]} still running"
            )
            raise LaunchError(f"timed out after {timeout_s:g} s {what}; killed all ranks")
        time.sleep(0.05)


def _reported(up_dir: Path) -> tuple[int, int, str] | None:
    """What rank 0 last reported (:func:`runtime.dist.report_progress`): done, total, what."""
    try:
        done, total, what = (up_dir / "progress").read_text().split(" ", 2)
        return int(done), int(total), what
    except (OSError, ValueError):
        return None


def _tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment carries ``LINA_RUN_TAG=tag`` (agents and ranks)."""
    needle = f"LINA_RUN_TAG={tag}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _signal_group(pid: int, sig: signal.Signals) -> None:
    for kill in (os.killpg, os.kill):  # the process group (its session), then the process itself
        try:
            kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _stop(agents: Sequence[Agent], tag: str, grace_s: float) -> None:
    """SIGTERM every live agent (torchrun stops its ranks, SIGKILL after ``grace_s``),
    SIGKILL what is left, then every process still tagged ``tag`` and its group."""
    live = [a for a in agents if a.proc.poll() is None]
    for a in live:
        _signal_group(a.proc.pid, signal.SIGTERM)
    end = time.monotonic() + grace_s + 2.0
    while live and time.monotonic() < end:
        live = [a for a in live if a.proc.poll() is None]
        time.sleep(0.02)
    for a in agents:
        if a.proc.poll() is None:
            _signal_group(a.proc.pid, signal.SIGKILL)
        try:
            a.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
    if not tag:
        return
    # torchrun starts every rank in its own session; any a dying agent left behind.
    for _ in range(3):
        pids = _tagged_pids(tag)
        if not pids:
            return
        for pid in pids:
            _signal_group(pid, signal.SIGKILL)
        time.sleep(0.1)


# -- the one-call API ---------------------------------------------------------------------
def run_entry(
    mode: str,
    args: Sequence[str] = (),
    *,
    testbed: TestbedSpec | None = None,
    nprocs: int = 1,
    ranks_per_node: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    deadline: float | None = None,
    echo: bool = True,
    progress: Progress | None = None,
) -> list[Any]:
    """Run ``runtime.entry`` ``MODE`` in every rank; return each rank's result, by rank.

    With ``testbed`` the emulated cluster is built for the run and always torn down;
    building it counts against the same ``deadline`` (default ``timeout_s`` from now).
    """
    deadline = deadline if deadline is not None else time.monotonic() + timeout_s
    with ExitStack() as stack:
        run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lina-run-")))
        tb = enter_testbed(stack, testbed, deadline, timeout_s, progress) if testbed is not None else None
        world = testbed.world_size if testbed is not None else nprocs
        cmd = [sys.executable, "-m", "runtime.entry", mode, *args]
        launch(
            cmd,
            nprocs,
            testbed=tb,
            ranks_per_node=ranks_per_node,
            timeout_s=timeout_s,
            deadline=deadline,
            echo=echo,
            progress=progress,
            env={
                "LINA_RUN_DIR": str(run_dir),
                "LINA_CLOCK_T0": repr(time.monotonic()),
                "PYTHONPATH": rank_pythonpath(),
            },
        )
        return [read_result(run_dir, r) for r in range(world)]


def enter_testbed(
    stack: ExitStack, spec: TestbedSpec, deadline: float, timeout_s: float, progress: Progress | None = None
) -> Testbed:
    """Build ``spec``'s testbed inside ``stack`` (torn down when it closes) by ``deadline``."""
    try:
        return stack.enter_context(Testbed(spec, deadline=deadline, progress=progress))
    except TestbedTimeout as e:
        raise LaunchError(f"timed out after {timeout_s:g} s: {e}") from None


class Progress:
    """Start-up and run progress on stderr (tqdm): shown only on a terminal, not with
    ``--quiet``, and only once a run has taken a few seconds. ``stage`` names what runs
    now (with a count to reach), ``set`` moves the count; ``close`` clears the line
    before any error is printed."""

    DELAY_S = 3.0

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self._bar: Any = None

    def stage(self, desc: str, total: int, delay: float = DELAY_S) -> None:
        if not self.enabled:
            return
        # Here, not at the top: only a terminal run draws a bar.
        from tqdm import tqdm

        self.close()
        self._bar = tqdm(
            total=total,
            desc=f"lina-run: {desc}",
            file=sys.stderr,
            leave=False,
            delay=delay,
            bar_format="{desc} {n_fmt}/{total_fmt} [{elapsed}]",
        )

    def set(self, n: int, desc: str | None = None) -> None:
        if self._bar is None:
            return
        if desc and self._bar.desc != f"lina-run: {desc}":
            self._bar.set_description_str(f"lina-run: {desc}", refresh=False)
        self._bar.update(n - self._bar.n)  # also 0: redraws the elapsed time once the delay passed

    def follow(self, done: int, total: int, what: str) -> None:
        """Show the run's own count (rank 0's report), switching the line to it once."""
        if not self.enabled:
            return
        if self._bar is None or self._bar.total != total or not self._bar.desc.endswith(what):
            self.stage(what, total, delay=0.0)  # the run is already past start-up's delay
        self.set(done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


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
