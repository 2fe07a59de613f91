"""Scenarios: sweep expansion, field paths, validation errors that name the field."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lina_sim.config.scenario import expand
from lina_sim.errors import ConfigError
from lina_sim.training.run import resolve_training

BASE = {
    "kind": "training",
    "cluster": {"preset": "paper-testbed", "nodes": 2},
    "model": {"preset": "transformer-xl-12", "layers": 2},
    "policies": ["deepspeed", {"name": "lina"}],
}


def test_grid_and_zip_expansion_with_nested_paths():
    pts = expand(
        {
            **BASE,
            "sweep": {
                "grid": {"cluster.nodes": [1, 2], "model.preset": ["gpt2-moe", "transformer-xl-12"]},
                "zip": {"policies[lina].micro_op_mb": [10, 30], "cluster.nic.bandwidth": [12.5e9, 25e9]},
            },
        }
    )
    assert len(pts) == 2 * 2 * 2
    swept = [p.swept for p in pts]
    assert swept[0] == {
        "cluster.nodes": 1,
        "model.preset": "gpt2-moe",
        "policies[lina].micro_op_mb": 10,
        "cluster.nic.bandwidth": 12.5e9,
    }
    assert {(s["policies[lina].micro_op_mb"], s["cluster.nic.bandwidth"]) for s in swept} == {(10, 12.5e9), (30, 25e9)}
    setup = resolve_training(pts[-1])
    assert setup.cluster.nic.bandwidth == 25e9 and setup.cluster.nodes == 2
    assert setup.policies[1].params == {"micro_op_mb": 30}
    assert BASE["policies"][1] == {"name": "lina"}  # the template is not mutated


@pytest.mark.parametrize(
    "data,field",
    [
        ({**BASE, "clusterr": {}}, "clusterr"),
        ({**BASE, "kind": "serving"}, "kind"),
        ({**BASE, "cluster": {"preset": "dgx-z"}}, "cluster.preset"),
        ({**BASE, "cluster": {"preset": "paper-testbed", "nodes": 0}}, "cluster.nodes"),
        ({**BASE, "model": {"preset": "transformer-xl-12", "experts": 3}}, "model.experts"),
        ({**BASE, "model": {"preset": "transformer-xl-12", "micro_batch": -8}}, "model.micro_batch"),
        ({**BASE, "model": {"preset": "gpt5"}}, "model.preset"),
        ({**BASE, "model": {"preset": "gpt2-moe", "layerz": 3}}, "model.layerz"),
        ({**BASE, "policies": ["deepspeed", "magic"]}, "policies[1].name"),
        ({**BASE, "policies": [{"name": "lina", "micro_op_mb": -1}]}, "policies[lina].micro_op_mb"),
        ({**BASE, "policies": [{"name": "lina", "colour": 1}]}, "policies[lina].colour"),
        ({**BASE, "collectives": {"allreduce": "tree"}}, "collectives.allreduce"),
        ({**BASE, "steps": 0}, "steps"),
    ],
)
def test_bad_fields_are_named(data, field):
    with pytest.raises(ConfigError) as e:
        for p in expand(data):
            resolve_training(p)
    assert str(e.value).startswith(field + ":") or f"{field}:" in str(e.value)
    assert "allowed" in str(e.value) or "must" in str(e.value) or "missing" in str(e.value)


@pytest.mark.parametrize(
    "sweep,field",
    [
        ({"grid": {"cluster.nodes": []}}, "sweep.grid.cluster.nodes"),
        ({"grid": {}}, "sweep"),
        ({"grid": {"clustr.nodes": [1]}}, "sweep.clustr.nodes"),
        ({"zip": {"cluster.nodes": [1, 2], "model.layers": [1]}}, "sweep.zip"),
        ({"grid": {"policies[tutel].pipeline_degree": [2]}}, "sweep.policies[tutel].pipeline_degree"),
        ({"product": {}}, "sweep.product"),
    ],
)
def test_bad_sweeps_are_named(sweep, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        expand({**BASE, "sweep": sweep})


def test_run_command_writes_results(tmp_path):
    sc = tmp_path / "s.yaml"
    sc.write_text(yaml.safe_dump({**BASE, "name": "t", "sweep": {"grid": {"cluster.nodes": [1, 2]}}}))
    r = subprocess.run(
        [sys.executable, "-m", "lina_sim.cli.main", "run", str(sc), "--out", str(tmp_path / "o"), "--trace"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "step(ms)" in r.stdout and "lina" in r.stdout
    df = pd.read_csv(tmp_path / "o" / "results.csv")
    assert len(df) == 4 and set(df["cluster.nodes"]) == {1, 2}
    assert (tmp_path / "o" / "trace-p1-lina.json").exists()


def test_run_command_bad_input_is_one_line(tmp_path):
    sc = tmp_path / "s.yaml"
    sc.write_text(yaml.safe_dump({**BASE, "model": {"preset": "transformer-xl-12", "experts": 5}}))
    r = subprocess.run(
        [sys.executable, "-m", "lina_sim.cli.main", "run", str(sc)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and "model.experts" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(
        [sys.executable, "-m", "lina_sim.cli.main", "run", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "file not found" in r.stderr


def test_profile_and_trace_paths_resolve_beside_the_scenario_from_any_directory(tmp_path, monkeypatch):
    """A scenario's profile (cluster.preset) and traces are found as written from the
    working directory, else beside the scenario file or one level up."""
    from lina_sim.config.scenario import load_yaml
    from lina_sim.serving.setup import resolve_inference

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    for name, resolve in (("testbed-training.yaml", resolve_training), ("testbed-inference.yaml", resolve_inference)):
        path = root / "scenarios" / name
        (sc,) = expand(load_yaml(path), source=str(path))
        assert resolve(sc).cluster.name  # the profile was found from tmp_path
