"""The ``scenario`` mode of :mod:`runtime.entry`: a scenario file's policies, run for real.

``lina-run SCENARIO.yaml [ARGS]`` runs this mode with ARGS = [SCENARIO, ...]. It has one
entry point per side, whatever the scenario's kind:

- :func:`rank_main` (every rank): load and resolve the scenario's points, check the
  launch has the scenario's shape, run the points;
- :func:`finish` (the launcher, once): print the results table, write ``results.csv``,
  timelines and traces;
- :func:`measured_frame` (validation): the ranks' results as a results table.

Each looks the scenario's kind up in :data:`MODES`, the one registry of scenario kinds
(a :class:`runtime.mode.Mode` each), and hands over to that mode.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lina_sim.config.scenario import Scenario, load_scenarios
from lina_sim.errors import ConfigError, LinaSimError
from lina_sim.hardware.spec import ClusterSpec
from runtime.context import RankContext, scenario_args
from runtime.dist import DistInfo, check_world_size
from runtime.infer import InferenceMode
from runtime.mode import Mode, Timelines
from runtime.train import TrainingMode

MODES: dict[str, Mode] = {mode.kind: mode for mode in (TrainingMode(), InferenceMode())}


def mode_of(points: Sequence[Scenario]) -> Mode:
    """The mode that runs a scenario's points (its kind, one for all points)."""
    kind = points[0].kind
    if kind not in MODES:
        raise ConfigError("kind", f"the runtime cannot run {kind!r} scenarios", sorted(MODES))
    return MODES[kind]


def _resolved(path: str) -> tuple[list[Scenario], Mode, list[Any]]:
    """A scenario file's points, the mode that runs them, and each point's setup."""
    points = load_scenarios(path)
    mode = mode_of(points)
    return points, mode, [mode.resolve(p) for p in points]


def _mode_named(kind: str) -> Mode:
    if kind not in MODES:
        raise LinaSimError(
            f"results of kind {kind!r} are not a measured scenario run; allowed: {', '.join(sorted(MODES))}"
        )
    return MODES[kind]


def check_launch(info: DistInfo, cluster: ClusterSpec) -> None:
    """The launch must have the scenario's shape: world size and ranks per node."""
    check_world_size(
        info.world_size,
        cluster.world_size,
        f"the scenario's cluster ({cluster.nodes} nodes x {cluster.gpus_per_node} GPUs, field cluster)",
    )
    if info.local_world_size != cluster.gpus_per_node:
        raise ConfigError(
            "cluster.gpus_per_node",
            f"the scenario has {cluster.gpus_per_node} per node, the launch {info.local_world_size} ranks per node",
        )


def rank_main(ctx: RankContext) -> dict:
    """``runtime.entry`` mode ``scenario``, rank side: every policy of every point."""
    sys.setswitchinterval(5e-4)  # hand the GIL to the scheduler thread promptly
    a = scenario_args(ctx.args)
    _, mode, setups = _resolved(a.scenario)
    for setup in setups:
        check_launch(ctx.info, setup.cluster)
    return mode.rank_main(ctx, setups, a)


def measured_frame(results: list[dict], setups: list[Any]) -> tuple[pd.DataFrame, Timelines]:
    """The ranks' results of a scenario run as a results table (one row per point and
    policy) and the timeline of each policy's median step or batch."""
    return _mode_named(results[0]["kind"]).measured_frame(results, setups)


def finish(results: list[dict], args: list[str]) -> int:
    """``runtime.entry`` mode ``scenario``, launcher side: print the results table and
    write ``results.csv``, timelines and traces to ``--out`` (default
    ``results/<name>-measured``)."""
    a = scenario_args(args)
    points, mode, setups = _resolved(a.scenario)
    out = Path(a.out or Path("results") / f"{points[0].name}-measured")
    return mode.finish(results, setups, a, out)
