"""lina-run under faults, with real torchrun agents and real rank processes: a start-up
that never reaches rendezvous times out, a crashing rank is named with its exit code
and last stderr line, and SIGTERM/SIGINT to lina-run stop everything. Afterwards no
process of the run (found by a unique marker in its command line, by scanning /proc)
and no namespace is left."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests._netns import PY, ROOT, lina_namespaces, needs_netns, rank_pids

# Rank modules, written per test into tmp_path (which joins the ranks' PYTHONPATH).
# Each touches STARTED_DIR/<rank> first, so a test knows the ranks were really running.
SLEEPER = """
import os, pathlib, sys, time
pathlib.Path(os.environ["STARTED_DIR"], os.environ["RANK"]).touch()
time.sleep(300)  # never reaches init_process_group
"""
CRASHER = """
import os, pathlib, sys, time
pathlib.Path(os.environ["STARTED_DIR"], os.environ["RANK"]).touch()
if os.environ["RANK"] == "1":
    time.sleep(1)
    print("some output first", flush=True)
    print("rank 1: boom, the disk is on fire", file=sys.stderr, flush=True)
    sys.exit(7)
time.sleep(300)
"""


def procs_with(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker``."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


class Run:
    """``lina-run [LAUNCH] -- <module> <marker>`` with the module written to ``tmp_path``."""

    def __init__(self, tmp_path: Path, source: str, *launch: str):
        self.marker = f"lina-marker-{uuid.uuid4().hex}"
        module = f"lina_rank_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{module}.py").write_text(source)
        self.started = tmp_path / "started"
        self.started.mkdir()
        env = {**os.environ, "PYTHONPATH": str(tmp_path), "STARTED_DIR": str(self.started)}
        self.proc = subprocess.Popen(
            [PY, "-m", "runtime.cli", *launch, "--", module, self.marker],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.t0 = time.monotonic()

    def wait_started(self, n: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while len(list(self.started.iterdir())) < n:
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, f"only {len(list(self.started.iterdir()))} of {n} ranks started"
            time.sleep(0.1)

    def finish(self, timeout: float) -> tuple[int, str, float]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"lina-run did not exit within {timeout} s") from None
        return self.proc.returncode, err, time.monotonic() - self.t0

    def assert_nothing_left(self) -> None:
        assert not procs_with(self.marker), "rank processes survived lina-run"
        assert not rank_pids(self.proc.pid), "agents or ranks survived lina-run"
        assert not lina_namespaces(f"lina-{self.proc.pid}-"), "namespaces survived lina-run"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in procs_with(self.marker):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


def test_timeout_covers_start_up(tmp_path):
    """Ranks that never reach rendezvous: --timeout 8 ends the run (exit 1, one line)
    and leaves no process behind."""
    run = Run(tmp_path, SLEEPER, "--nproc", "2", "--timeout", "8")
    try:
        rc, err, took = run.finish(timeout=90)
        assert rc == 1, err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert "timed out after 8 s with 0 of 2 ranks through rendezvous; killed all ranks" in lines[0]
        assert len(list(run.started.iterdir())) == 2, "the ranks never started: nothing was tested"
        assert took < 60
        run.assert_nothing_left()
    finally:
        run.kill()


def test_crashing_rank_is_named_with_its_code_and_last_stderr_line(tmp_path):
    run = Run(tmp_path, CRASHER, "--nproc", "3", "--timeout", "120", "--quiet")
    try:
        rc, err, took = run.finish(timeout=120)
        assert rc == 1, err
        last = err.strip().splitlines()[-1]
        assert last == (
            "lina-run: error: rank 1 (node 0) exited with code 7: rank 1: boom, the disk is on fire; "
            "stopped the other 2 ranks"
        ), err
        run.assert_nothing_left()
    finally:
        run.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_lina_run_stops_every_rank(tmp_path, sig):
    run = Run(tmp_path, SLEEPER, "--nproc", "2", "--ranks-per-node", "1", "--timeout", "300")
    try:
        run.wait_started(2)
        run.proc.send_signal(sig)
        rc, err, _ = run.finish(timeout=60)
        assert rc == 130 and "interrupted" in err, err
        run.assert_nothing_left()
    finally:
        run.kill()


@needs_netns
def test_timeout_on_the_testbed_removes_namespaces(tmp_path):
    run = Run(tmp_path, SLEEPER, "--testbed", "2x1", "--nic", "1gbit", "--timeout", "10")
    try:
        rc, err, took = run.finish(timeout=120)
        assert rc == 1 and "timed out after 10 s" in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert took < 90
        run.assert_nothing_left()
    finally:
        run.kill()
