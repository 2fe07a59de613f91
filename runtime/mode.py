"""What one scenario kind brings to a scenario run (the :class:`Mode` interface), and
what every kind measures alike (the median step or batch over ranks).

A scenario run (``lina-run SCENARIO.yaml``, the ``scenario`` mode of
:mod:`runtime.entry`) has one entry point per side in :mod:`runtime.scenario`, which
looks the scenario's kind up in its registry (``MODES``) and hands the work to that
kind's :class:`Mode`: :class:`runtime.train.TrainingMode` (``kind: training``) or
:class:`runtime.infer.InferenceMode` (``kind: inference``). Every mode does the same four
things, with the same signatures, so the entry points never branch on the kind.
"""

from __future__ import annotations

import abc
import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import pandas as pd

from lina_sim.config.scenario import Scenario
from lina_sim.results.timeline import Event, events_to_frame
from runtime.context import RankContext

# Per (point index, policy label): one measured step or batch as a timeline frame whose
# ``start``/``end`` are seconds from its start.
Timelines = dict[tuple[int, str], pd.DataFrame]


class Mode(abc.ABC):
    """One scenario kind, run for real. ``setups`` are :meth:`resolve`'s, one per point
    of the scenario's sweep; ``results`` are the ranks' :meth:`rank_main` values, by rank;
    ``args`` are the scenario run's arguments (``runtime.context.scenario_args``)."""

    kind: ClassVar[str]  # the scenario's ``kind:`` this mode runs

    @abc.abstractmethod
    def resolve(self, point: Scenario) -> Any:
        """The simulator's setup of one scenario point (the same object ``lina-sim run`` uses)."""

    @abc.abstractmethod
    def rank_main(self, ctx: RankContext, setups: list[Any], args: argparse.Namespace) -> dict:
        """Rank side: run every point's policies on this rank. Returns something picklable
        with ``"kind"`` set to :attr:`kind` (results :meth:`measured_frame` reads)."""

    @abc.abstractmethod
    def measured_frame(self, results: list[dict], setups: list[Any]) -> tuple[pd.DataFrame, Timelines]:
        """Launcher side: the measured results table (one row per point and policy, times
        in s) and the timeline of each policy's median step or batch."""

    @abc.abstractmethod
    def finish(self, results: list[dict], setups: list[Any], args: argparse.Namespace, out: Path) -> int:
        """Launcher side: print the results table, write ``results.csv``, timelines and
        traces under ``out``; returns the exit code."""


# ---------------------------------------------------------------------------------------
# Measured spans (a training step, a served batch) over ranks
# ---------------------------------------------------------------------------------------
class Span(Protocol):
    """One step or batch on one rank: [start, end) on the run's common clock (s), and
    its timeline events."""

    start: float
    end: float
    events: list[Event]


def median_span(per_rank: Sequence[Sequence[Span]], warmup: int = 0) -> tuple[list[float], int]:
    """Each span's time (s; max end - min start over ranks) after the first ``warmup``
    (all of them if none is left), and the index of the span closest to their median."""
    n = len(per_rank[0])
    times = [max(r[i].end for r in per_rank) - min(r[i].start for r in per_rank) for i in range(n)]
    measured = list(range(warmup, n)) or list(range(n))
    med = statistics.median(times[i] for i in measured)
    pick = min(measured, key=lambda i: abs(times[i] - med))
    return [times[i] for i in measured], pick


def span_timeline(per_rank: Sequence[Sequence[Span]], i: int) -> pd.DataFrame:
    """Span ``i`` of every rank as one timeline frame, shifted so that it starts at 0."""
    t0 = min(r[i].start for r in per_rank)
    df = events_to_frame([e for r in per_rank for e in r[i].events])
    df["start"] -= t0
    df["end"] -= t0
    return df
