"""lina-run checks everything before it builds or spawns anything: options, the testbed
spec, what this machine holds, the scenario and its world size; --help and --version.

Nothing here starts a rank. Where a test needs to prove that no namespace was made, the
launcher runs with an ``ip`` first on its PATH that logs every call and then runs the
real one, so the log shows whether ``ip netns add`` was ever called."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from lina_sim.errors import ConfigError
from runtime.launch import Host, check_fits
from tests._netns import PY, ROOT, lina_namespaces, needs_netns, rank_pids

SCENARIO_OPTIONS = ("--out", "--steps", "--warmup", "--dispatch", "--policies", "--keep-grads", "--profile-compute")
PROFILE = str(ROOT / "scenarios/profiles/testbed-2x2-400mbit.yaml")
LAUNCH_OPTIONS = ("--testbed", "--nic", "--delay", "--nproc", "--ranks-per-node", "--timeout", "--quiet")


def lina_run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.Popen(
        [PY, "-m", "runtime.cli", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = p.communicate(timeout=timeout)
    # Nothing it started may outlive it (its ranks and agents carry its pid in their env).
    assert not rank_pids(p.pid), f"processes of lina-run {p.pid} left behind"
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def one_line_error(p: subprocess.CompletedProcess, needle: str) -> str:
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert not p.stdout.strip(), p.stdout
    return lines[0]


def scenario(tmp_path: Path) -> str:
    """A tiny training scenario on the 2 x 2 testbed profile (4 ranks)."""
    path = tmp_path / "s.yaml"
    model = dict(
        layers=2, d_model=32, d_ff=64, heads=2, seq_len=16, micro_batch=2, vocab=64, experts=4, top_k=2, dtype="fp32"
    )
    doc = {"name": "cli-check", "kind": "training", "cluster": {"preset": PROFILE}, "model": model}
    path.write_text(yaml.safe_dump({**doc, "policies": ["deepspeed", "tutel"], "steps": 1}))
    return str(path)


@pytest.fixture
def ip_log(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose ``ip`` logs its arguments, then runs the real ``ip``."""
    real = shutil.which("ip")
    if real is None:
        pytest.skip("no ip command")
    bindir, log = tmp_path / "bin", tmp_path / "ip.log"
    bindir.mkdir()
    wrapper = bindir / "ip"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    return {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}, log


def netns_adds(log: Path) -> list[str]:
    return [ln for ln in log.read_text().splitlines() if ln.startswith("netns add")] if log.exists() else []


# -- --help and --version ----------------------------------------------------------------
def test_help_lists_every_option_of_every_subcommand():
    p = lina_run("--help")
    assert p.returncode == 0, p.stderr
    for opt in (*LAUNCH_OPTIONS, *SCENARIO_OPTIONS, "--shapes", "--dtypes", "--max-bytes", "--bytes", "--reps"):
        assert opt in p.stdout, f"{opt} missing from lina-run --help"
    for cmd in ("run", "module", "calibrate", "selftest", "cleanup"):
        assert f"lina-run {cmd}" in p.stdout
    p = lina_run("run", "--help")
    assert p.returncode == 0 and all(opt in p.stdout for opt in (*LAUNCH_OPTIONS, *SCENARIO_OPTIONS)), p.stdout


def test_ranks_parse_the_options_the_launcher_documents():
    """The rank side's parser is the launcher's definition, not a copy."""
    from runtime.cli import build_parser
    from runtime.context import scenario_args

    _, subs, actions = build_parser()
    documented = {s for a in subs["run"]._actions for s in a.option_strings}
    assert {s for a in actions for s in a.option_strings} == set(SCENARIO_OPTIONS) <= documented
    a = scenario_args(["x.yaml", "--steps", "3", "--dispatch", "uneven", "--keep-grads"])
    assert (a.steps, a.dispatch, a.keep_grads, a.warmup) == (3, "uneven", True, 1)


