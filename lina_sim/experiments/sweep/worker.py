"""Running one sweep point, in whatever process a backend chose: the point's frame, or
its error recorded instead of raised.

Kept apart from :mod:`~lina_sim.experiments.sweep.run` because the backends call it and
``run_sweep`` calls the backends. Worker processes preload this module (see
:class:`~lina_sim.experiments.sweep.backends.LocalBackend`), and through the kind
registry it imports every kind's simulator.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lina_sim.config.scenario import Scenario
from lina_sim.experiments.kinds import kind_of


def execute_point(scenario: Scenario) -> pd.DataFrame:
    """Simulate one point; the frame holds only what its resolved scenario determines
    (no scenario name, no swept columns), one row per policy."""
    kind = kind_of(scenario.kind)
    df, runs = kind.run(kind.resolve(scenario))
    for column, values in kind.sweep_columns(runs).items():
        df[column] = values
    drop = [c for c in ("scenario", "point", *scenario.swept) if c in df.columns]
    return df.drop(columns=drop).reset_index(drop=True)


@dataclass
class Outcome:
    """What a worker sends back for one point."""

    frame: pd.DataFrame | None
    error: str | None
    wall_s: float
    cpu_s: float = 0.0  # CPU seconds the worker spent on the point


def execute_safely(scenario: Scenario) -> Outcome:
    """:func:`execute_point`, with any exception turned into a recorded error."""
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        frame, error = execute_point(scenario), None
    except Exception as e:  # noqa: BLE001 - a failing point must not stop the sweep
        where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        loc = f" [{Path(where.filename).name}:{where.lineno}]" if where else ""
        frame, error = None, f"{type(e).__name__}: {e}{loc}"
    return Outcome(frame, error, time.perf_counter() - t0, time.process_time() - c0)
