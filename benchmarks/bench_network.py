"""Simulator speed: one all-to-all plus one concurrent allreduce (64 MiB per rank) on
dgx-a100 clusters of 16 to 1024 GPUs, with the default collectives (NCCL's grouped p2p
all-to-all and NCCL's allreduce choice, ``auto``) and with the flat ring (pipelined and
step by step).

Each size runs in its own process pinned to one core, so that peak memory (max RSS)
is per size; ``cpu (s)`` is the process's own CPU time, which a machine shared with
other work does not inflate as it does the wall time. Targets: 256 GPUs under 5 s, 1024
GPUs under 60 s on one core (issue 2); the 1024-GPU pair under 2 s with NCCL's models
(issue 12); 4096 GPUs under 1 s and 500 MB, 16,384 GPUs under 10 s and 2 GB (issue 17:
symmetric steps are built from per-class link counts, never per-pair paths). For scale:
ASTRA-sim's analytical backend takes about 68 s for the 1024-NPU all-to-all. The flat
ring's two rows run up to 1024 GPUs (step by step it is 2(n-1) network events).

``--uneven`` times a skewed 256-GPU all-to-all (each rank sends 1-4 MiB to 24 random
ranks and 4 MiB more to one of 8 hot ranks: 6,368 flows, above the exact limit) as the
simulator runs it, aggregated per node pair, against exact per-flow max-min sharing
(``lina_sim.network.fluid.per_flow_makespan``, minutes): target error <= 2%.

    python benchmarks/bench_network.py [--gpus 16,64,256,1024,4096,16384] [--preset dgx-h100-superpod] [--uneven]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SIZE = 64 << 20


def one(gpus: int, pipelined: bool, allreduce: str, preset: str = "dgx-a100") -> dict:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    t0 = time.perf_counter()
    from lina_sim.hardware.spec import load_preset
    from lina_sim.network.alone import SimCluster

    t_import = time.perf_counter()
    c_import = time.process_time()
    cluster = load_preset(preset, nodes=gpus // 8)
    sim = SimCluster(cluster)
    sim.coll.pipelined = pipelined
    ranks = range(gpus)
    a2a = sim.start("all_to_all", "direct", ranks, SIZE)
    ar = sim.start("allreduce", allreduce, ranks, SIZE)
    sim.env.run()
    t1 = time.perf_counter()
    c1 = time.process_time()
    st = sim.net.stats
    return {
        "gpus": gpus,
        "wall_s": t1 - t_import,
        "cpu_s": c1 - c_import,
        "import_s": t_import - t0,
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "flows": st.flows_started,
        "groups": st.groups_started,
        "rate_updates": st.rate_updates,
        "sim_a2a_ms": a2a.value.duration * 1e3,
        "sim_allreduce_ms": ar.value.duration * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="16,64,256,1024")
    ap.add_argument("--preset", default="dgx-a100", help="cluster preset (8 GPUs per node), e.g. dgx-h100-superpod")
    ap.add_argument("--uneven", action="store_true", help="aggregated vs exact uneven all-to-all at 256 GPUs")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["pipelined", "step-by-step"], default="pipelined", help=argparse.SUPPRESS)
    ap.add_argument("--allreduce", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.mode != "step-by-step", args.allreduce, args.preset)))
        return
    if args.uneven:
        uneven()
        return
    # The step model only matters for the flat ring: NCCL's pairs run as one step.
    for allreduce, mode in (("auto", "pipelined"), ("flat-ring", "pipelined"), ("flat-ring", "step-by-step")):
        sizes = ",".join(g for g in args.gpus.split(",") if allreduce == "auto" or int(g) <= 1024)
        if sizes:
            print(f"# allreduce {allreduce}, {mode}")
            run_sizes(sizes, mode, allreduce, args.preset)


def uneven(gpus: int = 256, peers: int = 24) -> None:
    """Aggregated vs exact per-flow sharing of one skewed flat all-to-all (see above)."""
    import numpy as np
    import simpy

    from lina_sim.hardware.spec import load_preset
    from lina_sim.hardware.topology import Topology
    from lina_sim.network.collectives import Collectives
    from lina_sim.network.fluid import FluidNetwork, per_flow_makespan

    rng = np.random.default_rng(2)
    m = np.zeros((gpus, gpus))
    hot = rng.choice(gpus, 8, replace=False)
    for i in range(gpus):
        m[i, rng.choice(gpus, peers, replace=False)] = rng.integers(1, 5, size=peers) * float(1 << 20)
        m[i, hot[i % 8]] += 4 << 20
    topo = Topology(load_preset("dgx-a100", nodes=gpus // 8))
    c0 = time.process_time()
    env = simpy.Environment()
    coll = Collectives(FluidNetwork(env, topo))
    proc = coll.all_to_all(range(gpus), m, "flat")
    env.run()
    c1 = time.process_time()
    src, dst = np.nonzero((m > 0) & ~np.eye(gpus, dtype=bool))
    paths = topo.paths(src, dst)
    fair = 1.0 / np.bincount(src)[src]
    exact = per_flow_makespan(paths, m[src, dst], fair, topo.links.capacity) + topo.latency_of_paths(paths).max()
    c2 = time.process_time()
    agg = proc.value.duration
    print(
        f"{'GPUs':>5} {'flows':>6} {'groups':>7} {'aggregated (ms)':>16} {'exact (ms)':>11} {'error':>8} "
        f"{'cpu agg (s)':>12} {'cpu exact (s)':>14}"
    )
    print(
        f"{gpus:>5} {src.size:>6} {coll.net.stats.groups_started:>7} {agg * 1e3:>16.4f} {exact * 1e3:>11.4f} "
        f"{100 * (agg / exact - 1):>+7.3f}% {c1 - c0:>12.2f} {c2 - c1:>14.1f}"
    )


def run_sizes(gpus_list: str, mode: str, allreduce: str, preset: str = "dgx-a100") -> None:
    print(
        f"{'GPUs':>6} {'flows':>10} {'groups':>7} {'rate upd':>9} {'wall (s)':>9} {'cpu (s)':>8} {'peak RSS (MB)':>14} "
        f"{'sim a2a (ms)':>13} {'sim allreduce (ms)':>19}"
    )
    for gpus in [int(x) for x in gpus_list.split(",")]:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                str(gpus),
                "--mode",
                mode,
                "--allreduce",
                allreduce,
                "--preset",
                preset,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{r['gpus']:>6} {r['flows']:>10} {r['groups']:>7} {r['rate_updates']:>9} {r['wall_s']:>9.2f} "
            f"{r['cpu_s']:>8.2f} {r['peak_rss_MB']:>14.0f} {r['sim_a2a_ms']:>13.3f} {r['sim_allreduce_ms']:>19.3f}"
        )


if __name__ == "__main__":
    main()