def test_version_of_both_commands():
    want = version("lina-sim")
    p = lina_run("--version")
    assert p.returncode == 0 and want in p.stdout, p.stdout + p.stderr
    p = subprocess.run([PY, "-m", "lina_sim.cli.main", "--version"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == f"lina-sim {want}", p.stdout + p.stderr


# -- bad input: one line, exit 2, nothing started -------------------------------------------
def test_mistyped_option_is_one_line_naming_it_and_the_allowed_ones(tmp_path):
    line = one_line_error(lina_run("--nproc", "4", scenario(tmp_path), "--stepz", "3"), "--stepz")
    assert "did you mean --steps?" in line and "allowed:" in line
    assert all(opt in line for opt in ("--out", "--warmup", "--testbed", "--nproc"))
    line = one_line_error(lina_run("selftest", "--nproc", "2", "--byts", "1e6"), "--byts")
    assert "--bytes" in line
    one_line_error(lina_run("--nproc", "2", "x.yaml", "--", "mod"), "before --")
    one_line_error(lina_run("selftest", "--reps", "0"), "--reps")
    one_line_error(lina_run("--nproc", "3", "--ranks-per-node", "2", "--", "mod"), "--ranks-per-node")


@needs_netns
def test_bad_option_with_a_testbed_builds_nothing(tmp_path, ip_log):
    env, log = ip_log
    before = set(lina_namespaces())
    p = lina_run("--testbed", "2x2", "--nic", "1gbit", scenario(tmp_path), "--warmpu", "1", env=env)
    one_line_error(p, "--warmpu")
    assert not netns_adds(log) and set(lina_namespaces()) == before


def test_more_ranks_than_the_machine_holds_is_refused_at_once():
    """--testbed 99x99 (9801 ranks) once built 100 namespaces and woke the OOM killer."""
    took = []
    for _ in range(3):  # the best of three: a loaded machine may stall one start
        t = time.monotonic()
        p = lina_run("--testbed", "99x99", "--nic", "1gbit", "--", "runtime.entry", "idle")
        took.append(time.monotonic() - t)
        line = one_line_error(p, "--testbed 99x99: asks for 9801 ranks; this machine (")
        assert "fits at most" in line and "per core" in line and "MiB per rank" in line
        if took[-1] < 1.0:
            break
    assert min(took) < 1.0, f"refused only after {min(took):.2f} s"
    one_line_error(lina_run("--nproc", "100000", "--", "runtime.entry", "idle"), "--nproc 100000: asks for")
    one_line_error(lina_run("--testbed", "251x1", "--nic", "1gbit", "--", "m"), "do not fit the testbed's /24")


def test_capacity_rule():
    host = Host(cores=2, mem_available=8 * 2**30)  # 8 GiB: memory, not cores, limits
    assert host.max_ranks(1) == min(16, int((8 * 1024 * 0.8 - 250) // 400))
    check_fits(host.max_ranks(2), 2, "--testbed 2x8", host)
    big = Host(cores=2, mem_available=64 * 2**30)  # 64 GiB: cores limit
    with pytest.raises(ConfigError, match=r"--nproc 17: asks for 17 ranks; .* fits at most 16 ranks \(8 per core"):
        check_fits(17, 1, "--nproc 17", big)


@needs_netns
def test_wrong_world_size_is_refused_before_any_namespace(tmp_path, ip_log):
    env, log = ip_log
    path = scenario(tmp_path)
    p = lina_run("--testbed", "1x2", "--nic", "1gbit", "--quiet", path, env=env)
    line = one_line_error(p, "world size mismatch")
    assert "needs 4 ranks" in line
    assert not netns_adds(log), log.read_text()
    p = lina_run("--testbed", "4x1", "--nic", "1gbit", "--quiet", path, env=env)
    one_line_error(p, "cluster.gpus_per_node")
    p = lina_run("--testbed", "2x2", "--nic", "1gbit", "--quiet", path, "--policies", "nope", env=env)
    one_line_error(p, "--policies: no policy labelled 'nope'")
    assert not netns_adds(log), log.read_text()


def test_wrong_world_size_without_a_testbed_spawns_nothing(tmp_path):
    p = lina_run("--nproc", "2", "--quiet", scenario(tmp_path))
    one_line_error(p, "world size mismatch")
