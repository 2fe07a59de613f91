"""The scenario kinds: one registry, keyed by a scenario's ``kind`` field, of everything
that differs between a training and an inference scenario.

Whatever runs scenarios (``lina-sim run``, sweeps, ``lina-sim reproduce``) looks a point's
kind up here with :func:`kind_of` and never branches on the kind's name. Adding a kind
is one :class:`ScenarioKind` in :data:`KINDS` and its name in
:data:`lina_sim.config.scenario.KIND_NAMES`: the loader (the lowest layer, which cannot
import this one) validates the ``kind`` field against those names, and this module
refuses to import if the two lists differ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lina_sim.config.scenario import KIND_NAMES, Scenario, check_kind
from lina_sim.results.tables import format_inference_table, format_training_table
from lina_sim.serving.run import run_inference
from lina_sim.serving.server import PolicyServing
from lina_sim.serving.setup import resolve_inference
from lina_sim.training.run import PolicyRun, expected_cpu_s, resolve_training, run_training


def _entry_labels(setup: Any) -> tuple[str, ...]:
    return tuple(p.label for p in setup.policies)


def _no_columns(runs: list) -> dict[str, list]:
    return {}


@dataclass(frozen=True)
class ScenarioKind:
    """What one kind of scenario does, from resolving a point to drawing its figures.

    A *setup* is the kind's resolved, validated scenario (``setup.describe()`` is its
    plain-data description, the sweep cache key; ``setup.policies`` its entries); *runs*
    are the per-policy results of :attr:`run`, in policy order.
    """

    name: str
    resolve: Callable[[Scenario], Any]  # scenario -> setup; raises ConfigError naming the field
    run: Callable[[Any], tuple[pd.DataFrame, list]]  # setup -> (one row per policy, runs)
    table: Callable[[pd.DataFrame, str], str]  # (rows of one point, title) -> the printed table
    timelines: Callable[[list], Iterable[tuple[str, pd.DataFrame]]]  # runs -> (policy label, events) for --trace
    plot_point: Callable[[pd.DataFrame, list, Path, str, str], None]  # (rows, runs, dir, file suffix, title)
    plot_results: Callable[[pd.DataFrame, Path], None]  # (rows of every point, dir): figures across points
    policy_labels: Callable[[Any], tuple[str, ...]] = _entry_labels  # setup -> labels, in row order
    # runs -> extra columns a sweep keeps (one value per policy row) beyond the run's frame.
    sweep_columns: Callable[[list], dict[str, list]] = _no_columns
    # setup -> about how long it takes to simulate on one core (s), for a warning before
    # a long point; None where the kind has no estimate.
    expected_cpu_s: Callable[[Any], float] | None = None
    # Points take long (inference: about a minute each): ``reproduce`` starts them first,
    # so that short points fill the other workers instead of trailing at the end.
    start_first: bool = False
    # Its points may be unplannable on a checkout where input data is missing (e.g.
    # routing traces not recorded yet): ``reproduce`` then skips its experiments.
    optional: bool = False


# ---- training ---------------------------------------------------------------------------
def _training_timelines(runs: list[PolicyRun]) -> Iterator[tuple[str, pd.DataFrame]]:
    return ((r.entry.label, r.result.timeline) for r in runs)


def _training_plot_point(df: pd.DataFrame, runs: list[PolicyRun], out: Path, suffix: str, title: str) -> None:
    from plots.training import breakdown_bars, timeline_figure

    breakdown_bars(df, out / f"breakdown{suffix}.png", title)
    # One timeline figure: Lina's when it ran (the policy the figure is about), else the first.
    last = runs[-1] if len(runs) == 1 else next((r for r in runs if r.entry.name == "lina"), runs[0])
    timeline_figure(
        last.result.timeline, out / f"timeline{suffix}-{last.entry.label}.png", f"{last.entry.label}: {title}"
    )


def _training_plot_results(results: pd.DataFrame, out: Path) -> None:
    if results["experts"].nunique() > 1:
        from plots.training import speedup_vs_experts

        speedup_vs_experts(results, out / "speedup_vs_experts.png")


def _training_sweep_columns(runs: list[PolicyRun]) -> dict[str, list]:
    # Per-collective slowdowns, for distributions (the row keeps only quantiles).
    return {"bwd_a2a_slowdowns": [[float(x) for x in r.a2a_slowdown] for r in runs]}


TRAINING = ScenarioKind(
    name="training",
    resolve=resolve_training,
    run=run_training,
    table=format_training_table,
    timelines=_training_timelines,
    plot_point=_training_plot_point,
    plot_results=_training_plot_results,
    sweep_columns=_training_sweep_columns,
    expected_cpu_s=expected_cpu_s,
)


# ---- inference --------------------------------------------------------------------------
def _inference_timelines(runs: list[PolicyServing]) -> Iterator[tuple[str, pd.DataFrame]]:
    return ((r.entry.label, r.timeline.to_frame()) for r in runs)


def _inference_plot_point(df: pd.DataFrame, runs: list[PolicyServing], out: Path, suffix: str, title: str) -> None:
    from plots.inference import latency_cdf, layer_tail

    latency_cdf(runs, out / f"latency_cdf{suffix}.png", title)
    layer_tail(runs, out / f"a2a_tail_per_layer{suffix}.png", title)


def _inference_plot_results(results: pd.DataFrame, out: Path) -> None:
    from plots.inference import p95_bars

    p95_bars(results, out / "p95_per_policy.png")


INFERENCE = ScenarioKind(
    name="inference",
    resolve=resolve_inference,
    run=run_inference,
    table=format_inference_table,
    timelines=_inference_timelines,
    plot_point=_inference_plot_point,
    plot_results=_inference_plot_results,
    start_first=True,
    optional=True,
)


# ---- the registry -----------------------------------------------------------------------
KINDS: dict[str, ScenarioKind] = {k.name: k for k in (TRAINING, INFERENCE)}

if tuple(KINDS) != tuple(KIND_NAMES):
    # Not an assert: it must hold under ``python -O`` too.
    raise RuntimeError(
        f"scenario kinds registered here {tuple(KINDS)} differ from the loader's "
        f"lina_sim.config.scenario.KIND_NAMES {tuple(KIND_NAMES)}; add the kind to both"
    )


def kind_of(name: str) -> ScenarioKind:
    """The registered kind ``name``; else the loader's error (field ``kind``, allowed values)."""
    check_kind(name)
    return KINDS[name]
