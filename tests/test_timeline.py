"""The one timeline schema and its Chrome-trace export."""

import json

import pytest

from lina_sim.experiments.microbench import contention
from lina_sim.hardware.spec import load_preset
from lina_sim.results.timeline import COLUMNS, Event, Timeline, check_frame, to_chrome_trace, write_chrome_trace


def test_schema_and_chrome_trace(tmp_path):
    res = contention(load_preset("paper-testbed", nodes=2), 8 << 20, 8 << 20)
    df = res.timeline.to_frame()
    assert tuple(df.columns) == COLUMNS
    assert len(df) == 2 * 8 and set(df["kind"]) == {"all_to_all", "allreduce"}
    path = write_chrome_trace(df, tmp_path / "trace.json")
    trace = json.loads(path.read_text())
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(df)
    assert {e["pid"] for e in xs} == set(range(8))
    assert all(e["dur"] >= 0 for e in xs)
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {"all_to_all", "allreduce"}


def test_bad_timeline_is_rejected():
    tl = Timeline()
    tl.add(Event(0, "compute", "x", "compute", start=2.0, end=1.0))
    with pytest.raises(ValueError, match="end before they start"):
        check_frame(tl.to_frame())
    with pytest.raises(ValueError, match="missing columns"):
        to_chrome_trace(tl.to_frame().drop(columns=["bytes"]))
