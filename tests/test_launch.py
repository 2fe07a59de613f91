"""The launcher: real rank processes, failure propagation, timeouts, clean teardown."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import pytest

from runtime.launch import LaunchError, launch, run_entry
from runtime.testbed import cleanup_stale
from tests._netns import PY, lina_namespaces, lina_run, needs_netns, rank_pids


def _wait_for_ranks(proc: subprocess.Popen, n: int, timeout: float = 60) -> list[int]:
    """Wait until all ``n`` ranks of an ``idle`` run say they are in collectives."""
    ready = threading.Semaphore(0)

    def read() -> None:
        for line in proc.stdout:
            if "in collectives" in line:
                ready.release()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    for i in range(n):
        assert ready.acquire(timeout=max(0.0, deadline - time.monotonic())), f"only {i} of {n} ranks got ready"
    return rank_pids(proc.pid)


def _rank_of(pid: int) -> int | None:
    """The rank a process runs as; None for a node's torchrun agent (no RANK)."""
    env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Exit code and stderr (stdout belongs to the reader thread)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"lina-run did not exit within {timeout} s") from None
    return proc.returncode, proc.stderr.read()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()  # reap it, so cleanup_stale() sees its namespaces as stale
    cleanup_stale()


def test_plain_local_launch_returns_results():
    res = run_entry("selftest", ["4e5", "4e5", "1"], nprocs=2, timeout_s=60, echo=False)
    assert len(res) == 2 and all(r["allreduce_ok"] == 1.0 and r["a2a_ok"] == 1.0 for r in res)


def test_failing_rank_names_itself_and_stops_the_others():
    t = time.monotonic()
    cmd = [
        PY,
        "-c",
        "import os, sys, time\nif os.environ['RANK'] == '1':\n"
        "    print('rank one gives up'); sys.exit(3)\ntime.sleep(60)",
    ]
    with pytest.raises(LaunchError, match=r"rank 1 \(node 0\) exited with code 3: rank one gives up"):
        launch(cmd, 3, timeout_s=60, echo=False)
    assert time.monotonic() - t < 15


def test_timeout_kills_all_ranks():
    t = time.monotonic()
    with pytest.raises(LaunchError, match="timed out after 2 s"):
        launch([PY, "-c", "import time; time.sleep(60)"], 2, timeout_s=2, grace_s=1, echo=False)
    assert time.monotonic() - t < 10


@needs_netns
def test_killed_rank_fails_the_run_and_leaves_nothing():
    """SIGKILL one rank of a 2x2 testbed run: lina-run fails within a bounded time naming
    the rank, and no rank process or namespace survives."""
    proc = lina_run("--testbed", "2x2", "--nic", "1gbit", "--timeout", "120", "--", "runtime.entry", "idle", "120")
    try:
        pids = _wait_for_ranks(proc, 4)
        victim = next(p for p in pids if _rank_of(p) == 2)
        t = time.monotonic()
        subprocess.run(["kill", "-9", str(victim)])
        rc, err = _finish(proc, timeout=30)
        assert time.monotonic() - t < 20
        assert rc == 1, err
        last = err.strip().splitlines()[-1]
        assert "rank 2 (node 1) was killed by SIGKILL" in last, last
        assert not rank_pids(proc.pid)
        assert not lina_namespaces(f"lina-{proc.pid}-")
    finally:
        _kill(proc)


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_launcher_tears_everything_down(sig):
    proc = lina_run("--testbed", "2x1", "--nic", "1gbit", "--", "runtime.entry", "idle", "120")
    try:
        _wait_for_ranks(proc, 2)
        assert lina_namespaces(f"lina-{proc.pid}-")
        proc.send_signal(sig)
        rc, err = _finish(proc, timeout=30)
        assert rc == 130 and "interrupted" in err, err
        assert not rank_pids(proc.pid)
        assert not lina_namespaces(f"lina-{proc.pid}-")
    finally:
        _kill(proc)


def test_world_size_mismatch_and_unreachable_master(monkeypatch):
    from runtime import dist as ldist
    from runtime.launch import free_port

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # nothing listens there
    with pytest.raises(ldist.DistError, match="world size mismatch: launched with WORLD_SIZE=2, but the run needs 4"):
        ldist.init(expected_world_size=4)
    t = time.monotonic()
    with pytest.raises(ldist.DistError, match="cannot reach the master at 127.0.0.1"):
        ldist.init(connect_timeout_s=1.0)
    assert time.monotonic() - t < 10


def test_unknown_mode_and_missing_scenario_are_one_line_exit_2(tmp_path):
    scen = tmp_path / "s.yaml"
    scen.write_text("name: x\n")
    from runtime.entry import ENTRIES

    cases = [
        (["nosuch.yaml"], "no such file"),
        (["--nic", "1gbit", "--", "x"], "only apply with --testbed"),
        ([], "give a SCENARIO.yaml"),
    ]
    if "scenario" not in ENTRIES:  # until the executor registers its mode
        cases.append(([str(scen)], "register 'scenario'"))
    for args, needle in cases:
        p = subprocess.run([PY, "-m", "runtime.cli", *args], capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and needle in p.stderr and p.stderr.strip().count("\n") == 0, p.stderr


def test_rank_zero_reports_steps_and_the_launcher_reads_them(tmp_path, monkeypatch):
    """What lina-run's progress line shows once ranks are up: rank 0's own count, read
    from the run's folder (other ranks write nothing), and the up-count ignores it."""
    from runtime.dist import report_progress
    from runtime.launch import _ranks_up, _reported

    monkeypatch.setenv("LINA_UP_DIR", str(tmp_path))
    for r in range(2):
        (tmp_path / f"up.{r}").touch()
    assert _reported(tmp_path) is None
    report_progress(1, 3, 10, "training steps")
    assert _reported(tmp_path) is None
    report_progress(0, 3, 10, "training steps (every policy)")
    assert _reported(tmp_path) == (3, 10, "training steps (every policy)")
    assert _ranks_up(tmp_path) == 2
