"""Sweeps: expansion, validation before running, cache keys, resume after SIGKILL,
failures recorded, the Ray backend against the local one, and the CLI's errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

import lina_sim.experiments.sweep as sweep
import lina_sim.experiments.sweep.cache as sweep_cache
import lina_sim.experiments.sweep.worker as sweep_worker  # where the workers look execute_point up
from lina_sim.config.scenario import expand
from lina_sim.experiments.sweep import (
    Cache,
    LocalBackend,
    Progress,
    SweepError,
    comparable,
    describe_key,
    plan_points,
    resolve,
    run_sweep,
)

ROOT = Path(__file__).resolve().parent.parent
BASE = {
    "name": "t",
    "kind": "training",
    "cluster": {"preset": "paper-testbed", "nodes": 2},
    "model": {"preset": "transformer-xl-12", "layers": 2},
    "policies": ["deepspeed", {"name": "lina"}],
}


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lina_sim.cli.main", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def write(tmp_path: Path, data: dict, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


# ---- expansion and paths -------------------------------------------------------------------
def test_grid_only_zip_only_and_product_order():
    grid = expand({**BASE, "sweep": {"grid": {"cluster.nodes": [1, 2], "model.layers": [1, 2, 3]}}})
    assert [(p.swept["cluster.nodes"], p.swept["model.layers"]) for p in grid] == [
        (n, l) for n in (1, 2) for l in (1, 2, 3)
    ]  # the last grid field varies fastest
    zipped = expand({**BASE, "sweep": {"zip": {"cluster.nodes": [1, 2, 4], "model.layers": [3, 2, 1]}}})
    assert [(p.swept["cluster.nodes"], p.swept["model.layers"]) for p in zipped] == [(1, 3), (2, 2), (4, 1)]
    assert all(p.data["cluster"]["nodes"] == p.swept["cluster.nodes"] for p in zipped)


def test_nested_paths_create_blocks_and_shorthands_resolve():
    pts = expand(
        {
            **BASE,
            "sweep": {
                "grid": {
                    "cluster.nic_bandwidth": [25e9],
                    "cluster.nvlink.latency": [1e-6],
                    "policies[lina].micro_op_bytes": [50e6],
                    "policies[deepspeed].bucket_mb": [10],
                }
            },
        }
    )
    setup = resolve(pts[0])
    assert setup.cluster.nic.bandwidth == 25e9 and setup.cluster.nvlink.latency == 1e-6
    assert setup.policies[1].params == {"micro_op_mb": 50.0} and setup.policies[0].params == {"bucket_mb": 10}
    assert set(pts[0].swept) == {
        "cluster.nic_bandwidth",
        "cluster.nvlink.latency",
        "policies[lina].micro_op_bytes",
        "policies[deepspeed].bucket_mb",
    }


# ---- validation before anything runs --------------------------------------------------------
@pytest.mark.parametrize(
    "block,needle",
    [
        ({"grid": {"cluster.nic.bandwdth": [1e9, 2e9]}}, "did you mean cluster.nic.bandwidth"),
        ({"grid": {"compute.foo": [1, 2]}}, "sweep.compute.foo: has no effect"),
        ({"zip": {"cluster.nodes": [1, 2], "cluster.pcie.latncy": [1e-6, 2e-6]}}, "did you mean cluster.pcie.latency"),
        ({"grid": {"model.layers": [1, 0, -1]}}, "2 of 3 points are invalid"),
    ],
)
def test_plan_rejects_bad_points(block, needle):
    with pytest.raises(SweepError, match=needle):
        plan_points(expand({**BASE, "sweep": block}))


# ---- cache keys -------------------------------------------------------------------------------
def _key(data: dict, version: str | None = None) -> str:
    setup = resolve(expand(data)[0])
    return describe_key(setup.describe(), *([version] if version else []))


@pytest.mark.parametrize(
    "change",
    [
        {"cluster": {"preset": "paper-testbed", "nodes": 2, "nic": {"bandwidth": 25e9}}},
        {"cluster": {"preset": "paper-testbed", "nodes": 2, "gpu": {"hbm_bandwidth": 2e12}}},
        {"model": {"preset": "transformer-xl-12", "layers": 2, "micro_batch": 4}},
        {"policies": ["deepspeed", {"name": "lina", "micro_op_mb": 10}]},
        {"policies": ["deepspeed", {"name": "lina", "label": "lina2"}]},
        {"collectives": {"all_to_all": "hierarchical"}},
        {"seed": 1},
        {"steps": 2},
    ],
)
def test_key_changes_with_any_resolved_field(change):
    assert _key({**BASE, **change}) != _key(BASE)


def test_key_ignores_spelling_and_follows_the_version():
    same = {
        **BASE,
        "cluster": {"preset": "paper-testbed", "nodes": 2, "nic": {"bandwidth": 12.5e9}},
        "name": "another name",
        "description": "labels do not change the simulation",
    }
    assert _key(same) == _key(BASE)
    assert _key(BASE, "0.0.0-other") != _key(BASE)


def test_changed_field_reruns_only_that_point(tmp_path):
    cache = Cache(tmp_path / "cache")
    grid = {"grid": {"policies[lina].micro_op_mb": [10, 30]}}
    first = run_sweep(plan_points(expand({**BASE, "sweep": grid})), LocalBackend(1), cache, progress=False)
    assert (first.ran, first.cached) == (2, 0)
    grid = {"grid": {"policies[lina].micro_op_mb": [10, 60]}}
    second = run_sweep(plan_points(expand({**BASE, "sweep": grid})), LocalBackend(1), cache, progress=False)
    assert (second.ran, second.cached) == (1, 1)
    changed = {**BASE, "cluster": {"preset": "paper-testbed", "nodes": 2, "nic": {"bandwidth": 25e9}}}
    third = run_sweep(plan_points(expand({**changed, "sweep": grid})), LocalBackend(1), cache, progress=False)
    assert (third.ran, third.cached) == (2, 0)


# ---- results, failures, progress -----------------------------------------------------------
def test_table_has_a_row_per_point_and_policy_and_swept_columns(tmp_path):
    pts = plan_points(
        expand(
            {
                **BASE,
                "sweep": {"grid": {"cluster.nodes": [1, 2]}, "zip": {"policies[lina].micro_op_bytes": [10e6, 30e6]}},
            }
        )
    )
    res = run_sweep(pts, LocalBackend(1), Cache(tmp_path), progress=False)
    t = res.table
    assert len(t) == 4 * 2 and list(t["point"].unique()) == [0, 1, 2, 3]
    assert {
        "cluster.nodes",
        "policies[lina].micro_op_bytes",
        "point_key",
        "status",
        "error",
        "bwd_a2a_slowdowns",
    } <= set(t.columns)
    assert set(t["status"]) == {"ok"} and list(t["policy"][:2]) == ["deepspeed", "lina"]
    sweep.write_parquet(t, tmp_path / "out.parquet")
    back = pd.read_parquet(tmp_path / "out.parquet")
    pd.testing.assert_frame_equal(comparable(back), comparable(sweep_cache._parquet_safe(t)), check_dtype=False)


def test_failing_point_is_recorded_and_the_rest_go_on(tmp_path, monkeypatch):
    pts = plan_points(expand({**BASE, "sweep": {"grid": {"policies[lina].micro_op_mb": [10, 20, 30]}}}))
    real = sweep_worker.execute_point

    def flaky(sc):
        if sc.swept["policies[lina].micro_op_mb"] == 20:
            raise RuntimeError("boom")
        return real(sc)

    monkeypatch.setattr(sweep_worker, "execute_point", flaky)
    cache = Cache(tmp_path)
    res = run_sweep(pts, LocalBackend(1), cache, progress=False)
    bad = res.table[res.table["point"] == 1]
    assert list(bad["status"]) == ["error", "error"] and bad["error"].str.contains("RuntimeError: boom").all()
    assert (res.table[res.table["point"] != 1]["status"] == "ok").all()
    assert [i for i, _ in res.failed] == [1]
    monkeypatch.setattr(sweep_worker, "execute_point", real)
    again = run_sweep(pts, LocalBackend(1), cache, progress=False)  # failures are retried
    assert (again.ran, again.cached, again.failed) == (1, 2, [])


def _sized_pty(columns: int = 120) -> tuple[int, int]:
    """(master, slave) of a real pseudo-terminal of ``columns`` columns."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return master, slave


