"""Sweeps and runs that die cleanly, on real processes: workers die with a SIGKILLed
sweep, Ctrl-C returns at once and keeps the finished points, the cache key follows the
source code, and a failed ``lina-sim run`` leaves no partial files."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import lina_sim.experiments.sweep.cache as sweep_cache
from lina_sim.config.scenario import expand
from lina_sim.experiments.sweep import (
    Cache,
    LocalBackend,
    describe_key,
    plan_points,
    resolve,
    run_sweep,
    source_hash,
)
from lina_sim.results.files import staged_dir

ROOT = Path(__file__).resolve().parent.parent
LINA_SIM = str(Path(sys.executable).with_name("lina-sim"))
# Points of about a second each on one core: long enough to interrupt a sweep midway.
SLOW_POINTS = {
    "name": "faults",
    "kind": "training",
    "cluster": {"preset": "paper-testbed", "nodes": 4},
    "model": {"preset": "transformer-xl-12", "layers": 8},
    "policies": ["deepspeed", "lina"],
    "sweep": {"grid": {"policies[lina].micro_op_mb": [1, 2, 3, 4]}},
}
N_SLOW = 4
SMALL = {
    "name": "small",
    "kind": "training",
    "cluster": {"preset": "paper-testbed", "nodes": 2},
    "model": {"preset": "transformer-xl-12", "layers": 2},
    "policies": ["deepspeed", {"name": "lina"}],
}


def write(tmp_path: Path, data: dict, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def group_members(pgid: int) -> dict[int, str]:
    """Live (not zombie) processes of process group ``pgid``: pid -> command line."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            found[int(d.name)] = cmd
    return found


