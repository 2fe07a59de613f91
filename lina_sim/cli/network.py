"""``lina-sim collective``, ``lina-sim contention`` and ``lina-sim demo``."""

from __future__ import annotations

import argparse

from lina_sim.network.collectives import ALGORITHMS
from lina_sim.results.tables import format_collective_table, format_contention

DEFAULT_PRESET = "paper-testbed"


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset", default=DEFAULT_PRESET, help="cluster preset name or path to a profile .yaml (default: %(default)s)"
    )
    p.add_argument("--nodes", type=str, default=None, help="number of nodes (default: the preset's)")


def _load_cluster(args):
    from lina_sim.errors import ConfigError
    from lina_sim.hardware.spec import load_preset

    nodes = None
    if args.nodes is not None:
        try:
            nodes = int(args.nodes)
        except ValueError:
            raise ConfigError("--nodes", f"not an integer: {args.nodes!r}", "a positive integer") from None
        if nodes < 1:
            raise ConfigError("--nodes", f"must be >= 1, got {nodes}", "a positive integer")
    return load_preset(args.preset, nodes=nodes)


def register(sub) -> None:
    p = sub.add_parser("collective", help="time one collective over a range of sizes (nccl-tests style)")
    _cluster_args(p)
    p.add_argument("--op", required=True, choices=sorted(ALGORITHMS))
    p.add_argument("--algo", default=None, help="allreduce: ring|hierarchical; all_to_all: direct|hierarchical")
    p.add_argument("--sizes", default="1K:1G", help="SIZE, MIN:MAX or MIN:MAX:FACTOR in bytes (K/M/G units)")
    p.add_argument("--trace", default=None, metavar="FILE.json", help="write the timeline as a Chrome trace")
    p.set_defaults(func=cmd_collective)

    p = sub.add_parser("contention", help="an all-to-all alone vs. with a concurrent allreduce on the same ranks")
    _cluster_args(p)
    p.add_argument("--size", default="64M", help="all-to-all bytes per rank (default: %(default)s)")
    p.add_argument("--ar-size", default=None, help="allreduce bytes per rank (default: same as --size)")
    p.add_argument("--a2a-algo", default="direct", help="direct|hierarchical")
    p.add_argument("--ar-algo", default="ring", help="ring|hierarchical")
    p.add_argument("--top", type=int, default=6, help="bottleneck links to list")
    p.add_argument("--trace", default=None, metavar="FILE.json", help="write the concurrent run's Chrome trace")
    p.set_defaults(func=cmd_contention)

    p = sub.add_parser("demo", help="the built-in default: collective tables and the contention demo")
    _cluster_args(p)
    p.set_defaults(func=cmd_demo)


def _algo(op: str, algo: str | None) -> str:
    return algo or ALGORITHMS[op][0]


def cmd_collective(args) -> int:
    from lina_sim.config.units import parse_size_range
    from lina_sim.experiments.microbench import collective_sweep
    from lina_sim.results.timeline import Timeline, write_chrome_trace

    cluster = _load_cluster(args)
    algo = _algo(args.op, args.algo)
    sizes = parse_size_range(args.sizes)
    tl = Timeline() if args.trace else None
    df = collective_sweep(cluster, args.op, algo, sizes, timeline=tl)
    print(format_collective_table(df, args.op, algo, cluster))
    if tl is not None:
        print(f"# timeline: {write_chrome_trace(tl.to_frame(), args.trace)}")
    return 0


def cmd_contention(args) -> int:
    from lina_sim.config.units import parse_size
    from lina_sim.experiments.microbench import contention
    from lina_sim.results.timeline import write_chrome_trace

    cluster = _load_cluster(args)
    a2a = parse_size(args.size, "--size")
    ar = parse_size(args.ar_size, "--ar-size") if args.ar_size else a2a
    res = contention(cluster, a2a, ar, args.a2a_algo, args.ar_algo)
    print(format_contention(res, cluster, a2a, ar, args.a2a_algo, args.ar_algo, args.top))
    if args.trace:
        print(f"# timeline: {write_chrome_trace(res.timeline.to_frame(), args.trace)}")
    return 0


def cmd_demo(args) -> int:
    from lina_sim.config.units import parse_size_range
    from lina_sim.experiments.microbench import collective_sweep, contention

    cluster = _load_cluster(args)
    sizes = parse_size_range("1M:1G:4")
    for op in ("allreduce", "all_to_all"):
        for algo in ALGORITHMS[op]:
            print(format_collective_table(collective_sweep(cluster, op, algo, sizes), op, algo, cluster))
            print()
    size = 64 << 20
    res = contention(cluster, size, size)
    print(format_contention(res, cluster, size, size, "direct", "ring", 6))
    return 0
