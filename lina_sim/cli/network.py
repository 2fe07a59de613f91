"""``lina-sim collective``, ``lina-sim contention`` and ``lina-sim demo``.

``lina-sim collective --compare FILE ...`` reads measured collective times (nccl-tests
output, Vidur's CSVs, ``lina-run calibrate``'s raw YAML, or a previous comparison; see
:mod:`lina_sim.experiments.measured`) and simulates each measured table on the preset,
shaped as the measurement was. ``lina-sim collective --calibrate FILE ... --out
PROFILE.yaml`` fits the preset's NVLink and NIC latency and bandwidth to such tables,
with the simulator as the model (:mod:`lina_sim.experiments.calibration`), and writes a
profile that ``--preset PROFILE.yaml`` loads. It is an option of ``collective``, beside
``--compare``, because it is the same run with the link parameters moving: the same
readers, preset shaping, ``--algo``, ``--proto`` and ``--out``.

Allreduce algorithms and protocols use NCCL's names (``--algo auto|ring|tree|nvls`` as
NCCL_ALGO, ``--proto auto|LL|LL128|Simple`` as NCCL_PROTO), plus lina-sim's own
``hierarchical`` and ``flat-ring`` (the pre-NCCL alpha-beta ring); ``auto``, the default,
is NCCL's own choice per size, shown per size in the table's ``algo`` / ``proto`` columns.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

from lina_sim.errors import ConfigError
from lina_sim.network.collectives import ALGORITHMS, PROTOCOLS, TIMED_OPS
from lina_sim.results.tables import format_collective_table, format_contention

# What `collective --op` times: the collectives and nccl-tests' sendrecv.
OP_CHOICES = sorted(TIMED_OPS)

DEFAULT_PRESET = "paper-testbed"


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset", default=DEFAULT_PRESET, help="cluster preset name or path to a profile .yaml (default: %(default)s)"
    )
    p.add_argument("--nodes", type=str, default=None, metavar="N", help="number of nodes (default: the preset's)")
    p.add_argument(
        "--gpus-per-node",
        type=str,
        default=None,
        metavar="G",
        help="use only the first G GPUs of each node, each with its own NIC (default: all the preset's)",
    )


def _positive_int(text: str | None, flag: str) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(flag, f"not an integer: {text!r}", "a positive integer") from None
    if value < 1:
        raise ConfigError(flag, f"must be >= 1, got {value}", "a positive integer")
    return value


@contextlib.contextmanager
def _flags(**flags: str) -> Iterator[None]:
    """Errors on the simulator's ``algo`` / ``proto`` arguments named as the flags that
    set them (``algo="--algo"``), so that the one-line error names what the user typed."""
    try:
        yield
    except ConfigError as e:
        if e.field not in flags:
            raise
        raise ConfigError(flags[e.field], e.problem, e.allowed) from None


def _load_cluster(args):
    from lina_sim.experiments.microbench import with_gpus_per_node
    from lina_sim.hardware.spec import load_preset

    nodes = _positive_int(args.nodes, "--nodes")
    gpus = _positive_int(args.gpus_per_node, "--gpus-per-node")
    cluster = load_preset(args.preset, nodes=nodes)
    return cluster if gpus is None else with_gpus_per_node(cluster, gpus)


# A timeline event (one rank's part of one timed collective) kept for --trace, with its
# Chrome-trace record: measured 1.17 KB (`collective --op all_to_all --trace` at 16,384
# ranks, 21 sizes: 404 MB above the same run without it); rounded up.
TRACE_BYTES_PER_EVENT = 1.2e3


def _host_bytes(ranks: int, events_per_rank: int = 0) -> float:
    """Bytes one ``collective`` / ``contention`` run over ``ranks`` ranks holds: fixed, the
    network's state per rank (every collective's flows are counted per path class, never
    listed per pair: :data:`~lina_sim.hardware.machine.NETWORK_BYTES_PER_RANK`), and
    ``events_per_rank`` timeline events per rank for ``--trace``."""
    from lina_sim.hardware.machine import NETWORK_BYTES_PER_RANK
    from lina_sim.training.run import HOST_FIXED_BYTES

    return HOST_FIXED_BYTES + ranks * (NETWORK_BYTES_PER_RANK + events_per_rank * TRACE_BYTES_PER_EVENT)


def _check_host_memory(cluster, op: str, algo: str, events_per_rank: int = 0) -> None:
    """Refuse, before anything is built, an ``op`` over every rank of ``cluster`` whose
    simulation would not fit in this machine's available memory (:func:`_host_bytes`); a
    ConfigError on ``--nodes`` with the size and how many nodes would fit."""
    from lina_sim.hardware.machine import available_memory, gigabytes

    have = available_memory()
    gpn = cluster.gpus_per_node

    def need(nodes: int) -> float:
        return _host_bytes(nodes * gpn, events_per_rank)

    if have is None or need(cluster.nodes) <= have:
        return
    fits, hi = 0, cluster.nodes  # the largest node count that fits, by bisection (need grows with nodes)
    while fits < hi:
        mid = (fits + hi + 1) // 2
        fits, hi = (mid, hi) if need(mid) <= have else (fits, mid - 1)
    raise ConfigError(
        "--nodes",
        f"{op} ({algo}) over {cluster.world_size} ranks needs about {gigabytes(need(cluster.nodes))} of memory; "
        f"this machine has {gigabytes(have)} available",
        f"--nodes <= {fits} on {cluster.name}" if fits else "none",
    )


def register(sub) -> None:
    p = sub.add_parser(
        "collective",
        help="time one collective over a range of sizes (nccl-tests style), compare measured times, "
        "or calibrate the links to them",
        usage="%(prog)s [options] (--op OP | --compare FILE [FILE ...] "
        "| --calibrate FILE [FILE ...] --out PROFILE.yaml)",
    )
    _cluster_args(p)
    p.add_argument(
        "--op",
        default=None,
        choices=OP_CHOICES,
        metavar="OP",
        help=f"{'|'.join(OP_CHOICES)} (required unless --compare)",
    )
    p.add_argument(
        "--algo",
        default=None,
        help="per op, the first the default: "
        + "; ".join(f"{op}: {'|'.join(names)}" for op, names in TIMED_OPS.items())
        + ". allreduce: auto = NCCL's choice per size, ring|tree|nvls = NCCL_ALGO, hierarchical = 2D, "
        "flat-ring = lina-sim's pre-NCCL alpha-beta ring",
    )
    p.add_argument(
        "--proto",
        default=None,
        metavar="PROTO",
        help=f"allreduce only, as NCCL_PROTO: {'|'.join(PROTOCOLS)} (default: auto; "
        "only with --algo auto|ring|tree|nvls)",
    )
    p.add_argument(
        "--sizes", default=None, help="SIZE, MIN:MAX or MIN:MAX:FACTOR in bytes (K/M/G units; default 1K:1G)"
    )
    p.add_argument("--trace", default=None, metavar="FILE.json", help="write the timeline as a Chrome trace")
    p.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="FILE",
        help="measured times (nccl-tests output, Vidur CSV, lina-run calibrate raw YAML, a previous --out CSV): "
        "simulate each table on the preset, shaped as measured, and print the errors",
    )
    p.add_argument(
        "--calibrate",
        nargs="+",
        default=None,
        metavar="FILE",
        help="measured times as for --compare: fit the preset's nvlink (1-node tables) and nic (multi-node "
        "tables) latency and bandwidth x efficiency to them and write the profile to --out",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR|PROFILE.yaml",
        help="with --compare: a folder for comparison.csv, summary.csv and figures; "
        "with --calibrate: the profile .yaml to write",
    )
    p.set_defaults(func=cmd_collective)

    p = sub.add_parser("contention", help="an all-to-all alone vs. with a concurrent allreduce on the same ranks")
    _cluster_args(p)
    p.add_argument("--size", default="64M", help="all-to-all bytes per rank (default: %(default)s)")
    p.add_argument("--ar-size", default=None, metavar="SIZE", help="allreduce bytes per rank (default: same as --size)")
    p.add_argument("--a2a-algo", default="direct", metavar="ALGO", help="|".join(ALGORITHMS["all_to_all"]))
    p.add_argument(
        "--ar-algo",
        default=ALGORITHMS["allreduce"][0],
        metavar="ALGO",
        help="|".join(ALGORITHMS["allreduce"]) + " (default: %(default)s)",
    )
    p.add_argument("--ar-proto", default="auto", metavar="PROTO", help="|".join(PROTOCOLS) + " (default: auto)")
    p.add_argument("--top", type=int, default=6, metavar="K", help="bottleneck links to list")
    p.add_argument("--trace", default=None, metavar="FILE.json", help="write the concurrent run's Chrome trace")
    p.set_defaults(func=cmd_contention)

    p = sub.add_parser("demo", help="the built-in default: collective tables and the contention demo")
    _cluster_args(p)
    p.set_defaults(func=cmd_demo)


def _algo(op: str, algo: str | None) -> str:
    return algo or TIMED_OPS[op][0]


def cmd_collective(args) -> int:
    from lina_sim.config.units import parse_size_range
    from lina_sim.experiments.microbench import check_op, collective_sweep
    from lina_sim.results.timeline import Timeline, write_chrome_trace

    if args.compare and args.calibrate:
        raise ConfigError("--calibrate", "not with --compare: compare against the written profile afterwards")
    if args.compare:
        return cmd_compare(args)
    if args.calibrate:
        return cmd_calibrate(args)
    if args.op is None:
        raise ConfigError("--op", "required (or --compare FILE ...)", OP_CHOICES)
    if args.out is not None:
        raise ConfigError("--out", "only with --compare or --calibrate", "--compare FILE ... --out DIR")
    algo = _algo(args.op, args.algo)
    proto = args.proto or "auto"
    with _flags(algo="--algo", proto="--proto"):
        check_op(args.op, algo, proto)
    cluster = _load_cluster(args)
    sizes = parse_size_range(args.sizes or "1K:1G")
    _check_host_memory(cluster, args.op, algo, len(sizes) if args.trace else 0)
    tl = Timeline() if args.trace else None
    with _flags(algo="--algo", proto="--proto"):
        df = collective_sweep(cluster, args.op, algo, sizes, timeline=tl, proto=proto)
    print(format_collective_table(df, args.op, algo, cluster, proto))
    if tl is not None:
        print(f"# timeline: {write_chrome_trace(tl.to_frame(), args.trace)}")
    return 0


def cmd_compare(args) -> int:
    """``collective --compare FILE ...``: every file read and every table shaped before
    anything is simulated, so that a bad file or a table that does not fit stops the run
    at once; then per table its comparison, and the summary last."""
    import pandas as pd

    from lina_sim.experiments.measured import measured_tables, read_measured, table_config
    from lina_sim.experiments.microbench import compare_measured, comparison_summary, shape_for
    from lina_sim.results.files import atomic_write_text
    from lina_sim.results.tables import format_comparison_summary, format_measured_comparison

    _no_sweep_flags(args, "--compare")
    cluster = _load_cluster(args)
    tables = measured_tables(read_measured(f) for f in args.compare)
    _check_proto_tables(args.proto, [table_config(label, t) for label, t in tables])
    with _flags(algo="--algo", proto="--proto"):
        shapes = [
            shape_for(
                cluster, table_config(label, t), fixed_nodes=args.nodes is not None, algo=args.algo, proto=args.proto
            )
            for label, t in tables
        ]
        frames = [compare_measured(shape, t) for shape, (_, t) in zip(shapes, tables)]
    comparison = pd.concat(frames, ignore_index=True)
    summary = comparison_summary(comparison)
    for frame, (_, row) in zip(frames, summary.iterrows()):
        print(format_measured_comparison(frame, row))
        print()
    print(format_comparison_summary(summary))
    if args.out is not None:
        from plots.collectives import measured_vs_predicted  # matplotlib: only when drawing

        out = Path(args.out)
        written = [
            atomic_write_text(out / "comparison.csv", comparison.to_csv(index=False)),
            atomic_write_text(out / "summary.csv", summary.to_csv(index=False)),
        ]
        for frame in frames:
            name = re.sub(r"[^\w.-]+", "_", str(frame["table"].iloc[0])).strip("_")
            written.append(measured_vs_predicted(frame, out / f"{name}.png"))
        print(f"# wrote {', '.join(str(p) for p in written[:2])} and {len(written) - 2} figure(s) in {out}/")
    return 0


def _check_proto_tables(proto: str | None, configs) -> None:
    """``--proto`` is a known protocol and, with --compare / --calibrate, some table is an
    allreduce (the only collective it applies to)."""
    if proto is None:
        return
    if proto not in PROTOCOLS:
        raise ConfigError("--proto", f"unknown allreduce protocol {proto!r}", PROTOCOLS)
    if proto != "auto" and not any(c.collective == "allreduce" for c in configs):
        kinds = sorted({c.collective for c in configs})
        raise ConfigError("--proto", f"only allreduce tables take a protocol; these are {', '.join(kinds)}", ["auto"])


def _no_sweep_flags(args, mode: str) -> None:
    """``--op``, ``--sizes`` and ``--trace`` are refused with ``mode``: the tables say them."""
    for flag, value in (("--op", args.op), ("--sizes", args.sizes), ("--trace", args.trace)):
        if value is not None:
            raise ConfigError(flag, f"not with {mode}: each measured table says its collective and sizes")


def cmd_calibrate(args) -> int:
    """``collective --calibrate FILE ... --out PROFILE.yaml``: read every file, fit, print
    the fitted values and the errors before and after, write the profile."""
    from lina_sim.experiments.calibration import calibrate, check_calibration_algo, profile, write_profile
    from lina_sim.experiments.measured import measured_tables, read_measured, table_config
    from lina_sim.experiments.microbench import allreduce_protocol
    from lina_sim.hardware.spec import read_preset
    from lina_sim.results.tables import format_calibration, format_comparison_summary

    _no_sweep_flags(args, "--calibrate")
    if args.out is None or Path(args.out).suffix not in (".yaml", ".yml"):
        raise ConfigError("--out", f"--calibrate needs the profile to write, got {args.out!r}", "a path ending .yaml")
    if args.nodes is not None or args.gpus_per_node is not None:
        flag = "--nodes" if args.nodes is not None else "--gpus-per-node"
        raise ConfigError(flag, "not with --calibrate: each table is simulated on as many nodes and GPUs as it had")
    check_calibration_algo(args.algo)
    cluster = _load_cluster(args)
    tables = measured_tables(read_measured(f) for f in args.calibrate)
    _check_proto_tables(args.proto, [table_config(label, t) for label, t in tables])
    with _flags(algo="--algo", proto="--proto"), allreduce_protocol(args.proto):
        result = calibrate(cluster, tables, algo=args.algo)
    base, _ = read_preset(args.preset)
    prof = profile(result, base, args.preset)
    if isinstance(prof.get("calibration"), dict):
        prof["calibration"]["proto"] = args.proto or "auto"  # the allreduce protocol it was fitted with
    written = write_profile(args.out, prof)
    print(format_calibration(result.fits))
    print()
    print("# before:")
    print(format_comparison_summary(result.before))
    print("# after:")
    print(format_comparison_summary(result.after))
    print(f"# wrote {written}")
    return 0


def cmd_contention(args) -> int:
    from lina_sim.config.units import parse_size
    from lina_sim.experiments.microbench import contention
    from lina_sim.results.timeline import write_chrome_trace

    cluster = _load_cluster(args)
    # A contention run of 0 bytes has no slowdown to report (0 / 0).
    a2a = parse_size(args.size, "--size", minimum=1)
    ar = parse_size(args.ar_size, "--ar-size", minimum=1) if args.ar_size else a2a
    _check_host_memory(cluster, "all_to_all", args.a2a_algo, 2 if args.trace else 0)
    flags = {"algo": "--ar-algo", "a2a_algo": "--a2a-algo", "ar_algo": "--ar-algo", "ar_proto": "--ar-proto"}
    with _flags(**flags, proto="--ar-proto"):
        res = contention(cluster, a2a, ar, args.a2a_algo, args.ar_algo, ar_proto=args.ar_proto)
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
            try:
                df = collective_sweep(cluster, op, algo, sizes)
            except ConfigError as e:  # nvls needs Hopper and NVSwitch on one node
                print(f"# {op} ({algo}) on {cluster.name}: not available: {e.problem}\n")
                continue
            print(format_collective_table(df, op, algo, cluster))
            print()
    size = 64 << 20
    res = contention(cluster, size, size)
    print(format_contention(res, cluster, size, size, "direct", ALGORITHMS["allreduce"][0], 6))
    return 0