def wait_until(predicate, timeout_s: float, poll_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()


def start_sweep(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """A real ``lina-sim sweep --workers 2`` in a session (process group) of its own."""
    sc = write(tmp_path, SLOW_POINTS)
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [LINA_SIM, "sweep", str(sc), "--workers", "2", "--cache", str(cache), "--out", str(tmp_path / "o.parquet")]
        + list(extra),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return proc, cache


def finished_points(cache: Path) -> int:
    return len(list(cache.glob("*.parquet")))


def kill_group(pgid: int) -> None:
    """Test clean-up: whatever the code under test left behind."""
    for pid in group_members(pgid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- workers die with the sweep ------------------------------------------------------------------
@pytest.mark.slow
def test_sigkilled_sweep_leaves_no_worker_or_tracker_running(tmp_path):
    proc, cache = start_sweep(tmp_path, "--quiet")
    try:
        assert wait_until(lambda: finished_points(cache) >= 1 or proc.poll() is not None, 120)
        members = group_members(proc.pid)
        workers = [pid for pid, cmd in members.items() if "spawn_main" in cmd]
        assert proc.poll() is None and len(workers) == 2, members  # killed midway, both workers busy
        os.kill(proc.pid, signal.SIGKILL)  # the sweep process only: no clean-up code can run
        proc.communicate()
        assert wait_until(lambda: not group_members(proc.pid), 5), group_members(proc.pid)
        assert finished_points(cache) < N_SLOW
    finally:
        kill_group(proc.pid)


@pytest.mark.slow
def test_ctrl_c_returns_at_once_and_a_rerun_reuses_the_finished_points(tmp_path):
    proc, cache = start_sweep(tmp_path)
    try:
        assert wait_until(lambda: finished_points(cache) >= 1 or proc.poll() is not None, 120)
        assert proc.poll() is None, proc.communicate()
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
        assert proc.returncode == 130 and took < 5, (proc.returncode, took, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        done = finished_points(cache)
        assert 1 <= done < N_SLOW
        assert f"interrupted: {done} of {N_SLOW} points finished" in err and "run the same command again" in err, err
        assert not (tmp_path / "o.parquet").exists()  # no partial table
        assert wait_until(lambda: not group_members(proc.pid), 5), group_members(proc.pid)
    finally:
        kill_group(proc.pid)
    again = subprocess.run(
        [LINA_SIM, "sweep", str(tmp_path / "s.yaml"), "--workers", "2", "--quiet", "--cache", str(cache)]
        + ["--out", str(tmp_path / "o.parquet")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0 and f"{N_SLOW - done} ran, {done} from cache" in again.stdout, again


def _watched_grandchild(tmp_path: Path, body: str) -> tuple[subprocess.Popen, Path]:
    """A middle process that starts a Python grandchild running ``body`` and then sleeps;
    the grandchild writes its pid to a file once ``body`` has armed its guard."""
    pidfile = tmp_path / "grandchild.pid"
    grandchild = f"import os, time\n{body}\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\ntime.sleep(600)\n"
    middle = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
    middle += "time.sleep(600)\n"
    proc = subprocess.Popen([sys.executable, "-c", middle], cwd=ROOT, start_new_session=True)
    assert wait_until(lambda: pidfile.exists() and pidfile.read_text(), 60), "the grandchild never started"
    return proc, pidfile


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize(
    "guard",
    [
        # The Linux parent-death signal alone (the watchdog would take an hour).
        "from lina_sim.experiments.sweep.lifeline import die_with_parent\ndie_with_parent(os.getppid(), 3600)",
        # The portable watchdog thread alone (no prctl).
        "import threading\nfrom lina_sim.experiments.sweep.lifeline import _watch_parent\n"
        "threading.Thread(target=_watch_parent, args=(os.getppid(), 0.1), daemon=True).start()",
    ],
    ids=["pdeathsig", "watchdog"],
)
def test_a_guarded_process_dies_with_its_parent(tmp_path, guard):
    if "die_with_parent" in guard and not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    proc, pidfile = _watched_grandchild(tmp_path, guard)
    try:
        child = int(pidfile.read_text())
        assert _alive(child)
        proc.kill()
        proc.wait()
        assert wait_until(lambda: not _alive(child), 5), "the grandchild outlived its parent"
    finally:
        kill_group(proc.pid)


# ---- the cache key follows the code -------------------------------------------------------------
def _copy_tree(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__")))


def test_source_hash_follows_code_and_presets_not_caches(tmp_path):
    a = _copy_tree(sweep_cache.PACKAGE_ROOT, tmp_path / "a")
    b = _copy_tree(a, tmp_path / "b")
    assert source_hash(a) == source_hash(b)
    (b / "__pycache__").mkdir(exist_ok=True)
    (b / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0bytecode")
    (b / "notes.txt").write_text("not code")
    assert source_hash(_copy_tree(b, tmp_path / "b2")) == source_hash(a)
    code = _copy_tree(a, tmp_path / "code")
    (code / "network" / "fluid.py").write_text((code / "network" / "fluid.py").read_text() + "\n# edited\n")
    preset = _copy_tree(a, tmp_path / "preset")
    yml = preset / "config" / "presets" / "paper-testbed.yaml"
    yml.write_text(yml.read_text() + "\n# edited\n")
    hashes = {source_hash(a), source_hash(code), source_hash(preset)}
    assert len(hashes) == 3
    described = resolve(expand(SMALL)[0]).describe()
    assert len({describe_key(described, code=h) for h in hashes}) == 3
    assert describe_key(described) == describe_key(described, code=source_hash())


def test_a_code_change_reruns_points_and_an_unchanged_tree_reuses_them(tmp_path, monkeypatch):
    """The real hash of real trees: the package root is pointed at a copy, then at an
    edited copy, as if the code had been edited between two runs."""
    cache = Cache(tmp_path / "cache")
    sweep_spec = {**SMALL, "sweep": {"grid": {"policies[lina].micro_op_mb": [10, 30]}}}
    before = _copy_tree(sweep_cache.PACKAGE_ROOT, tmp_path / "before")
    monkeypatch.setattr(sweep_cache, "PACKAGE_ROOT", before)
    first = run_sweep(plan_points(expand(sweep_spec)), LocalBackend(1), cache, progress=False)
    same = run_sweep(plan_points(expand(sweep_spec)), LocalBackend(1), cache, progress=False)
    assert (first.ran, first.cached, same.ran, same.cached) == (2, 0, 0, 2)
    after = _copy_tree(before, tmp_path / "after")
    engine = after / "training" / "engine.py"
    engine.write_text(engine.read_text() + "\n# a change to the simulator\n")
    monkeypatch.setattr(sweep_cache, "PACKAGE_ROOT", after)
    changed = run_sweep(plan_points(expand(sweep_spec)), LocalBackend(1), cache, progress=False)
    assert (changed.ran, changed.cached) == (2, 0)


# ---- lina-sim run leaves no partial files -------------------------------------------------------
def test_staged_dir_publishes_whole_or_not_at_all(tmp_path):
    out = tmp_path / "results" / "x"
    with pytest.raises(RuntimeError, match="midway"), staged_dir(out) as stage:
        (stage / "results.csv").write_text("half")
        raise RuntimeError("midway")
    assert not out.exists() and list((tmp_path / "results").iterdir()) == []
    with staged_dir(out) as stage:
        (stage / "results.csv").write_text("new")
    assert (out / "results.csv").read_text() == "new"
    (out / "keep.txt").write_text("other")
    with pytest.raises(KeyboardInterrupt), staged_dir(out) as stage:
        (stage / "results.csv").write_text("newer")
        (stage / "trace.json").write_text("{}")
        raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "results.csv"]
    assert (out / "results.csv").read_text() == "new"
    with staged_dir(out) as stage:
        (stage / "results.csv").write_text("newer")
    assert (out / "results.csv").read_text() == "newer" and (out / "keep.txt").read_text() == "other"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["x"]


def test_interrupted_run_leaves_the_results_directory_as_it_was(tmp_path):
    spec = {**SMALL, "sweep": {"grid": {"policies[lina].micro_op_mb": [5, 10, 15, 20, 25, 30, 35, 40]}}}
    sc = write(tmp_path, spec)
    out = tmp_path / "results" / "run"
    out.mkdir(parents=True)
    (out / "results.csv").write_text("old\n")
    proc = subprocess.Popen(
        [LINA_SIM, "run", str(sc), "--out", str(out), "--trace"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        first = proc.stdout.readline()  # the first point's table: it is running points now
        assert first.startswith("# small"), first + proc.stderr.read()
        os.killpg(proc.pid, signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        kill_group(proc.pid)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "# results:" not in rest
    assert [p.name for p in out.iterdir()] == ["results.csv"] and (out / "results.csv").read_text() == "old\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["run"]  # no staging directory left
