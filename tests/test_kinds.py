"""The scenario-kind registry: one entry per kind the loader accepts, the loader's error
for any other, every kind run through the same hooks, and no kind branches elsewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lina_sim.config.scenario import KIND_NAMES, expand
from lina_sim.errors import ConfigError
from lina_sim.experiments.kinds import KINDS, kind_of
from lina_sim.experiments.reproduce import SOURCES
from lina_sim.results.tables import point_title
from lina_sim.routing.generator import RoutingTraceGenerator

ROOT = Path(__file__).resolve().parents[1]
TRAINING = {
    "name": "t",
    "kind": "training",
    "cluster": {"preset": "paper-testbed", "nodes": 1},
    "model": {"preset": "transformer-xl-12", "layers": 2},
    "policies": ["deepspeed", {"name": "lina"}],
}


def _inference(trace: Path) -> dict:
    return {
        "name": "t",
        "kind": "inference",
        "seed": 1,
        "cluster": {"preset": "paper-testbed", "nodes": 1},
        "model": {"preset": "transformer-xl-12", "experts": 4, "top_k": 1},
        "serving": {
            "trace": str(trace),
            "requests": 30,
            "fold_experts": True,
            "arrival": {"process": "poisson", "rate": 20000.0},
            "batching": {"token_budget": 1024, "timeout": 0.0005},
        },
        "policies": ["static", "lina"],
    }


def test_the_registry_holds_exactly_the_loaders_kinds():
    assert tuple(KINDS) == KIND_NAMES
    assert all(kind.name == name for name, kind in KINDS.items())
    assert {s.kind for s in SOURCES} <= set(KINDS)


def test_an_unknown_kind_is_the_loaders_error():
    with pytest.raises(ConfigError) as loaded:
        expand({**TRAINING, "kind": "serving"})
    with pytest.raises(ConfigError) as looked_up:
        kind_of("serving")
    assert str(looked_up.value) == str(loaded.value)
    assert looked_up.value.field == "kind" and all(k in looked_up.value.allowed for k in KIND_NAMES)


@pytest.mark.parametrize("name", list(KIND_NAMES))
def test_every_kind_runs_through_the_same_hooks(name, tmp_path):
    if name == "inference":
        trace = tmp_path / "syn16.npz"
        RoutingTraceGenerator.synthetic(16, 12, top_k=1, zipf_s=1.2, seq_len=64, seed=3).generate(3200, seed=3).save(
            trace
        )
        data = _inference(trace)
    else:
        data = TRAINING
    kind = kind_of(name)
    setup = kind.resolve(expand(data)[0])
    df, runs = kind.run(setup)
    assert (
        list(df["policy"])
        == list(kind.policy_labels(setup))
        == ["static" if name == "inference" else "deepspeed", "lina"]
    )
    assert len(runs) == len(df)
    title = point_title(setup)
    assert kind.table(df, title).startswith(f"# {title}\n")
    assert [label for label, _ in kind.timelines(runs)] == list(df["policy"])
    assert all(len(values) == len(df) for values in kind.sweep_columns(runs).values())


def test_no_kind_branches_outside_the_registry():
    branch = re.compile(r"""(==|!=)\s*\{?\s*["'](""" + "|".join(KIND_NAMES) + r""")["']""")
    hits = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for d in ("lina_sim/cli", "lina_sim/experiments")
        for p in sorted((ROOT / d).rglob("*.py"))
        if p.name != "kinds.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if branch.search(line)
    ]
    assert not hits, "compare a scenario's kind in lina_sim/experiments/kinds.py only:\n" + "\n".join(hits)
