"""How gloo collectives behave on the emulated testbed, against the simulator's model.

Run inside a testbed (needs root), every rank runs this module:

    lina-run --testbed 2x2 --nic 400mbit -- benchmarks.testbed_contention [--profile P.yaml]

It prints two tables (rank 0; times are means over ranks of each rank's median):

1. **How a collective is entered.** All-to-all and allreduce at several sizes, run
   back to back (nccl-tests' loop), each after a barrier and 20 ms of idle, and each after
   a barrier and 20 ms of compute on every rank (ranks outnumber cores, so they leave
   the compute at different times).
2. **An all-to-all beside an allreduce.** A 512 KB-per-rank all-to-all in 1, 2 or 4
   back-to-back chunks, alone and started 10 ms after a 2 MB allreduce on another
   communicator, with the simulator's prediction of the same when ``--profile`` is given
   (a profile from ``lina-run calibrate`` or ``lina-sim validate``'s refined one).

These are the measurements behind the testbed notes in the README (why a pipelined
all-to-all loses more to a concurrent allreduce than fair sharing says).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from lina_sim.hardware.spec import load_preset
from lina_sim.network.alone import SimCluster
from lina_sim.network.collectives import CollectiveAlgos
from runtime import dist as ldist

SIZES = (131072, 262144, 524288, 1048576)
A2A_BYTES, AR_BYTES, HEAD_START_S = 524288, 2e6, 0.01
REPS = 15


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def entry_table(reps: int) -> dict[tuple, float]:
    """(kind, bytes, how entered) -> this rank's median time (s)."""
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def compute(seconds: float) -> None:
        t = time.perf_counter()
        while time.perf_counter() - t < seconds:
            a @ b

    out = {}
    for n in SIZES:
        x, y = torch.zeros(n // 4), torch.empty(n // 4)
        for kind, fn in (
            ("all_to_all", lambda: dist.all_to_all_single(y, x)),
            ("allreduce", lambda: dist.all_reduce(x)),
        ):
            for how, before in (
                ("back to back", None),
                ("after idle", lambda: time.sleep(0.02)),
                ("after compute", lambda: compute(0.02)),
            ):
                fn()
                times = []
                for _ in range(reps):
                    if before is not None:
                        dist.barrier()
                        before()
                    times.append(timed(fn))
                out[(kind, n, how)] = statistics.median(times)
    return out


def beside_table(reps: int) -> dict[tuple, float]:
    """(chunks, allreduce beside) -> this rank's median all-to-all time (s)."""
    world = dist.get_world_size()
    other = dist.new_group(list(range(world)))  # the allreduce's own communicator
    big = torch.zeros(int(AR_BYTES // 4))
    out = {}
    for chunks in (1, 2, 4):
        x = torch.zeros(A2A_BYTES // 4 // chunks // world * world)
        y = torch.empty_like(x)
        for beside in (False, True):
            times = []
            for _ in range(reps + 1):
                dist.barrier()
                work = None
                if beside:
                    work = dist.all_reduce(big, group=other, async_op=True)
                    time.sleep(HEAD_START_S)
                times.append(timed(lambda: [dist.all_to_all_single(y, x) for _ in range(chunks)]))
                if work is not None:
                    work.wait()
            out[(chunks, beside)] = statistics.median(times[1:])
    return out


def simulated(profile: str, chunks: int, beside: bool) -> float:
    """The simulator's time for the same all-to-all (s)."""
    cluster = load_preset(profile)
    algos = CollectiveAlgos()
    sim = SimCluster(cluster)
    group = tuple(range(cluster.world_size))
    took = {}

    def run():
        if beside:
            sim.start("allreduce", algos.algo, group, AR_BYTES, proto=algos.proto)
            yield sim.env.timeout(HEAD_START_S)
        t = sim.env.now
        for _ in range(chunks):
            yield sim.start("all_to_all", algos.all_to_all, group, A2A_BYTES / chunks)
        took["s"] = sim.env.now - t

    sim.env.process(run())
    sim.env.run()
    return took["s"]


def main() -> None:
    p = argparse.ArgumentParser(prog="benchmarks.testbed_contention")
    p.add_argument("--profile", help="a hardware profile: add the simulator's prediction of table 2")
    p.add_argument("--reps", type=int, default=REPS)
    args = p.parse_args()
    info = ldist.init()
    mine = {"entry": entry_table(args.reps), "beside": beside_table(args.reps)}
    everyone: list = [None] * info.world_size
    dist.all_gather_object(everyone, mine)
    if info.rank == 0:

        def mean_ms(table: str, key: tuple) -> float:
            return 1e3 * statistics.mean(r[table][key] for r in everyone)

        print(f"# collectives on the testbed, {info.world_size} ranks: ms (mean over ranks of each one's median)")
        print(f"  {'kind':11s} {'bytes':>8s} {'back to back':>13s} {'after idle':>11s} {'after compute':>14s}")
        for n in SIZES:
            for kind in ("all_to_all", "allreduce"):
                row = [mean_ms("entry", (kind, n, how)) for how in ("back to back", "after idle", "after compute")]
                print(f"  {kind:11s} {n:8d} " + " ".join(f"{v:{w}.2f}" for v, w in zip(row, (13, 11, 14))))
        print(
            f"# a {A2A_BYTES // 1024} KB all-to-all in chunks, alone and {HEAD_START_S * 1e3:.0f} ms after a "
            f"{AR_BYTES / 1e6:.0f} MB allreduce started: ms"
        )
        print(
            f"  {'chunks':>6s} {'alone':>8s} {'beside':>8s}"
            + (f" {'sim alone':>10s} {'sim beside':>11s}" if args.profile else "")
        )
        for chunks in (1, 2, 4):
            line = f"  {chunks:6d} {mean_ms('beside', (chunks, False)):8.2f} {mean_ms('beside', (chunks, True)):8.2f}"
            if args.profile:
                line += (
                    f" {simulated(args.profile, chunks, False) * 1e3:10.2f}"
                    f" {simulated(args.profile, chunks, True) * 1e3:11.2f}"
                )
            print(line)
        sys.stdout.flush()
    ldist.destroy()


if __name__ == "__main__":
    main()
