"""Simulator speed for inference serving.

Serves 10,000 requests on 16 GPUs (``paper-testbed``, 4 nodes, 16 experts, the 16-GPU
point of ``scenarios/paper-inference.yaml``) with every placement policy, and prints the
simulator's wall time per policy: the placement protocol and batch bookkeeping of that
policy plus its share of the vectorised all-to-all timing (the runner advances all
policies in lockstep and times every all-to-all of a step in one call).

The trace is whichever of the scenario's recorded traces ``traces/`` has, else a
synthetic 16-expert trace (``--synthetic`` forces it). Pinned to one core.

``python benchmarks/bench_serving.py [--requests N] [--synthetic]``
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

from lina_sim.config.scenario import Scenario, load_yaml
from lina_sim.network.serving_a2a import AllToAllTimer
from lina_sim.serving.run import serve_policies
from lina_sim.serving.setup import resolve_inference

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "paper-inference.yaml"


def setup_for(requests: int, synthetic: bool, tmp: Path):
    data = load_yaml(SCENARIO)
    data.pop("sweep", None)
    data["cluster"]["nodes"] = 4
    data["model"]["experts"] = 16
    data["serving"].update(requests=requests, timeline_batches=0)
    data["serving"]["batching"]["token_budget"] = 8192
    root = SCENARIO.parents[1]
    traces = [str(root / p) for p in data["serving"]["trace"] if (root / p).exists()]
    if synthetic or not traces:
        from lina_sim.routing.generator import RoutingTraceGenerator

        path = tmp / "synthetic16.npz"
        RoutingTraceGenerator.synthetic(16, 12, top_k=1, zipf_s=1.0, affinity=0.6, seq_len=128, seed=0).generate(
            100_000, seed=0
        ).save(path)
        traces = [str(path)]
    data["serving"]["trace"] = traces
    return resolve_inference(Scenario(copy.deepcopy(data), {}, str(SCENARIO))), traces


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--synthetic", action="store_true", help="use a synthetic trace even if recorded ones exist")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    with tempfile.TemporaryDirectory() as tmp:
        setup, traces = setup_for(args.requests, args.synthetic, Path(tmp))
        # Count the all-to-all timer's own work separately.
        spent = {"a2a": 0.0, "matrices": 0}
        real = AllToAllTimer.times

        def timed(self, m):
            t0 = time.perf_counter()
            out = real(self, m)
            spent["a2a"] += time.perf_counter() - t0
            spent["matrices"] += len(m)
            return out

        AllToAllTimer.times = timed
        t0 = time.perf_counter()
        runs = serve_policies(setup)
        total = time.perf_counter() - t0
        AllToAllTimer.times = real
    print(
        f"# serving {args.requests} requests on {setup.cluster.world_size} GPUs ({setup.cluster.name}), "
        f"{setup.model.experts} experts, trace {', '.join(Path(t).name for t in traces)}"
    )
    print(f"  {'policy':<17} {'wall (s)':>9} {'batches':>8} {'sim p95 (ms)':>13}")
    for run in runs:
        lat = sorted(r.latency for r in run.requests)
        p95 = lat[int(0.95 * (len(lat) - 1))]
        print(f"  {run.entry.label:<17} {run.wall_s:>9.2f} {len(run.batches):>8d} {p95 * 1e3:>13.2f}")
    print(
        f"  {'total':<17} {total:>9.2f}   (all-to-all timing: {spent['a2a']:.2f} s for "
        f"{spent['matrices']} all-to-alls, one core)"
    )


if __name__ == "__main__":
    main()
