"""lina-sim validate: the comparison, the profile refinement, bad input, and (slow) a
whole validation on the testbed."""

from __future__ import annotations

import shutil
import subprocess

import pandas as pd
import pytest
import yaml

from lina_sim.hardware.spec import load_preset
from lina_sim.results.tables import format_validation_table as format_table
from runtime.calibrate import raw_path
from runtime.compare import compare, op_classes, ranking, resolved_pairs
from runtime.testbed_profile import refine_profile, resolved_scenario
from tests._netns import PY, ROOT, needs_netns

PROFILE = ROOT / "scenarios/profiles/testbed-2x2-400mbit.yaml"


def _frame(times, **extra):
    n = len(times)
    return pd.DataFrame(
        {
            "point": [0] * n,
            "policy": [f"p{i}" for i in range(n)],
            "step_time_s": times,
            "compute_s": 0.1,
            "exposed_a2a_s": 0.1,
            "exposed_allreduce_s": 0.1,
            "idle_s": 0.0,
            "experts_per_device": 1,
            "pipeline_degree": 1,
            **extra,
        }
    )


def test_compare_errors_and_ranking():
    pred = _frame([1.0, 2.0, 3.0])
    meas = _frame(
        [1.25, 1.9, 3.3],
        step_time_min_s=1.0,
        step_time_max_s=4.0,
        sched_busy_frac=0.01,
        handoff_median_s=1e-4,
        handoff_total_s=1e-3,
        step_time_std_s=0.1,
        steps=4,
    )
    j = compare(pred, meas)
    assert j["error_pct"].round(1).tolist() == [-20.0, 5.3, -9.1]
    assert j["ranking_match"].all() and (j["pairs_resolved"] == 3).all() and (j["pairs_agree"] == 3).all()
    assert "median |error| 9.1%" in format_table(j, "t") and "ordered alike: 3/3" in format_table(j, "t")
    meas.loc[0, "step_time_s"] = 2.5  # now p1 is fastest for real
    j = compare(pred, meas)
    assert not j["ranking_match"].any() and (j["pairs_agree"] == 2).all()  # p0-p1 swapped
    assert ranking([3.0, 1.0, 2.0]) == [1, 2, 0]


def test_pairs_closer_than_the_noise_are_not_resolved():
    # p0 and p1 are 0.05 s apart with 0.1 s spread over 4 steps (s.e. of the difference
    # 0.07 s): a tie the measurement cannot order, whatever the prediction says.
    assert resolved_pairs([2.0, 1.0, 3.0], [1.0, 1.05, 2.0], [0.1, 0.1, 0.1], [4, 4, 4]) == (2, 2)
    assert resolved_pairs([2.0, 1.0, 3.0], [1.0, 1.05, 2.0], [0.0, 0.0, 0.0], [4, 4, 4]) == (2, 3)


def test_op_classes_skew_and_transfer():
    tl = pd.DataFrame(
        {
            "rank": [0, 1, 0, 1],
            "stream": ["a2a", "a2a", "compute", "compute"],
            "op": ["L0.fwd.dispatch.c0"] * 2 + ["L0.fwd.attn", "L0.bwd.attn"],
            "kind": ["all_to_all", "all_to_all", "compute", "compute"],
            "start": [0.0, 0.2, 0.0, 0.5],
            "end": [0.5, 0.5, 0.1, 0.6],
        }
    )
    c = op_classes(tl, ep_size=2)
    assert c["a2a skew"] == pytest.approx(0.2) and c["a2a xfer"] == pytest.approx(0.3)
    assert c["a2a fwd"] == pytest.approx(0.4) and c["compute fwd"] == pytest.approx(0.05)
    assert c["compute bwd+opt"] == pytest.approx(0.05) and c["step"] == pytest.approx(0.6)


def test_refine_profile_fits_links_from_collectives(tmp_path):
    src = tmp_path / "p.yaml"
    shutil.copy(PROFILE, src)
    shutil.copy(raw_path(PROFILE), raw_path(src))
    out, eff, lat = refine_profile(src, tmp_path / "refined.yaml")
    spec = load_preset(str(out))
    assert 0.3 < eff <= 1.0 and spec.nic.efficiency == pytest.approx(eff)
    assert spec.nic.latency == spec.nvlink.latency == pytest.approx(lat) and lat > 0
    assert "fitted nic.efficiency" in yaml.safe_load(out.read_text())["source"]
    # The latency comes from the collectives alone: a stalled ping-pong (2 ms at 4 KB in
    # every repetition of a run) in the link's own fit does not raise it.
    data = yaml.safe_load(src.read_text())
    data["nic"]["latency"] = data["nvlink"]["latency"] = 2e-3
    src.write_text(yaml.safe_dump(data))
    _, _, lat_stalled = refine_profile(src, tmp_path / "stalled.yaml")
    assert lat_stalled == pytest.approx(lat, rel=0.2) and lat_stalled < 1e-3


