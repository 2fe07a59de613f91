"""`lina-sim tune`: Lina's knobs searched with the simulator, the best setting written as
a scenario `lina-sim validate` measures, and (slow, root) that check on the testbed."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lina_sim.cli.main import main as cli_main
from lina_sim.config.scenario import load_scenarios
from lina_sim.errors import ConfigError
from lina_sim.experiments import tune as tn
from lina_sim.experiments.sweep import Cache, LocalBackend
from lina_sim.training.run import resolve_training
from tests._netns import needs_netns, no_leftovers  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "scenarios" / "default.yaml"
TESTBED = REPO / "scenarios" / "testbed-training.yaml"
CHECK = REPO / "scenarios" / "testbed-tune.yaml"


def test_search_space_of_a_16_gpu_scenario_has_at_least_40_settings():
    plan = tn.plan_tune(DEFAULT)
    assert len(plan.settings) >= 40
    assert len(plan.points) == len(plan.settings) + 1  # and the scenario's own lina first
    knobs = pd.DataFrame([s.__dict__ for s in plan.settings])
    assert sorted(knobs["pipeline_degree"].unique()) == [1, 2, 4]
    assert set(knobs["launch"]) == {"planned", "local"}
    assert sorted(knobs["micro_op_mb"].unique()) == [7.5, 15.0, 30.0, 60.0, 120.0]
    assert set(zip(knobs["packing"], knobs["max_experts_per_device"])) == {("off", 1), ("cost", 2), ("cost", 4)}


def test_tune_ranks_settings_by_simulated_step(tmp_path, monkeypatch):
    # A smaller space keeps the test fast; the full one is the benchmark's.
    monkeypatch.setattr(tn, "MICRO_OP_FACTORS", (0.25, 1.0))
    monkeypatch.setattr(tn, "PIPELINE_DEGREES", (1, 2))
    plan = tn.plan_tune(DEFAULT)
    res = tn.run_tune(plan, LocalBackend(1), Cache(tmp_path / "c"), progress=False)
    t = res.table
    assert len(t) == len(plan.settings) == 2 * 2 * 3 * 2
    assert list(t["step_time_s"]) == sorted(t["step_time_s"])
    assert res.best.step_time_s <= res.default_step_s * (1 + 1e-9)  # the default's knobs are in the space
    assert res.runner_up is not None and res.runner_up.step_time_s > res.best.step_time_s
    # Packing off runs one expert per device.
    off = t[t["packing"] == "off"]
    assert (off["experts_per_device_run"] == 1).all()
    text = tn.format_result(res)
    assert "# best: " in text and "# runner-up: " in text and "ms predicted" in text
    # The check scenario: the default and the tuned setting, resolvable from anywhere.
    path = tn.check_scenario(res, tmp_path / "tuned.yaml", steps=4)
    data = yaml.safe_load(path.read_text())
    assert [p["label"] for p in data["policies"]] == [tn.DEFAULT_LABEL, tn.TUNED_LABEL]
    assert data["steps"] == 4
    setup = resolve_training(load_scenarios(path)[0])
    tuned = setup.policies[1].params
    best = res.setting(res.best)
    assert tuned["micro_op_mb"] == best.micro_op_mb and tuned["launch"] == best.launch


def test_cli_tune(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tn, "MICRO_OP_FACTORS", (1.0,))
    monkeypatch.setattr(tn, "LAUNCHES", ("planned",))
    argv = ["tune", str(TESTBED), "--workers", "1", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")]
    assert cli_main([*argv, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "# best: " in out and "# default (the scenario's lina)" in out
    assert (tmp_path / "o" / "tune.parquet").exists() and (tmp_path / "o" / "tuned.yaml").exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([str(REPO / "scenarios" / "paper-inference.yaml")], "kind: tune searches a training scenario's Lina knobs"),
        ([str(DEFAULT), "--policy", "lina-nopack"], "--policy: no lina policy labelled 'lina-nopack'"),
        ([str(DEFAULT), "--top", "0"], "--top: must be >= 1"),
        ([str(DEFAULT), "--set", "model.experts=5"], "model.experts"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, argv, expected):
    rc = cli_main(["tune", *argv, "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_check_report_reads_validation_table(tmp_path):
    """The verdict of a check from a validation table as `lina-sim validate` writes it."""
    rows = pd.DataFrame(
        {
            "point": [0, 0],
            "policy": [tn.DEFAULT_LABEL, tn.TUNED_LABEL],
            "step_time_s_pred": [0.60, 0.50],
            "step_time_s_meas": [0.62, 0.55],
            "step_time_std_s": [0.02, 0.03],
            "steps": [9, 9],
        }
    )
    rows.to_csv(tmp_path / "validation.csv", index=False)
    rep = tn.check_report(tmp_path / "validation.csv")
    assert rep.gain == pytest.approx(0.62 / 0.55)
    assert rep.diff_se_s == pytest.approx(math.hypot(0.02 / 3, 0.03 / 3))
    assert rep.resolved
    assert "measured faster: 1.127x the default" in rep.format()
    rows.loc[1, "step_time_s_meas"] = 0.615
    rows.to_csv(tmp_path / "validation.csv", index=False)
    assert "not resolved" in tn.check_report(tmp_path / "validation.csv").format()
    with pytest.raises(ConfigError, match="no row for policy 'lina-tuned'"):
        rows[rows["policy"] != tn.TUNED_LABEL].to_csv(tmp_path / "v2.csv", index=False)
        tn.check_report(tmp_path / "v2.csv")


@pytest.mark.slow
@pytest.mark.netns
@needs_netns
@pytest.mark.usefixtures("no_leftovers")
def test_tune_check_on_the_emulated_testbed(tmp_path, capsys):
    """The tuned setting of the check scenario against its default (micro-ops 8x too
    small), measured on a 2x2 testbed at 4 Gbit/s, interleaved step by step (lina-sim
    validate): the simulator predicts a gain well above the testbed's noise, and the
    measurement must show the tuned setting faster, resolved at 2 standard errors."""
    argv = ["tune", str(CHECK), "--check", "--testbed", "2x2", "--nic", "4gbit", "--steps", "16"]
    rc = cli_main([*argv, "--quiet", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), "--timeout", "900"])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0, out
    rep = tn.check_report(tmp_path / "o" / "validate" / "validation.csv")
    assert rep.steps >= 16 and rep.default_s > 0 and rep.tuned_s > 0
    assert "# tuned setting measured faster" in out
    assert rep.gain > 1 and rep.resolved, rep.format()
