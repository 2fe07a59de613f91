"""One timeline schema for simulated and measured runs, and its Chrome-trace export.

Every run, simulated or real, produces a table with exactly the columns of
``COLUMNS``: which rank, which stream, what op, what kind of op, which layer and
micro-op, start and end (seconds from the run's start), and bytes moved (0 for compute).
Plots, breakdowns, Chrome traces and the sim-vs-real comparison read only this table.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd

from lina_sim.results.files import atomic_write_text

COLUMNS = ("rank", "stream", "op", "kind", "layer", "micro_op", "start", "end", "bytes")
DTYPES = {
    "rank": "int64",
    "stream": "string",
    "op": "string",
    "kind": "string",
    "layer": "int64",
    "micro_op": "int64",
    "start": "float64",
    "end": "float64",
    "bytes": "float64",
}
# Kinds used across the project; free-form kinds are allowed but these get colours.
KINDS = ("compute", "all_to_all", "allreduce", "swap", "idle")


@dataclass(frozen=True, slots=True)
class Event:
    """One op on one rank's stream: [start, end) in seconds, ``bytes`` sent by this rank.

    ``layer`` and ``micro_op`` are -1 where they do not apply.
    """

    rank: int
    stream: str
    op: str
    kind: str
    start: float
    end: float
    layer: int = -1
    micro_op: int = -1
    bytes: float = 0.0


class Timeline:
    """An append-only list of events that becomes the schema's DataFrame."""

    def __init__(self) -> None:
        self._events: list[Event] = []

    def add(self, event: Event) -> None:
        self._events.append(event)

    def extend(self, events: Iterable[Event]) -> None:
        self._events.extend(events)

    def __len__(self) -> int:
        return len(self._events)

    def to_frame(self) -> pd.DataFrame:
        return events_to_frame(self._events)


def events_to_frame(events: Iterable[Event]) -> pd.DataFrame:
    names = [f.name for f in fields(Event)]
    row = operator.attrgetter(*names)  # one C call per event: a 1024-GPU step has ~10^6
    rows = [row(e) for e in events]
    df = pd.DataFrame.from_records(rows, columns=names)
    return df[list(COLUMNS)].astype(DTYPES)


def check_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Check that a table follows the schema (missing columns, end before start)."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"timeline is missing columns {missing}; schema is {list(COLUMNS)}")
    bad = df[df["end"] < df["start"]]
    if len(bad):
        raise ValueError(f"timeline has {len(bad)} events that end before they start")
    return df[list(COLUMNS)].astype(DTYPES)


def to_chrome_trace(df: pd.DataFrame, name: str = "lina-sim") -> dict:
    """Chrome trace-event JSON (opens in Perfetto / chrome://tracing): one process per
    rank, one thread per stream, complete ('X') events in microseconds."""
    df = check_frame(df)
    streams = sorted(df["stream"].unique())
    tid = {s: i for i, s in enumerate(streams)}
    trace: list[dict] = []
    for rank in sorted(df["rank"].unique()):
        trace.append({"name": "process_name", "ph": "M", "pid": int(rank), "args": {"name": f"rank {rank}"}})
        for s in streams:
            trace.append({"name": "thread_name", "ph": "M", "pid": int(rank), "tid": tid[s], "args": {"name": s}})
    for r in df.itertuples(index=False):
        trace.append(
            {
                "name": r.op,
                "cat": r.kind,
                "ph": "X",
                "pid": int(r.rank),
                "tid": tid[r.stream],
                "ts": r.start * 1e6,
                "dur": max(r.end - r.start, 0.0) * 1e6,
                "args": {"layer": int(r.layer), "micro_op": int(r.micro_op), "bytes": float(r.bytes)},
            }
        )
    return {"traceEvents": trace, "displayTimeUnit": "ms", "otherData": {"generator": name}}


def write_chrome_trace(df: pd.DataFrame, path: str | os.PathLike, name: str = "lina-sim") -> Path:
    return atomic_write_text(path, json.dumps(to_chrome_trace(df, name)))