def _drain(fd: int) -> str:
    import select

    out = b""
    while select.select([fd], [], [], 0.2)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace")


@pytest.mark.parametrize("columns", [120, 0])  # 0: a terminal that does not say its width
def test_progress_bar_on_a_terminal_counts_cached_and_failed(columns):
    master, slave = _sized_pty(columns)
    with os.fdopen(slave, "w") as term:
        p = Progress(10, cached=2, stream=term)
        for ok in (True, True, False):
            p.update(ok)
        p.close()
        text = _drain(master)
    os.close(master)
    assert "5/10" in text and "2 cached, 1 failed" in text and "sweep:" in text, text


def test_progress_bar_is_off_when_not_a_terminal_or_quiet(tmp_path):
    with open(tmp_path / "log", "w") as log:
        p = Progress(3, stream=log)
        p.show()
        p.update()
        p.close()
    master, slave = _sized_pty()
    with os.fdopen(slave, "w") as term:
        q = Progress(3, stream=term, enabled=False)
        q.update()
        q.close()
        quiet = _drain(master)
    os.close(master)
    assert (tmp_path / "log").read_text() == "" and quiet == ""


def test_run_draws_a_bar_over_points_on_a_terminal_only(tmp_path):
    """`lina-sim run` with stderr on a real (sized) terminal: a bar over its 2 points,
    the tables on stdout; --quiet draws nothing."""
    sc = write(tmp_path, {**BASE, "sweep": {"grid": {"policies[lina].micro_op_mb": [10, 30]}}})
    drawn = {}
    for quiet in (False, True):
        master, slave = _sized_pty()
        cmd = [sys.executable, "-m", "lina_sim.cli.main", "run", str(sc), "--out", str(tmp_path / "r")]
        proc = subprocess.Popen(cmd + ["--quiet"] * quiet, cwd=ROOT, stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        out, _ = proc.communicate(timeout=120)
        drawn[quiet] = _drain(master)
        os.close(master)
        assert proc.returncode == 0 and out.count("# t:") == 2, out
    assert "run: 100%" in drawn[False] and "2/2" in drawn[False], drawn[False]
    assert drawn[True] == ""


# ---- resume after a real kill -----------------------------------------------------------------
KILL = {
    "name": "kill",
    "kind": "training",
    "cluster": {"preset": "paper-testbed", "nodes": 4},
    "model": {"preset": "transformer-xl-12", "layers": 4},
    "policies": ["deepspeed", "lina"],
    "sweep": {"grid": {"policies[lina].micro_op_mb": [1, 2, 3, 4, 5, 6, 7, 8]}},
}


def test_killed_sweep_resumes_to_exactly_the_uninterrupted_rows(tmp_path):
    sc = write(tmp_path, KILL)
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lina_sim.cli.main",
            "sweep",
            str(sc),
            "--workers",
            "1",
            "--quiet",
            "--cache",
            str(cache),
            "--out",
            str(tmp_path / "a.parquet"),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while len(list(cache.glob("*.parquet"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(cache.glob("*.parquet")))
    assert proc.returncode == -signal.SIGKILL and 3 <= done_at_kill < 8, "the sweep must be killed midway"
    assert not (tmp_path / "a.parquet").exists()

    r = cli("sweep", str(sc), "--workers", "1", "--cache", str(cache), "--out", str(tmp_path / "a.parquet"))
    assert r.returncode == 0, r.stderr
    assert f"{8 - done_at_kill} ran, {done_at_kill} from cache" in r.stdout
    # The uninterrupted reference, in this process (same planning as the command's).
    _, points = sweep.load_plan(sc)
    sweep.write_parquet(run_sweep(points, LocalBackend(1), None, progress=False).table, tmp_path / "b.parquet")
    resumed = comparable(pd.read_parquet(tmp_path / "a.parquet"))
    fresh = comparable(pd.read_parquet(tmp_path / "b.parquet"))
    assert len(fresh) == 16
    pd.testing.assert_frame_equal(resumed, fresh)


# ---- the CLI's bad input ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "sweep_block,args,needle",
    [
        ({"grid": {"cluster.nic.bandwdth": [1e9, 2e9]}}, [], "cluster.nic.bandwdth"),
        ({"grid": {"cluster.nodes": []}}, [], "sweep.grid.cluster.nodes: empty list"),
        ({"grid": {}}, [], "sweep: empty sweep"),
        ({"grid": {"clustr.nodes": [1, 2]}}, [], "sweep.clustr.nodes: unknown top-level field"),
        (
            {"grid": {"cluster.nodes": [1, 2]}},
            ["--backend", "ray", "--address", "127.0.0.1:{port}"],
            "cannot reach a Ray cluster at 127.0.0.1:",
        ),
    ],
)
def test_bad_input_is_one_line_before_any_point_runs(tmp_path, sweep_block, args, needle):
    sc = write(tmp_path, {**BASE, "sweep": sweep_block})
    args = [a.format(port=_free_port()) for a in args]
    t0 = time.monotonic()
    r = cli("sweep", str(sc), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "o.parquet"), *args)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o.parquet").exists()
    assert time.monotonic() - t0 < 60


# ---- Ray --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray", reason="ray cannot be imported; install the extra: pip install 'lina-sim[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_and_local_backends_give_identical_rows(ray_session):
    pts = plan_points(
        expand({**BASE, "sweep": {"grid": {"cluster.nodes": [1, 2]}, "zip": {"policies[lina].micro_op_mb": [10, 30]}}})
    )
    local = run_sweep(pts, LocalBackend(1), None, progress=False)
    backend = sweep.RayBackend()  # joins the test's session rather than starting another
    try:
        remote = run_sweep(pts, backend, None, progress=False)
    finally:
        backend.close()
    assert ray_session.is_initialized() and backend.workers == 2
    assert len(remote.table) == 8 and set(remote.table["status"]) == {"ok"}
    pd.testing.assert_frame_equal(comparable(remote.table), comparable(local.table))


# ---- compare and reproduce ------------------------------------------------------------------
def test_compare_puts_tables_side_by_side(tmp_path, capsys):
    from lina_sim.experiments.compare import compare_files

    sim = pd.DataFrame(
        {
            "model": ["m"] * 4,
            "experts": [8, 8, 16, 16],
            "policy": ["deepspeed", "lina"] * 2,
            "step_time_s": [0.2, 0.1, 0.4, 0.3],
            "status": "ok",
        }
    )
    real = sim.assign(step_time_s=sim["step_time_s"] * 1.1).drop(columns="status")
    sweep.write_parquet(sim, tmp_path / "sweep.parquet")
    real.to_csv(tmp_path / "measured.csv", index=False)
    assert (
        compare_files([str(tmp_path / "sweep.parquet"), f"real={tmp_path / 'measured.csv'}"], out=str(tmp_path / "cmp"))
        == 0
    )
    out = pd.read_csv(tmp_path / "cmp.csv")
    assert list(out.columns) == ["experts", "policy", "tmp", "real", "real/tmp"] or "real/" in out.columns[-1]
    assert out.iloc[:, -1].round(6).eq(1.1).all() and (tmp_path / "cmp.png").exists()
    assert "step_time_s" in capsys.readouterr().out


def test_reproduce_writes_figure_and_report(tmp_path):
    from lina_sim.experiments.reproduce import reproduce

    rc = reproduce(out=tmp_path / "gallery", quick=True, workers=1, cache=Cache(tmp_path / "cache"), only="ablation")
    assert rc == 0
    report = (tmp_path / "gallery" / "REPORT.md").read_text()
    assert (tmp_path / "gallery" / "training_ablation.png").stat().st_size > 10_000
    assert "![ablation](training_ablation.png)" in report and "| +packing |" in report.replace("  ", " ")
