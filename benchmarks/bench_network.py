"""Simulator speed: one all-to-all plus one concurrent allreduce (64 MiB per rank) on
dgx-a100 clusters of 16 to 1024 GPUs, with the default collectives (NCCL's grouped p2p
all-to-all and NCCL's allreduce choice, ``auto``) and with the flat ring (pipelined and
step by step).

Each size runs in its own process pinned to one core, so that peak memory (max RSS)
is per size. Targets: 256 GPUs under 5 s, 1024 GPUs under 60 s on one core (issue 2);
the 1024-GPU pair under 2 s with NCCL's models (issue 12). For scale: ASTRA-sim's
analytical backend takes about 68 s for the 1024-NPU all-to-all.

    python benchmarks/bench_network.py [--gpus 16,64,256,1024]
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


def one(gpus: int, pipelined: bool, allreduce: str) -> dict:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    t0 = time.perf_counter()
    from lina_sim.hardware.spec import load_preset
    from lina_sim.network.alone import SimCluster

    t_import = time.perf_counter()
    cluster = load_preset("dgx-a100", nodes=gpus // 8)
    sim = SimCluster(cluster)
    sim.coll.pipelined = pipelined
    ranks = range(gpus)
    a2a = sim.start("all_to_all", "direct", ranks, SIZE)
    ar = sim.start("allreduce", allreduce, ranks, SIZE)
    sim.env.run()
    t1 = time.perf_counter()
    st = sim.net.stats
    return {
        "gpus": gpus,
        "wall_s": t1 - t_import,
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
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["pipelined", "step-by-step"], default="pipelined", help=argparse.SUPPRESS)
    ap.add_argument("--allreduce", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.mode != "step-by-step", args.allreduce)))
        return
    # The step model only matters for the flat ring: NCCL's pairs run as one step.
    for allreduce, mode in (("auto", "pipelined"), ("flat-ring", "pipelined"), ("flat-ring", "step-by-step")):
        print(f"# allreduce {allreduce}, {mode}")
        run_sizes(args.gpus, mode, allreduce)


def run_sizes(gpus_list: str, mode: str, allreduce: str) -> None:
    print(
        f"{'GPUs':>6} {'flows':>10} {'groups':>7} {'rate upd':>9} {'wall (s)':>9} {'peak RSS (MB)':>14} "
        f"{'sim a2a (ms)':>13} {'sim allreduce (ms)':>19}"
    )
    for gpus in [int(x) for x in gpus_list.split(",")]:
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(gpus), "--mode", mode, "--allreduce", allreduce],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{r['gpus']:>6} {r['flows']:>10} {r['groups']:>7} {r['rate_updates']:>9} {r['wall_s']:>9.2f} "
            f"{r['peak_rss_MB']:>14.0f} {r['sim_a2a_ms']:>13.3f} {r['sim_allreduce_ms']:>19.3f}"
        )


if __name__ == "__main__":
    main()
