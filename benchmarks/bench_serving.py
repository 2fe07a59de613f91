"""Simulator speed for inference serving.

Serves 10,000 requests on 16 GPUs (``paper-testbed``, 4 nodes, 16 experts, the 16-GPU
point of ``scenarios/paper-inference.yaml``, its four domains mixed in one stream, 8192
tokens per batch) with every placement policy, and prints the simulator's time per
policy: the placement protocol and batch bookkeeping of that policy plus its share of
the vectorised all-to-all timing (the runner advances all policies in lockstep and times
every all-to-all of a step in one call). The last lines hold the target: the whole run
in at most 15 s of one core.

Times are wall-clock (``perf_counter``) and CPU (``process_time``, which a machine
shared with other work does not inflate); the run is pinned to one core.

The trace is whichever of the scenario's recorded traces ``traces/`` has, else a
synthetic 16-expert trace (``--synthetic`` forces it).

``python benchmarks/bench_serving.py [--requests N] [--domain mixed|each|NAME] [--synthetic]``
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from lina_sim.config.scenario import Scenario, load_yaml
from lina_sim.network.serving_a2a import AllToAllTimer
from lina_sim.serving.run import serve_policies
from lina_sim.serving.setup import resolve_inference

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "paper-inference.yaml"
TARGET_S = 15.0  # the whole default run, CPU seconds of one core


def setup_for(requests: int, synthetic: bool, tmp: Path, domain: str = "mixed"):
    data = load_yaml(SCENARIO)
    data.pop("sweep", None)
    data["cluster"]["nodes"] = 4
    data["model"]["experts"] = 16
    data["serving"].update(requests=requests, timeline_batches=0, domain=domain)
    data["serving"]["batching"] = {"token_budget": 8192, "timeout": 0.002}
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
    ap.add_argument("--domain", default="mixed", help="serving.domain: mixed (default), each, or one domain")
    ap.add_argument("--synthetic", action="store_true", help="use a synthetic trace even if recorded ones exist")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    with tempfile.TemporaryDirectory() as tmp:
        setup, traces = setup_for(args.requests, args.synthetic, Path(tmp), args.domain)
        # Count the all-to-all timer's own work separately (the runner's and any the
        # policies ask for while they plan).
        spent = {"a2a": 0.0, "a2a_cpu": 0.0, "matrices": 0}
        real = AllToAllTimer.times

        def timed(self, m):
            t0, c0 = time.perf_counter(), time.process_time()
            out = real(self, m)
            spent["a2a"] += time.perf_counter() - t0
            spent["a2a_cpu"] += time.process_time() - c0
            spent["matrices"] += len(m) if np.ndim(m) == 3 else 1
            return out

        AllToAllTimer.times = timed
        runs = []
        t0, c0 = time.perf_counter(), time.process_time()
        for domain in setup.served_domains():
            runs += [(domain, r) for r in serve_policies(setup.for_domain(domain))]
        total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
        AllToAllTimer.times = real
    print(
        f"# serving {args.requests} requests ({args.domain}) on {setup.cluster.world_size} GPUs "
        f"({setup.cluster.name}), {setup.model.experts} experts, trace {', '.join(Path(t).name for t in traces)}"
    )
    print(f"  {'policy':<26} {'wall (s)':>9} {'batches':>8} {'sim p95 (ms)':>13}")
    for domain, run in runs:
        lat = sorted(r.latency for r in run.requests)
        p95 = lat[int(0.95 * (len(lat) - 1))]
        label = run.entry.label if domain == "mixed" else f"{run.entry.label} [{domain}]"
        print(f"  {label:<26} {run.wall_s:>9.2f} {len(run.batches):>8d} {p95 * 1e3:>13.2f}")
    print(f"  {'total':<26} {total:>9.2f}   wall s; {total_cpu:.2f} s CPU (one core)")
    print(
        f"  {'all-to-all':<26} {spent['a2a']:>9.2f}   wall s; {spent['a2a_cpu']:.2f} s CPU for "
        f"{spent['matrices']} all-to-alls ({AllToAllTimer.__module__})"
    )
    verdict = "met" if total_cpu <= TARGET_S else "NOT met"
    print(f"  {'target':<26} {TARGET_S:>9.2f}   s CPU in all: {verdict} ({total_cpu:.2f} s)")


if __name__ == "__main__":
    main()
