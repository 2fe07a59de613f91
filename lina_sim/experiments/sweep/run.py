"""Running a planned sweep: cached points are read back, the rest go to a backend, and
the result is one table with a row per (point, policy)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from contextlib import closing
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


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep, after the running points were abandoned.

    A KeyboardInterrupt, so a caller that does not know it still stops. ``finished``
    points (``ran`` of them run here, the rest read from the cache) of ``total`` are
    in the cache when ``kept``, so the same command run again resumes after them.
    """

    def __init__(self, finished: int, ran: int, total: int, kept: bool):
        self.finished, self.ran, self.total, self.kept = finished, ran, total, kept
        super().__init__(f"{finished} of {total} points finished")

    def summary(self, cache_dir: str | os.PathLike | None = None) -> str:
        """One line: what finished, where it is kept and how to resume."""
        head = f"interrupted: {self.finished} of {self.total} points finished ({self.ran} in this run)"
        if not self.kept:
            return head + "; not kept (no cache), so a re-run starts over"
        where = f" {cache_dir}" if cache_dir else ""
        return head + f", kept in the cache{where}; run the same command again to resume"


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
    ran = 0
    try:
        # closing(): if this loop stops early (Ctrl-C while writing the cache), the
        # backend's generator is closed now, and abandons its running points at once.
        with closing(backend.run(unique)) as outcomes:
            for index, outcome in outcomes:
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
                if outcome.error is None:
                    ran += len(by_key[key])
                if on_point:
                    on_point(index, outcome)
    except KeyboardInterrupt:
        cached = len(points) - len(todo)
        raise SweepInterrupted(cached + ran, ran, len(points), kept=cache is not None) from None
    finally:
        progress.close()  # the bar stays as it stood; what the caller prints goes below it
    table = assemble(points, frames, errors)
    return SweepResult(
        table, len(points), len(points) - len(todo), len(todo), sorted(errors.items()), time.perf_counter() - t0, cpu_s
    )


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    """A result table without machine-dependent columns, for equality checks."""
    return df.drop(columns=[c for c in WALL_COLUMNS if c in df.columns])
