"""Bad input through the real ``lina-sim`` entry point: each one is exit status 2 and one
line ``lina-sim COMMAND: error: FIELD: ...`` naming the field (or file), never a
traceback, a hang or a result. Covers non-finite numbers anywhere a scenario can hold
one (cluster overrides of every preset number, the model, policies, compute profiles,
measured tables), scenario paths that are not YAML text, sizes of 0 and degenerate size
ranges, layouts a collective cannot run on, and a model that does not fit its GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lina_sim.cli.main import main
from lina_sim.hardware.spec import PRESET_DIR

TRAINING = {
    "name": "bad",
    "cluster": {"preset": "paper-testbed", "nodes": 1},
    "model": {"preset": "transformer-xl-12", "layers": 2},
    "policies": ["deepspeed"],
}


def one_line(capsys, argv: list[str], command: str, *needles: str) -> str:
    """``main(argv)`` returns 2 and prints one error line holding every needle."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"lina-sim {command}: error: "), lines[0]
    assert "Traceback" not in captured.err and not captured.out.strip(), captured.out
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def scenario(tmp_path: Path, **over) -> str:
    data = {**TRAINING, **over}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _numbers(block, path: str = ""):
    """(dotted path, value) of every number in a preset mapping."""
    if isinstance(block, dict):
        for k, v in block.items():
            yield from _numbers(v, f"{path}.{k}" if path else str(k))
    elif isinstance(v := block, (int, float)) and not isinstance(v, bool):
        yield path, v


def _nested(path: str, value) -> dict:
    out: dict = value
    for key in reversed(path.split(".")):
        out = {key: out}
    return out


PRESET_NUMBERS = [
    (preset.stem, path)
    for preset in sorted(PRESET_DIR.glob("*.yaml"))
    for path, _ in _numbers(yaml.safe_load(preset.read_text()))
    if not path.startswith(("calibration", "nodes"))  # nodes: set to 1 below
]


@pytest.mark.parametrize("bad", [".nan", "-.inf"])
@pytest.mark.parametrize("preset, path", PRESET_NUMBERS)
def test_every_preset_number_must_be_finite(capsys, tmp_path, preset, path, bad):
    value = yaml.safe_load(bad)
    cluster = {"preset": preset, "nodes": 1, **_nested(path, value)}
    one_line(capsys, ["run", scenario(tmp_path, cluster=cluster)], "run", f"cluster.{path}", "finite")


@pytest.mark.parametrize(
    "over, field",
    [
        ({"model": {"preset": "transformer-xl-12", "capacity_factor": float("nan")}}, "model.capacity_factor"),
        ({"model": {"preset": "transformer-xl-12", "micro_batch": float("inf")}}, "model.micro_batch"),
        ({"policies": [{"name": "lina", "micro_op_mb": float("nan")}]}, "policies[lina].micro_op_mb"),
        ({"steps": float("nan")}, "steps"),
    ],
)
def test_scenario_numbers_must_be_finite(capsys, tmp_path, over, field):
    one_line(capsys, ["run", scenario(tmp_path, **over)], "run", field, "finite")


def test_profile_numbers_must_be_finite(capsys, tmp_path):
    prof = tmp_path / "p.csv"
    prof.write_text("op,shape,tokens,seconds\nffn.fwd,,100,nan\n")
    path = scenario(tmp_path, compute={"model": "profile", "profile": str(prof)})
    one_line(capsys, ["run", path], "run", "rows[0].seconds", "finite")


def test_measured_times_must_be_finite(capsys, tmp_path):
    table = tmp_path / "m.csv"
    table.write_text("collective,size_bytes,ranks,ranks_per_node,nodes,time_s\nallreduce,1024,8,8,1,inf\n")
    one_line(capsys, ["collective", "--compare", str(table)], "collective", "time_s", "finite")


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00"), "not a text file"),
        (lambda p: p.write_bytes(b"name: x\x00\n"), "not a text file"),
    ],
    ids=["directory", "binary", "nul-byte"],
)
def test_a_scenario_path_that_is_not_yaml_text(capsys, tmp_path, make, needle):
    path = tmp_path / "s.yaml"
    make(path)
    one_line(capsys, ["run", str(path)], "run", str(path), needle)


@pytest.mark.parametrize(
    "sizes, needle",
    [
        ("0", "from 1 B"),
        ("0:1M", "from 1 B"),
        ("0.4", "from 1 B"),
        ("1M:1M", "gives one size"),
        ("1K:2K:4", "gives one size"),
        ("1K:1G:nan", "factor must be a number > 1"),
    ],
)
def test_collective_sizes_of_zero_and_degenerate_ranges(capsys, sizes, needle):
    one_line(capsys, ["collective", "--op", "allreduce", "--sizes", sizes], "collective", "--sizes", needle)


def test_contention_size_of_zero(capsys):
    one_line(capsys, ["contention", "--size", "0"], "contention", "--size", "from 1 B")


@pytest.mark.parametrize(
    "cluster, collectives, field",
    [
        # 3 GPUs per node: the expert-parallel group of 4 ranks spans nodes 3 + 1.
        ({"preset": "paper-testbed", "gpus_per_node": 3}, {"all_to_all": "hierarchical"}, "collectives.all_to_all"),
        # 3 GPUs per node, 2 nodes: the replicas of an expert (stride 2) sit 2 + 1 on the nodes.
        ({"preset": "paper-testbed", "nodes": 2, "gpus_per_node": 3}, {"algo": "hierarchical"}, "collectives.algo"),
    ],
)
def test_a_layout_the_collective_cannot_run_on_fails_at_validation(capsys, tmp_path, cluster, collectives, field):
    path = scenario(tmp_path, cluster=cluster, collectives=collectives)
    out = tmp_path / "out"
    line = one_line(capsys, ["run", path, "--out", str(out)], "run", field, "per node", "allowed: ")
    assert "direct" in line or "flat-ring" in line  # what runs here instead
    assert not out.exists()  # refused before anything ran or was written


def test_a_model_too_large_for_the_gpu(capsys, tmp_path):
    model = {"preset": "transformer-xl-12", "layers": 2, "micro_batch": 1e8}
    one_line(capsys, ["run", scenario(tmp_path, model=model)], "run", "model.micro_batch", "check_memory: false")


def test_one_line_from_a_subprocess_too(tmp_path):
    """The installed entry point (a fresh interpreter) says the same one line."""
    path = scenario(tmp_path, cluster={"preset": "paper-testbed", "nic": {"latency": float("nan")}})
    r = subprocess.run(
        [sys.executable, "-m", "lina_sim.cli.main", "run", path], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "lina-sim run: error: cluster.nic.latency: must be a finite number, got nan (allowed: a number >= 0)"
    ]
