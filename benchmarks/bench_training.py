"""Simulator speed for training steps.

1. One step of every policy of ``scenarios/paper-training.yaml`` at 16 GPUs with
   Transformer-XL-24 (target: under 2 s for all policies together on one core).
2. One step of GPT-2-MoE on 256 GPUs of ``dgx-a100`` (32 nodes) per policy.
3. One step of GPT-2-MoE with 1024 experts on 1024 GPUs of ``dgx-a100`` (128 nodes), all
   six policies (target: at most 20 s together on one core).

Runs pinned to one core; times are process CPU seconds (``time.process_time``), so other
load on the machine does not count. ``python benchmarks/bench_training.py [--skip-256]
[--skip-1024]``
"""

from __future__ import annotations

import argparse
import os
import time

from lina_sim.config.scenario import expand
from lina_sim.training.run import AloneTimes, resolve_training, run_policy

POLICIES = ["deepspeed", "tutel", "lina-priority", "lina-partition", "lina", "no-contention"]


def bench(cluster: dict, model: dict, policies: list[str]) -> list[tuple[str, float, float, int]]:
    setup = resolve_training(expand({"cluster": cluster, "model": model, "policies": policies})[0])
    alone = AloneTimes(setup.cluster, setup.algos)
    rows = []
    for entry in setup.policies:
        t0 = time.process_time()
        run = run_policy(setup, entry, alone)
        rows.append((entry.label, time.process_time() - t0, run.result.step_time, len(run.result.collectives)))
    return rows


def table(title: str, rows) -> None:
    print(f"# {title}")
    print(f"  {'policy':<16} {'cpu (s)':>9} {'sim step (ms)':>14} {'collectives':>12}")
    for name, wall, step, n in rows:
        print(f"  {name:<16} {wall:>9.2f} {step * 1e3:>14.2f} {n:>12d}")
    print(f"  {'total':<16} {sum(r[1] for r in rows):>9.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-256", action="store_true")
    ap.add_argument("--skip-1024", action="store_true")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    table(
        "paper-training: paper-testbed 4x4 GPUs, transformer-xl-24, one step per policy",
        bench({"preset": "paper-testbed"}, {"preset": "transformer-xl-24"}, POLICIES),
    )
    if not args.skip_256:
        table(
            "dgx-a100 32x8 = 256 GPUs, gpt2-moe (256 experts), one step per policy",
            bench({"preset": "dgx-a100", "nodes": 32}, {"preset": "gpt2-moe"}, POLICIES),
        )
    if not args.skip_1024:
        table(
            "dgx-a100 128x8 = 1024 GPUs, gpt2-moe with 1024 experts, one step per policy (target: total <= 20 s)",
            bench({"preset": "dgx-a100", "nodes": 128}, {"preset": "gpt2-moe", "experts": 1024}, POLICIES),
        )


if __name__ == "__main__":
    main()
