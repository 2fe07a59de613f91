"""Simulator speed for inference serving.

Serves 10,000 requests on 16 GPUs (``paper-testbed``, 4 nodes, 16 experts, the 16-GPU
point of ``scenarios/paper-inference.yaml``, its four domains mixed in one stream, 8192
tokens per batch) with every placement policy, and prints per policy the simulator's CPU
time for its placement protocol and batch bookkeeping (``prepare`` and ``complete`` of
its server, all-to-all timing excluded), its batches and its simulated p50 and p95
latency; then the all-to-all timing of all policies together (the runner advances every
policy in lockstep and times every all-to-all of a step in one call, the oracle's
candidates included) and the total. The last line holds the target: the whole run in at
most 15 s of one core's CPU time.

Times are CPU (``process_time``, which a machine shared with other work does not
inflate, unlike wall-clock time); the run is pinned to one core.

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
from lina_sim.serving.server import PolicyServer
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
        # The all-to-all timer's own work is counted apart (the runner's and whatever the
        # oracle times while it chooses), and taken out of the servers' time.
        spent = {"a2a_cpu": 0.0, "matrices": 0}
        cpu: dict[tuple[str, str], float] = {}  # (domain, policy label) -> CPU s
        real_times, real_prepare, real_complete = AllToAllTimer.times, PolicyServer.prepare, PolicyServer.complete

        def timed(self, m):
            c0 = time.process_time()
            out = real_times(self, m)
            spent["a2a_cpu"] += time.process_time() - c0
            spent["matrices"] += len(m) if np.ndim(m) == 3 else 1
            return out

        def own(real):
            def run(self, *a):
                c0, a0 = time.process_time(), spent["a2a_cpu"]
                out = real(self, *a)
                key = (self.setup.serving.domain, self.entry.label)
                cpu[key] = cpu.get(key, 0.0) + time.process_time() - c0 - (spent["a2a_cpu"] - a0)
                return out

            return run

        AllToAllTimer.times, PolicyServer.prepare, PolicyServer.complete = timed, own(real_prepare), own(real_complete)
        runs = []
        c0 = time.process_time()
        try:
            for domain in setup.served_domains():
                runs += [(domain, r) for r in serve_policies(setup.for_domain(domain))]
        finally:
            total_cpu = time.process_time() - c0
            AllToAllTimer.times, PolicyServer.prepare, PolicyServer.complete = real_times, real_prepare, real_complete
    print(
        f"# serving {args.requests} requests ({args.domain}) on {setup.cluster.world_size} GPUs "
        f"({setup.cluster.name}), {setup.model.experts} experts, trace {', '.join(Path(t).name for t in traces)}"
    )
    print(f"  {'policy':<26} {'CPU (s)':>8} {'batches':>8} {'sim p50 (ms)':>13} {'sim p95 (ms)':>13}")
    for domain, run in runs:
        lat = run.latencies()
        label = run.entry.label if domain == "mixed" else f"{run.entry.label} [{domain}]"
        print(
            f"  {label:<26} {cpu.get((domain, run.entry.label), 0.0):>8.2f} {len(run.batches):>8d} "
            f"{np.percentile(lat, 50) * 1e3:>13.4f} {np.percentile(lat, 95) * 1e3:>13.4f}"
        )
    print(f"  {'all-to-all timing':<26} {spent['a2a_cpu']:>8.2f}   s CPU, {spent['matrices']} matrices asked")
    print(f"  {'total':<26} {total_cpu:>8.2f}   s CPU (one core), setup and trace split included")
    verdict = "met" if total_cpu <= TARGET_S else "NOT met"
    print(f"  {'target':<26} {TARGET_S:>8.2f}   s CPU in all: {verdict} ({total_cpu:.2f} s)")


if __name__ == "__main__":
    main()
