"""Running a planned sweep: cached points are read back, the rest go to a backend, and
the result is one table with a row per (point, policy)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd

from lina_sim.experiments.sweep.backends import Backend, LocalBackend
from lina_sim.experiments.sweep.cache import Cache
from lina_sim.experiments.sweep.plan import SweepPoint
from lina_sim.experiments.sweep.progress import Progress
from lina_sim.experiments.sweep.worker import Outcome

# Columns that depend on the machine, not on the scenario: left out of equality checks.
WALL_COLUMNS = ("sim_wall_s",)


@dataclass
class SweepResult:
    """The assembled table and what happened (times in seconds)."""

    table: pd.DataFrame
    points: int
    cached: int
    ran: int
    failed: list[tuple[int, str]] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0  # CPU seconds of the points run (all workers)


def _point_rows(
    pt: SweepPoint, frame: pd.DataFrame | None, error: str | None, swept_cols: Sequence[str]
) -> pd.DataFrame:
    if frame is None:
        frame = pd.DataFrame({"policy": list(pt.policies) or [None]})
    frame = frame.copy()
    meta = {"point": pt.index, "scenario": pt.scenario.name, **{c: pt.swept.get(c) for c in swept_cols}}
    for i, (k, v) in enumerate(meta.items()):
        if k in frame.columns:
            frame = frame.drop(columns=k)
        frame.insert(i, k, [v] * len(frame))
    frame["point_key"] = pt.key
    frame["status"] = "ok" if error is None else "error"
    frame["error"] = error
    return frame


def assemble(points: Sequence[SweepPoint], frames: dict[int, pd.DataFrame], errors: dict[int, str]) -> pd.DataFrame:
    """One row per (point, policy), in point order; failed points keep one row per policy."""
    swept_cols = list(dict.fromkeys(k for p in points for k in p.swept))
    parts = [_point_rows(p, frames.get(p.index), errors.get(p.index), swept_cols) for p in points]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def run_sweep(
    points: Sequence[SweepPoint],
    backend: Backend | None = None,
    cache: Cache | None = None,
    progress: Progress | bool = True,
    on_point: Callable[[int, Outcome], None] | None = None,
) -> SweepResult:
    """Run every point not in ``cache`` on ``backend`` (default: local processes) and
    return the assembled table. Points are validated already (see :func:`plan_points`)."""
    t0 = time.perf_counter()
    backend = backend or LocalBackend()
    frames: dict[int, pd.DataFrame] = {}
    errors: dict[int, str] = {}
    todo = []
    for p in points:
        hit = cache.get(p.key) if cache is not None else None
        if hit is None:
            todo.append(p)
        else:
            frames[p.index] = hit
    if not isinstance(progress, Progress):
        progress = Progress(len(points), len(points) - len(todo), enabled=bool(progress))
    if todo:
        progress.show()
    # Identical resolved scenarios in one sweep (e.g. a swept label) run once.
    by_key: dict[str, list[SweepPoint]] = {}
    for p in todo:
        by_key.setdefault(p.key, []).append(p)
    unique = [group[0] for group in by_key.values()]
    key_of = {p.index: p.key for p in unique}
    cpu_s = 0.0
    for index, outcome in backend.run(unique):
        key = key_of[index]
        cpu_s += outcome.cpu_s
        for p in by_key[key]:
            if outcome.error is None:
                frames[p.index] = outcome.frame
            else:
                errors[p.index] = outcome.error
            progress.update(outcome.error is None)
        if outcome.error is None and cache is not None:
            cache.put(key, outcome.frame)  # at once: a killed sweep keeps every finished point
        if on_point:
            on_point(index, outcome)
    progress.show(final=True)
    table = assemble(points, frames, errors)
    return SweepResult(
        table, len(points), len(points) - len(todo), len(todo), sorted(errors.items()), time.perf_counter() - t0, cpu_s
    )


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    """A result table without machine-dependent columns, for equality checks."""
    return df.drop(columns=[c for c in WALL_COLUMNS if c in df.columns])
