"""Regime maps and the tuner: a 15 x 15 training map of the paper-testbed scenario
(``scenarios/default.yaml``: 16 A100s, Transformer-XL-12, lina against deepspeed over
inter-node bandwidth per GPU x compute speed) from a cold cache and again from the warm
one, and ``tune`` over Lina's knobs (90 settings) of the same 16-GPU scenario.

Targets (issue 16): the cold map <= 10 minutes on 2 cores, the warm one seconds; tune
over >= 40 settings <= 2 minutes. CPU seconds (the workers' and this process's) are
printed beside wall time, since the machine may be shared.

``python benchmarks/bench_explore.py [--workers 2] [--side 15]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from lina_sim.experiments import explore as ex
from lina_sim.experiments import tune as tn
from lina_sim.experiments.sweep import Cache, LocalBackend

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "default.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="local worker processes")
    ap.add_argument("--side", type=int, default=15, help="values per map axis")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Cache(Path(tmp) / "points")
        axes = [
            ex.parse_axis(f"inter_node_bw_per_gpu=5e8:5e10:log:{args.side}", "--x"),
            ex.parse_axis(f"compute_speed=0.25:8:log:{args.side}", "--y"),
        ]
        for label in ("map, cold cache", "map, warm cache"):
            t0, c0 = time.perf_counter(), time.process_time()
            plan = ex.plan_map(SCENARIO, axes, "lina", "deepspeed", trace_dir=Path(tmp) / "traces")
            res = ex.run_map(plan, LocalBackend(args.workers), cache, progress=False)
            ex.write_map(res, Path(tmp) / "map")
            wall, own = time.perf_counter() - t0, time.process_time() - c0
            assert not res.sweep.failed, res.sweep.failed[:3]
            rows.append((label, len(plan.points), res.sweep.ran, wall, res.sweep.cpu_s + own))
            print(f"  ... {label}: {wall:.1f} s", flush=True)
        s = res.grid["speedup"]
        print(f"  ... {ex.summary(res).lstrip('# ')}")
        t0, c0 = time.perf_counter(), time.process_time()
        plan = tn.plan_tune(SCENARIO)
        tr = tn.run_tune(plan, LocalBackend(args.workers), Cache(Path(tmp) / "tune"), progress=False)
        wall, own = time.perf_counter() - t0, time.process_time() - c0
        rows.append(("tune, cold cache", len(plan.settings), tr.sweep.ran, wall, tr.sweep.cpu_s + own))
        print(tn.format_result(tr, top=3))
    print(
        f"\n{os.cpu_count()} CPUs, {args.workers} workers, load average {os.getloadavg()[0]:.1f}; "
        f"speedup range {s.min():.3f}-{s.max():.3f}x\n"
        "\n| run | points (settings) | simulated | wall (s) | CPU (s) |\n|---|---:|---:|---:|---:|"
    )
    for label, n, ran, wall, cpu in rows:
        print(f"| {label} | {n} | {ran} | {wall:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
