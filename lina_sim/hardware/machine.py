"""The machine the simulator itself runs on (not the simulated cluster): what it has
available, for the size guards that refuse a scenario before building it."""

from __future__ import annotations

# What the simulated network holds per rank of the cluster, bytes: the topology's links
# (about 8 per GPU, each with its name), the per-path-class steps of the collectives over
# every rank (flows are counted per class, never listed: Topology.block_pairs) and the
# NCCL tables of their communicators. Measured (ru_maxrss above the interpreter with
# lina_sim imported, one core): `lina-sim collective` (every size 1K..1G) and `contention`
# at their default algorithms, 8.6-10.5 KB per rank at 16,384 ranks (dgx-h100-superpod,
# dgx-a100) and at 100,000 (dgx-a100: all_to_all 5.1 KB, allreduce 8.6 KB, contention
# 9.0 KB); a 16,384-GPU training step simulated as one replica, 9.8 KB per GPU
# (benchmarks/bench_frontier.py). Rounded up. The guards of lina_sim.training.run and
# lina_sim.cli.network read it.
NETWORK_BYTES_PER_RANK = 12e3


def available_memory() -> float | None:
    """This machine's available memory, bytes (``MemAvailable`` of /proc/meminfo); None
    where it cannot be read (not Linux), and then nothing is refused."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def gigabytes(nbytes: float) -> str:
    """``nbytes`` for a message: GB with three significant digits, TB above 1000 GB."""
    return f"{nbytes / 1e12:.3g} TB" if nbytes >= 1e12 else f"{nbytes / 1e9:.3g} GB"