def test_link_efficiency_is_fitted_at_the_workloads_sizes(tmp_path):
    from runtime.testbed_profile import _covering, training_collective_bytes

    rows = [{"bytes": b} for b in (65536, 262144, 1048576, 4194304)]
    assert _covering(rows, 200_000)["bytes"] == 262144 and _covering(rows, 262144)["bytes"] == 262144
    assert _covering(rows, 9e9)["bytes"] == _covering(rows, None)["bytes"] == 4194304
    src = tmp_path / "p.yaml"
    shutil.copy(PROFILE, src)
    shutil.copy(raw_path(PROFILE), raw_path(src))
    _, eff_small, _ = refine_profile(src, tmp_path / "small.yaml", 262144)
    _, eff_big, _ = refine_profile(src, tmp_path / "big.yaml")
    assert 0.3 < eff_small <= 1.0 and 0.3 < eff_big <= 1.0 and eff_small != eff_big

    from lina_sim.config.scenario import load_scenarios
    from lina_sim.training.run import resolve_training

    setup = resolve_training(load_scenarios(ROOT / "scenarios/testbed-training.yaml")[0])
    # deepspeed's 1 MB buckets are the largest; a 256-token fp32 all-to-all is 0.5 MB per rank.
    assert 0.9e6 < training_collective_bytes(setup) < 1.2e6


def test_resolved_scenario_points_at_the_profile(tmp_path):
    out = resolved_scenario(
        ROOT / "scenarios/testbed-inference.yaml", PROFILE, tmp_path / "c.yaml", tmp_path / "s.yaml"
    )
    d = yaml.safe_load(out.read_text())
    assert d["cluster"]["preset"] == str(PROFILE.resolve())
    assert d["compute"] == {"model": "profile", "profile": str((tmp_path / "c.yaml").resolve())}
    assert d["serving"]["trace"] == str((ROOT / "scenarios/data/testbed-l4-e4.npz").resolve())


def test_shipped_scenarios_resolve():
    from lina_sim.config.scenario import load_scenarios
    from lina_sim.serving.setup import resolve_inference
    from lina_sim.training.run import resolve_training

    setup = resolve_training(load_scenarios(ROOT / "scenarios/testbed-training.yaml")[0])
    assert setup.cluster.world_size == 4 and setup.model.dtype == "fp32"
    assert resolve_inference(load_scenarios(ROOT / "scenarios/testbed-inference.yaml")[0]).cluster.nodes == 2


def test_validate_bad_profile_is_one_line(tmp_path):
    p = subprocess.run(
        [
            PY,
            "-m",
            "lina_sim.cli.main",
            "validate",
            "scenarios/testbed-training.yaml",
            "--profile",
            str(tmp_path / "missing.yaml"),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "--profile" in p.stderr, p.stderr


@pytest.mark.slow
@needs_netns
def test_validate_training_on_the_testbed(tmp_path):
    """The whole loop with a fresh calibration: a table for every policy and figures."""
    out = tmp_path / "v"
    p = subprocess.run(
        [
            PY,
            "-m",
            "lina_sim.cli.main",
            "validate",
            "scenarios/testbed-training.yaml",
            "--steps",
            "2",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    j = pd.read_csv(out / "validation.csv")
    assert len(j) == 4 and (j["step_time_s_meas"] > 0).all() and j["error_pct"].notna().all()
    assert (out / "validation.png").exists() and (out / "compute-profile.yaml").exists()
    assert "median |error|" in p.stdout


@pytest.mark.slow
@needs_netns
def test_validate_inference_on_the_testbed(tmp_path):
    out = tmp_path / "v"
    p = subprocess.run(
        [
            PY,
            "-m",
            "lina_sim.cli.main",
            "validate",
            "scenarios/testbed-inference.yaml",
            "--profile",
            str(PROFILE),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    j = pd.read_csv(out / "validation.csv")
    assert list(j["policy"]) == ["static", "lina", "ideal"] and (j["batch_time_mean_s_meas"] > 0).all()
