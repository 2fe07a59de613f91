"""A frontier MoE training step: DeepSeekMoE-16B (64 routed experts, top-6; the
``deepseek-moe-16b`` model preset) on the ``dgx-h100-superpod`` preset (64 scalable units
of 32 DGX H100, a rail-optimised leaf/spine NDR fabric) at 16,384 GPUs: expert
parallelism 64 (one expert per GPU), data parallelism 256. One step per training
policy, every policy of the registry, as ``lina-sim run`` would run them.

Issue 17's target: all policies together <= 60 s and <= 4 GB on one core. The run is
pinned to one core; ``cpu (s)`` is process CPU time (a machine shared with other work
inflates the wall time, not it), ``peak RSS`` the process's maximum. ``--gpus`` runs a
smaller slice of the same cluster (the same EP 64, less data parallelism), to see how
the cost grows. ``sim ranks`` is how many ranks the engine simulated: one block (a
data-parallel replica, the ``ep`` group, or a node of packed replicas; ``replica_size``)
per class of replicas that live alike (``classes``; lina_sim/training/engine.py,
``ReplicaClasses``), standing for all of them, which gives the every-rank step to float
rounding; ``--all-ranks`` simulates every rank, the engine's reference mode (the same
step, minutes and gigabytes at 16,384 GPUs). ``collectives`` counts every replica's
collectives.

``--network`` times only the step's network at the full 16,384 GPUs: every all-to-all
of the step's program (27 MoE layers x dispatch and combine, forward and backward), each
run by all 256 expert-parallel groups at once (``Collectives.all_to_all_groups``), one
after another, while DeepSpeed's 25 MB gradient buckets run beside them, in order, on
the data-parallel communicator (all 16,384 ranks) and on the 64 expert-data-parallel
ones (256 ranks each) at once. That is what the training engine asks of the network
when it simulates one replica rather than every rank.

    python benchmarks/bench_frontier.py [--gpus 16384] [--policies deepspeed,lina] [--network] [--all-ranks]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from lina_sim.config.scenario import expand
from lina_sim.policies.registry import TRAINING_POLICIES
from lina_sim.training.run import AloneTimes, resolve_training, run_policy

PRESET = "dgx-h100-superpod"
EXPERTS = 64  # DeepSeekMoE-16B's routed experts: expert parallelism 64


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def network_of_step(gpus: int) -> None:
    """The step's collectives alone on the simulated network (see the module docstring)."""
    import simpy

    from lina_sim.hardware.spec import load_preset
    from lina_sim.network.alone import SimCluster
    from lina_sim.policies.registry import make_training_policy
    from lina_sim.workload.graph import build_training_graph
    from lina_sim.workload.model import model_from_dict

    c0 = time.process_time()
    cluster = load_preset(PRESET, nodes=gpus // 8)
    model = model_from_dict({"preset": "deepseek-moe-16b", "experts": EXPERTS}, world_size=gpus)
    graph = build_training_graph(model, gpus, experts_per_device=1)
    buckets = make_training_policy("deepspeed").partition_gradients(graph.grad_requests)
    sim = SimCluster(cluster)
    env, coll = sim.env, sim.coll
    a2a_time: list[float] = []
    ar_time: list[float] = []

    def all_to_alls():
        for m in graph.a2a_micro_ops():
            p = coll.all_to_all_groups(graph.communicators[m.communicator].groups, m.nbytes)
            yield p
            a2a_time.append(p.value.duration)

    def gradients(comm: str):
        for m in (b for b in buckets if b.communicator == comm):
            procs = [coll.allreduce(g, m.nbytes) for g in graph.communicators[comm].groups]
            yield simpy.AllOf(env, procs)
            ar_time.append(max(p.value.duration for p in procs))

    procs = [env.process(all_to_alls())] + [env.process(gradients(c)) for c in ("dp", "expert_dp")]
    env.run()
    assert all(p.processed for p in procs)
    st = sim.net.stats
    print(f"# the network of one step at {gpus} GPUs ({PRESET}, deepseek-moe-16b, EP {EXPERTS}, deepspeed buckets)")
    print(
        f"  {'all-to-alls':>11} {'allreduces':>10} {'flow groups':>11} {'rate updates':>12} {'sim time (ms)':>13} "
        f"{'sum a2a (ms)':>12} {'sum allreduce (ms)':>18} {'cpu (s)':>8} {'peak RSS (MB)':>14}"
    )
    print(
        f"  {len(a2a_time):>11} {len(ar_time):>10} {st.groups_started:>11} {st.rate_updates:>12} "
        f"{env.now * 1e3:>13.2f} {sum(a2a_time) * 1e3:>12.2f} {sum(ar_time) * 1e3:>18.2f} "
        f"{time.process_time() - c0:>8.2f} {peak_rss_mb():>14.0f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=16384, help="GPUs (a multiple of 8 and of 64)")
    ap.add_argument("--policies", default=",".join(TRAINING_POLICIES), help="comma-separated training policies")
    ap.add_argument("--network", action="store_true", help="only the step's collectives on the network")
    ap.add_argument("--all-ranks", action="store_true", help="simulate every rank, not one replica for all")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    if args.network:
        network_of_step(args.gpus)
        return
    scenario = {
        "cluster": {"preset": PRESET, "nodes": args.gpus // 8},
        "model": {"preset": "deepseek-moe-16b", "experts": EXPERTS},
        "policies": args.policies.split(","),
    }
    c0, w0 = time.process_time(), time.perf_counter()
    setup = resolve_training(expand(scenario)[0])
    alone = AloneTimes(setup.cluster, setup.algos)
    c_setup = time.process_time() - c0
    print(
        f"# {PRESET} {args.gpus // 8}x8 = {args.gpus} GPUs, deepseek-moe-16b, EP {EXPERTS}, "
        f"DP {args.gpus // EXPERTS}: one step per policy (setup {c_setup:.2f} s CPU)"
    )
    print(
        f"  {'policy':<16} {'cpu (s)':>8} {'wall (s)':>9} {'k':>3} {'r':>3} {'sim step (ms)':>14} "
        f"{'a2a (ms)':>9} {'allreduce (ms)':>15} {'collectives':>12} {'sim ranks':>10} {'classes':>8} "
        f"{'peak RSS (MB)':>14}"
    )
    for entry in setup.policies:
        c1, w1 = time.process_time(), time.perf_counter()
        run = run_policy(setup, entry, alone, all_ranks=args.all_ranks)
        b = run.breakdown
        print(
            f"  {entry.label:<16} {time.process_time() - c1:>8.2f} {time.perf_counter() - w1:>9.2f} "
            f"{run.experts_per_device:>3} {run.pipeline_degree:>3} {run.result.step_time * 1e3:>14.2f} "
            f"{b.get('total_a2a', float('nan')) * 1e3:>9.2f} {b.get('total_allreduce', float('nan')) * 1e3:>15.2f} "
            f"{run.result.collective_count:>12d} {run.result.ranks:>10d} {len(run.result.classes):>8d} "
            f"{peak_rss_mb():>14.0f}",
            flush=True,
        )
    print(
        f"  {'total':<16} {time.process_time() - c0:>8.2f} {time.perf_counter() - w0:>9.2f}"
        f"{'':>107} {peak_rss_mb():>14.0f}"
    )


if __name__ == "__main__":
    main()
