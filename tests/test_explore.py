"""Regime maps (`lina-sim explore`): axes and knobs, the grid run through the sweep
machinery (cached, resumable), the figure and Parquet grid, and bad input in one line."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from lina_sim.cli.main import main as cli_main
from lina_sim.errors import ConfigError
from lina_sim.experiments import explore as ex
from lina_sim.experiments.sweep import Cache, LocalBackend, resolve
from lina_sim.training.run import resolve_training

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "scenarios" / "default.yaml"
INFERENCE = REPO / "scenarios" / "paper-inference.yaml"


def _axes(x: str, y: str) -> list[ex.Axis]:
    return [ex.parse_axis(x, "--x"), ex.parse_axis(y, "--y")]


def test_ranges_and_lists():
    ax = ex.parse_axis("inter_node_bw_per_gpu=1e9:1e11:log:3", "--x")
    assert ax.values == pytest.approx((1e9, 1e10, 1e11)) and ax.log and ax.knob is not None
    lin = ex.parse_axis("cluster.nic.bandwidth=1e9:3e9:lin:3", "--y")
    assert lin.values == pytest.approx((1e9, 2e9, 3e9)) and not lin.log and lin.knob is None
    listed = ex.parse_axis("policies[lina].micro_op_mb=10,30,100", "--x")
    assert listed.values == (10, 30, 100)
    cats = ex.parse_axis("model.preset=gpt2-moe,transformer-xl-12", "--z", numeric=False)
    assert cats.values == ("gpt2-moe", "transformer-xl-12")
    with pytest.raises(ConfigError, match="--z skew: 'high' is not a number"):
        ex.parse_axis("skew=1.5,high", "--z", numeric=False)


def test_knobs_set_the_fields_that_realise_them(tmp_path):
    """Each derived knob, applied, resolves to the cluster or model it names."""
    axes = _axes("inter_node_bw_per_gpu=1e9,2e9", "compute_speed=0.5,2")
    plan = ex.plan_map(DEFAULT, axes, "lina", "deepspeed", trace_dir=tmp_path)
    base = resolve_training(plan.points[0].scenario).cluster
    for pt in plan.points:
        c = resolve_training(pt.scenario).cluster
        assert c.nic.bandwidth * c.nics_per_node / c.gpus_per_node == pytest.approx(pt.swept["inter_node_bw_per_gpu"])
        assert c.gpu.flops("fp16") / base.gpu.flops("fp16") == pytest.approx(pt.swept["compute_speed"] / 0.5)
        # Only the two compared policies run, the baseline first.
        assert [p.label for p in resolve_training(pt.scenario).policies] == ["deepspeed", "lina"]
    plan = ex.plan_map(DEFAULT, _axes("grad_bytes=2e8,4e8", "experts_per_gpu=1,2"), "lina", "deepspeed")
    for pt in plan.points:
        m = resolve_training(pt.scenario).model
        assert m.param_counts().non_expert * m.dtype_bytes == pytest.approx(pt.swept["grad_bytes"], rel=1e-3)
        assert pt.swept["grad_bytes_produced"] == m.param_counts().non_expert * m.dtype_bytes
        assert m.experts == 16 * pt.swept["experts_per_gpu"]
    plan = ex.plan_map(DEFAULT, _axes("batch_tokens_per_gpu=512,1024", "compute_speed=1,2"), "lina", "deepspeed")
    assert [resolve_training(p.scenario).model.tokens for p in plan.points[:2]] == [512, 1024]


def test_training_map_runs_cached_and_writes_grid_and_figure(tmp_path):
    axes = _axes("inter_node_bw_per_gpu=1e9,1e10,1e11", "compute_speed=0.5,2")
    plan = ex.plan_map(DEFAULT, axes, "lina", "deepspeed")
    cache = Cache(tmp_path / "cache")
    res = ex.run_map(plan, LocalBackend(1), cache, progress=False)
    g = res.grid
    assert len(g) == 6 and (g["status"] == "ok").all()
    assert g["speedup"].to_numpy() == pytest.approx((g["baseline_step_time_s"] / g["policy_step_time_s"]).to_numpy())
    # The rows are the sweep's: the same points through `lina-sim run`'s path agree.
    assert set(res.sweep.table["policy"]) == {"deepspeed", "lina"}
    labels = {m["label"] for m in plan.markers}
    assert any("paper-testbed" in label and "this scenario" in label for label in labels)
    assert any("dgx-a100" in label for label in labels)
    paths = ex.write_map(res, tmp_path / "map")
    assert [p.name for p in paths] == ["grid.parquet", "markers.csv", "map.png"] and all(p.exists() for p in paths)
    back = pd.read_parquet(paths[0])
    assert list(back["speedup"]) == pytest.approx(list(g["speedup"]))
    again = ex.run_map(plan, LocalBackend(1), cache, progress=False)
    assert again.sweep.ran == 0 and again.sweep.cached == 6
    assert list(again.grid["speedup"]) == pytest.approx(list(g["speedup"]))


def test_third_axis_gives_small_multiples(tmp_path, capsys):
    rc = cli_main(
        [
            "explore",
            str(DEFAULT),
            "--x",
            "inter_node_bw_per_gpu=1e9,1e10",
            "--y",
            "compute_speed=0.5,2",
            "--z",
            "policies[lina].launch=planned,local",
            "--policy",
            "lina",
            "--baseline",
            "deepspeed",
            "--workers",
            "1",
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "## policies[lina].launch = planned" in out and "## policies[lina].launch = local" in out
    g = pd.read_parquet(tmp_path / "out" / "grid.parquet")
    assert len(g) == 8 and set(g["policies[lina].launch"]) == {"planned", "local"}
    assert (tmp_path / "out" / "map.png").stat().st_size > 0


def test_skew_axis_generates_traces_and_reports_the_skew_produced(tmp_path):
    axes = _axes("skew=1.5,4", "batch_tokens_per_gpu=256,512")
    plan = ex.plan_map(INFERENCE, axes, "lina", "static", trace_dir=tmp_path)
    assert len(plan.points) == 4
    for pt in plan.points:
        setup = resolve(pt.scenario)
        assert setup.serving.batching.tokens_per_gpu == pt.swept["batch_tokens_per_gpu"]
        assert pt.swept["skew_produced"] == pytest.approx(pt.swept["skew"], rel=0.05)
        assert Path(setup.serving.trace_paths[0]).parent == tmp_path.resolve()
    # A second plan reuses the generated files (named by content).
    files = sorted(tmp_path.glob("skew-*.npz"))
    assert len(files) == 2
    ex.plan_map(INFERENCE, axes, "lina", "static", trace_dir=tmp_path)
    assert sorted(tmp_path.glob("skew-*.npz")) == files
    # Skew is an inference knob only.
    with pytest.raises(ConfigError, match="--x skew: is not a knob of a training scenario"):
        ex.plan_map(DEFAULT, _axes("skew=1.5,4", "compute_speed=1,2"), "lina", "deepspeed")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--x", "cluster.nic.bandwith=1e9,2e9"], "cluster.nic.bandwith"),
        (["--x", "bogus_knob=1,2"], "--x bogus_knob: unknown field or knob (allowed: a derived knob"),
        (["--x", "inter_node_bw_per_gpu=abc:1e9:log:3"], "--x inter_node_bw_per_gpu: 'abc' is not a finite number"),
        (["--x", "inter_node_bw_per_gpu=1e9,fast"], "--x inter_node_bw_per_gpu: 'fast' is not a number"),
        (["--x", "inter_node_bw_per_gpu=1e9:1e11:log:60", "--y", "compute_speed=0.5:2:log:60"], "at most 2500 points"),
        (["--baseline", "megatron"], "--baseline: policy 'megatron' is not in the scenario (allowed: deepspeed"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, args, expected):
    argv = {
        "--x": "inter_node_bw_per_gpu=1e9,1e10",
        "--y": "compute_speed=0.5,2",
        "--policy": "lina",
        "--baseline": "deepspeed",
    }
    for flag, value in zip(args[::2], args[1::2]):
        argv[flag] = value
    flat = [a for kv in argv.items() for a in kv]
    rc = cli_main(["explore", str(DEFAULT), *flat, "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_over_limit_names_the_limit():
    axes = _axes("inter_node_bw_per_gpu=1e9:1e11:log:60", "compute_speed=0.5:2:log:60")
    with pytest.raises(ConfigError, match=r"60 x 60 = 3600 points is over the limit \(allowed: at most 2500 points\)"):
        ex.plan_map(DEFAULT, axes, "lina", "deepspeed")


def test_knob_values_that_cannot_be_met_name_the_axis():
    with pytest.raises(ConfigError, match="--x experts_per_gpu: 0.3 x 16 GPUs is not a whole number"):
        ex.plan_map(DEFAULT, _axes("experts_per_gpu=0.3,1", "compute_speed=1,2"), "lina", "deepspeed")
    with pytest.raises(ConfigError, match="--x grad_bytes: .* below what this model has"):
        ex.plan_map(DEFAULT, _axes("grad_bytes=10,1e9", "compute_speed=1,2"), "lina", "deepspeed")


@pytest.mark.slow
def test_reproduce_maps_plan_and_draw(tmp_path):
    """The reproduction's training map (quick grid): its points run, and its figure and
    table come from the sweep's rows."""
    from lina_sim.experiments.sweep import run_sweep

    spec = ex.TRAINING_MAP
    points = spec.points(quick=True)
    assert len(points) == 25
    res = run_sweep(points, LocalBackend(2), Cache(tmp_path / "c"), progress=False)
    table = spec.draw(res.table, tmp_path / "m.png")
    assert (tmp_path / "m.png").exists()
    assert len(table) == 5 and len(table.columns) == 6
