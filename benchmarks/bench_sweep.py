"""Sweep throughput: a 200-point sweep of 16-GPU training scenarios, 4 policies per point,
run with 1 and with 2 local worker processes (no cache), and the speedup.

Points: the paper testbed (4 nodes x 4 A100-40GB), Transformer-XL with 2 to 12 layers (so
a point takes a fraction of a second), over NIC bandwidth x Lina's micro-op size x layers;
policies deepspeed, tutel, lina-partition and lina.

``python benchmarks/bench_sweep.py [--workers 1,2] [--points 200]``
"""

from __future__ import annotations

import argparse
import os
import time

from lina_sim.config.scenario import expand
from lina_sim.experiments.sweep import LocalBackend, plan_points, run_sweep

NIC = [6.25e9, 8e9, 10e9, 12.5e9, 15e9, 20e9, 25e9, 30e9, 40e9, 50e9]  # bytes/s
MICRO_OP_MB = [10, 30, 100, 200]
LAYERS = [2, 4, 6, 8, 12]


def scenario() -> dict:
    """The benchmark sweep: 5 x 4 x 10 = 200 points."""
    grid = {"model.layers": LAYERS, "policies[lina].micro_op_mb": MICRO_OP_MB, "cluster.nic_bandwidth": NIC}
    return {
        "name": "bench-sweep",
        "kind": "training",
        "cluster": {"preset": "paper-testbed", "nodes": 4},
        "model": {"preset": "transformer-xl-12"},
        "policies": ["deepspeed", "tutel", "lina-partition", "lina"],
        "sweep": {"grid": grid},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts to time")
    ap.add_argument("--points", type=int, default=200, help="points to run (the first N of the 200)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    points = plan_points(expand(scenario()))[: args.points]
    plan_s = time.perf_counter() - t0
    print(
        f"# {len(points)} points x 4 policies, 16 GPUs each; planning (resolve + hash every point) "
        f"{plan_s:.2f} s; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    rows = []
    for w in (int(x) for x in args.workers.split(",")):
        res = run_sweep(points, LocalBackend(w), cache=None, progress=False)
        assert not res.failed, res.failed[:3]
        rows.append((w, res.wall_s, res.cpu_s, len(res.table), os.getloadavg()[0]))
        print(f"  ... {w} worker(s): {res.wall_s:.1f} s", flush=True)
    base = rows[0][1]
    # CPU time spent in the points (all workers) over wall time shows how many cores the
    # workers actually got: on a machine shared with other jobs that caps the speedup.
    print(
        "\n| workers | wall (s) | CPU (s) | CPU/wall | points/s | rows | load avg (1 min) | speedup |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for w, wall, cpu, n, load in rows:
        print(
            f"| {w} | {wall:.1f} | {cpu:.1f} | {cpu / wall:.2f} | {len(points) / wall:.2f} | {n} | {load:.1f} | "
            f"{base / wall:.2f}x |"
        )


if __name__ == "__main__":
    main()
